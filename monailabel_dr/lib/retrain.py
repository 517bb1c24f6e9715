"""Retrain on correction: saved ``final`` labels trigger fine-tuning of the models that learn from them.

MONAI Label gives the plumbing (a FIFO background "train" queue of one worker, whose jobs run the
app's trainer in a subprocess; published-model hot reload in the infer tasks) but nothing retrains
when a label is saved. This module is the missing bookkeeping:

- Each model row says which final label kinds it learns from (``learns_from`` in configs/models.yaml:
  ``grade`` for ``ID.grade.json``, ``lesion_map`` for a label map). A saved final label of such a kind
  counts for that model.
- After ``--conf retrain_after N`` counted labels (0 = off), one fine-tuning job is queued for the
  model: ``--conf retrain_epochs`` epochs, resuming from the served (published) model, not from
  scratch (:func:`monailabel_dr.lib.trainers.common.resume_path`). Inference keeps serving the old
  model until the trainer publishes the new one (atomically), and the infer tasks reload it then.
- Nothing is lost while a job waits or runs:
  - a label saved while the model's job is still queued (not started) is read by that job when it
    starts (its subprocess reads the datastore then), so it is attached to that job;
  - a label saved once the job has started counts toward the next job, which is queued as soon as
    N such labels exist (the queue runs it after the current one); saving never starts a second
    queued job for the same model;
  - a job that ends in ERROR or STOPPED gives its labels back to the count (they are in no model), so
    the next save can trigger a new job; a failed job is never resubmitted blindly.
- The labels counted and not yet in a job are kept in ``<model_dir>/retrain_state.json``, so a
  server restart keeps the count (jobs of a previous process are gone: their labels count again).

``/info`` shows, per model, the count of labels since the served model's data was read and the
state of the last job (``RetrainOnCorrection.info``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from monailabel_dr.config import AppSettings

logger = logging.getLogger(__name__)

FINAL = "final"
ACTIVE = ("SUBMITTED", "RUNNING")
FAILED = ("ERROR", "STOPPED")


@dataclass
class _ModelState:
    pending: list[str] = field(default_factory=list)     # labels counted, in no job yet
    job: dict | None = None                              # the last job queued (MONAI Label's task dict, live)
    job_labels: list[str] = field(default_factory=list)  # the labels that job reads
    jobs_submitted: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    last_done: dict | None = None


# submit(model, request) -> MONAI Label's background task dict ({"id", "status", ...}, updated in place by
# its worker thread) or None when the queue refused the job
Submit = Callable[[str, dict], "dict | None"]


class RetrainOnCorrection:
    def __init__(self, settings: AppSettings, trainers: set[str] | list[str], submit: Submit, state_path: str | None = None):
        self.after = int(settings.retrain_after)
        self.epochs = int(settings.retrain_epochs)
        self.learns_from = {name: tuple(m.spec.learns_from) for name, m in settings.models.items() if name in set(trainers)}
        self.submit = submit
        self.state_path = state_path
        self._written: dict | None = None   # what the state file holds (written again only when it changes)
        self._lock = threading.RLock()   # AsyncTask.run (called under it) asks the app for info(), which reads this state
        self._state = {name: _ModelState() for name in self.learns_from}
        self._load()

    @property
    def enabled(self) -> bool:
        return self.after > 0

    # ------------------------------------------------------------------ persistence
    def _load(self) -> None:
        if not self.state_path or not os.path.isfile(self.state_path):
            return
        try:
            with open(self.state_path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            logger.warning(f"retrain-on-correction: ignoring unreadable {self.state_path}: {e}")
            return
        for name, st in self._state.items():
            st.pending = [str(i) for i in (saved.get(name) or {}).get("pending", [])]

    def _save(self) -> None:
        if not self.state_path:
            return
        # labels of jobs that have not finished are written as pending: after a restart they count again
        data = {name: {"pending": [*(st.job_labels if st.job and st.job.get("status") in ACTIVE else []), *st.pending]}
                for name, st in self._state.items()}
        if data == self._written:   # /info calls this on every poll: no write when nothing changed
            return
        tmp = f"{self.state_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.state_path)
        self._written = data

    # ------------------------------------------------------------------ bookkeeping
    def _reconcile(self, st: _ModelState) -> None:
        job = st.job
        if job is None or job.get("_retrain_seen"):
            return
        status = job.get("status")
        if status == "DONE":
            st.jobs_done += 1
            st.last_done = {"id": job.get("id"), "end_ts": job.get("end_ts"), "labels": len(st.job_labels)}
            job["_retrain_seen"] = True
        elif status in FAILED:
            st.jobs_failed += 1
            st.pending = [*st.job_labels, *st.pending]   # in no model: they count toward the next job
            st.job_labels = []
            job["_retrain_seen"] = True

    def models_for(self, kind: str | None) -> list[str]:
        """The models a saved final label of ``kind`` counts for (unknown kind: every model that learns from labels)."""
        return [m for m, kinds in self.learns_from.items() if kinds and (kind is None or kind in kinds)]

    def on_saved(self, image_id: str, tag: str | None, kind: str | None) -> dict[str, Any]:
        """Count a saved label; queue fine-tuning where the count reaches ``retrain_after``. Returns what happened per model."""
        if not self.enabled or (tag or FINAL) != FINAL:
            return {}
        out: dict[str, Any] = {}
        with self._lock:
            for model in self.models_for(kind):
                st = self._state[model]
                self._reconcile(st)
                queued = st.job is not None and st.job.get("status") == "SUBMITTED"
                if queued:   # the queued job has not read the datastore yet: this label is in its data
                    st.job_labels.append(image_id)
                    out[model] = {"counted": "in_queued_job", "job": st.job.get("id")}
                    continue
                st.pending.append(image_id)
                out[model] = {"counted": "pending", "labels_pending": len(st.pending)}
                if len(st.pending) >= self.after:
                    request = {"model": model, "max_epochs": self.epochs, "pretrained": True,
                               "retrain_on_correction": True}
                    task = self.submit(model, request)
                    if task is None:
                        logger.warning(f"retrain-on-correction: the train queue refused a job for {model}; "
                                       f"{len(st.pending)} labels stay counted")
                        continue
                    st.job, st.job_labels, st.pending = task, st.pending, []
                    st.jobs_submitted += 1
                    out[model] = {"counted": "queued_job", "job": task.get("id"), "labels": len(st.job_labels)}
                    logger.info(f"retrain-on-correction: queued fine-tuning of {model} ({len(st.job_labels)} new labels, "
                                f"{self.epochs} epochs, from the served model)")
            self._save()
        return out

    def info(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {"retrain_after": self.after, "retrain_epochs": self.epochs, "models": {}}
            for model, st in self._state.items():
                self._reconcile(st)
                job = st.job
                unread = len(st.pending) + (len(st.job_labels) if job and job.get("status") == "SUBMITTED" else 0)
                in_training = len(st.job_labels) if job and job.get("status") == "RUNNING" else 0
                out["models"][model] = {
                    "learns_from": list(self.learns_from[model]),
                    # saved since the served model's training data was read (the running job's labels included)
                    "labels_since_last_model": unread + in_training,
                    "labels_pending": len(st.pending),
                    "job": None if job is None else {k: job.get(k) for k in ("id", "status", "start_ts", "end_ts")}
                    | {"labels": len(st.job_labels)},
                    "jobs_submitted": st.jobs_submitted,
                    "jobs_done": st.jobs_done,
                    "jobs_failed": st.jobs_failed,
                    "last_done": st.last_done,
                }
            self._save()
            return out
