"""Lowering the CPU priority of work that must never slow an annotator's request down (Linux).

``"idle"`` puts the calling thread in Linux's ``SCHED_IDLE`` class: it runs only on CPU time that no
normal thread wants, so a training job or a background rescoring pass takes a whole idle machine but
yields almost entirely to the server's requests (a nice level only shares the CPU in proportion:
nice 10 still takes about a tenth of a busy core, nice 19 about 1.5 %). Threads and processes started
afterwards inherit the class (a job's DataLoader workers, torch's thread pool). A number 0-19 is a
nice level. Where neither can be set (not Linux, no permission), it logs and runs as it is.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def lower_priority(setting, thread_id: int = 0) -> str:
    """Lower thread ``thread_id`` (0: the calling thread) to ``setting`` ("idle" or a nice level 0-19);
    returns what was applied ("idle", "nice N", or "unchanged: <why>")."""
    if setting in (None, 0, "0"):
        return "unchanged: priority setting 0"
    if setting == "idle":
        policy = getattr(os, "SCHED_IDLE", None)
        if policy is not None:
            try:
                os.sched_setscheduler(thread_id, policy, os.sched_param(0))
                return "idle"
            except OSError as e:
                logger.warning(f"SCHED_IDLE refused ({e}); using nice 19")
        setting = 19
    try:
        # PRIO_PROCESS with a thread id changes that thread only on Linux (threads are tasks there)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(19, os.getpriority(os.PRIO_PROCESS, thread_id) + int(setting)))
        return f"nice {int(setting)}"
    except (AttributeError, OSError) as e:
        logger.warning(f"could not lower the priority: {e}")
        return f"unchanged: {e}"


def lower_process_priority(setting) -> str:
    """:func:`lower_priority` for every thread this process has now; threads started later inherit it from
    their creator. The calling thread alone is not enough: threads that exist already keep their class
    (measured: torch's intra-op thread, started while the job imported and built the app, kept running
    half of a training job's compute at normal priority, about 10 s of CPU in 20 s, while the job's main
    thread was SCHED_IDLE). Returns what was applied, as :func:`lower_priority` does, with the thread count."""
    try:
        tids = sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:   # not Linux: the calling thread (and what it starts) only
        return lower_priority(setting)
    applied = {lower_priority(setting, tid) for tid in tids}
    if len(applied) == 1:
        return f"{applied.pop()} ({len(tids)} threads)"
    return "; ".join(sorted(applied)) + f" ({len(tids)} threads)"


def process_priorities(pid: int) -> dict[int, str]:
    """:func:`task_priority` of every thread of process ``pid`` ({} where /proc cannot tell)."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return {}
    out = {}
    for tid in tids:
        p = _stat_priority(f"/proc/{pid}/task/{tid}/stat")
        if p is not None:
            out[tid] = p
    return out


def task_priority(pid: int) -> str | None:
    """What :func:`lower_priority` left on process ``pid`` (its main thread), read from /proc:
    "idle", "nice N" or "normal"; None where /proc cannot tell."""
    return _stat_priority(f"/proc/{pid}/stat")


def _stat_priority(path: str) -> str | None:
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command: state is field 3, nice field 19, policy field 41 (proc(5)); SCHED_IDLE = 5
    nice, policy = int(fields[16]), int(fields[38])
    if policy == 5:
        return "idle"
    return f"nice {nice}" if nice > 0 else "normal"
