"""Run MONAI Label's request handlers off uvicorn's event loop.

MONAI Label 0.8.5 declares its endpoints ``async def`` and calls the app synchronously
inside them (``/infer``, ``PUT /datastore/label``, ``/info``, ``/scoring``...), so one
inference holds every other request, label saves and ``/info`` included, until it ends.
``MONAI_LABEL_INFER_CONCURRENCY`` does not help: the handler still waits on the future
inside the event loop.

Design (threads, not worker processes): the handlers only call into the app, and the
heavy work in them (torch, OpenCV, PIL, numpy, file I/O) releases the GIL, so threads
give real parallelism while keeping one datastore object, one model cache and one
retrain counter per server. ``uvicorn --workers N`` would instead run N copies of the
app on one file datastore, each with its own copy of every network and no shared lock.

- every route of ``monailabel.endpoints.*`` whose handler is a coroutine that awaits
  nothing (all but the DICOMweb proxy and the static OHIF files) gets a wrapper that runs
  the original handler to completion in a worker thread. FastAPI resolves the route's
  dependencies (authentication) on the event loop as before, and calls
  ``route.dependant.call`` per request, so replacing it changes nothing else;
- two pools: ``/infer`` (and WSI / batch inference) run in the *infer* pool, everything
  else in the *io* pool, so a label save or ``/info`` never waits for a free thread behind
  queued inferences. How many inferences actually compute at once is bounded per device
  in the app (``--conf infer_concurrency``, :class:`InferSlots`), not by the pool: a
  request that is refused (404, 409, 422) is answered at once instead of queueing;
- before either, :func:`check_form` answers 422 for form fields MONAI Label would ``json.loads``
  into an HTTP 500 (``params``, ``info``) and for an ``/infer`` without an image;
- ``--conf offload false`` keeps MONAI Label's stock behaviour (for ``bench/load_test.py``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from monailabel_dr.config import INFER_ORDERS

logger = logging.getLogger(__name__)

_INSTALLED_KEY = "mldr_offload_installed"
_ENABLED_KEY = "mldr_offload_enabled"
INFER_MODULES = ("monailabel.endpoints.infer", "monailabel.endpoints.wsi_infer", "monailabel.endpoints.batch_infer")
# handlers that await (the DICOMweb proxy) or only serve static files stay on the loop
SKIP_MODULES = ("monailabel.endpoints.proxy", "monailabel.endpoints.ohif", "monailabel.endpoints.login")
IO_THREADS = 16
INFER_THREADS = 64   # waiting requests only; computing ones are bounded by InferSlots

_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_local = threading.local()


def default_infer_concurrency(device: str) -> int:
    """Concurrent inferences per device when ``--conf infer_concurrency`` is not given.

    CPU: one per two cores (each inference runs torch on every core; more at once only
    competes for them and multiplies the memory of 12 MP images). CUDA: 2, so one
    request's CPU pre/post-processing overlaps another's GPU pass. With worker processes
    (``--conf infer_workers N``, lib/infer_workers.py) the slots are the N workers."""
    if str(device).startswith("cuda"):
        return 2
    return max(1, (os.cpu_count() or 2) // 2)


class InferSlots:
    """A bounded number of concurrent inferences per device, and the order in which waiting ones are admitted.

    ``handoff``: requests admitted per slot beyond the one computing. 0 for inference in this process (the
    slot is the computation). With worker processes (lib/infer_workers.py) it is 1: each worker gets its next
    request while it computes the current one, so it starts it the moment it is done instead of waiting for
    this process (busy with label saves, HTTP and the previous answer, under one GIL) to release the slot
    and hand the next one over. The worker runs one at a time, so at most ``size`` inferences compute per
    device either way; the load test measured the gain (docs/benchmarks.md, 2026-12-07).

    ``order`` (``--conf infer_order``): which waiting request a freed slot admits.

    - ``response_ratio`` (default): highest response ratio next (Brinch Hansen's HRRN): the largest
      (waited + expected) / expected, where expected is the model's recent service time on the device (the
      median of its last ``ESTIMATE_WINDOW``). A 15 ms grade requested behind twenty 12 MP segmentations is
      admitted almost at once instead of after all of them, and a long job cannot starve: its ratio grows
      with its wait, so it overtakes short jobs that have waited less than waited x (short / long).
    - ``arrival``: first come, first served.

    A model without an estimate yet counts as the longest known (its first request also loads its network).
    Not a library's: ``queue.PriorityQueue`` orders by a key fixed at insertion, and the ratio changes as
    requests wait; a semaphore admits in no chosen order."""

    ESTIMATE_WINDOW = 9

    def __init__(self, per_device: int | None, default_device: str, handoff: int = 0, order: str = "response_ratio"):
        if order not in INFER_ORDERS:
            raise ValueError(f"infer order must be one of {INFER_ORDERS}, got {order!r}")
        self.per_device = per_device
        self.default_device = str(default_device)
        self.handoff = int(handoff)
        self.order = order
        self._lock = threading.Lock()
        self._busy: dict[str, int] = {}
        self._waiting: dict[str, list[dict]] = {}
        self._pending = 0   # requests waiting for a slot or computing, all devices
        self._seq = 0
        self._service: dict[tuple[str, str], list[float]] = {}   # (device, job) -> recent service times, s
        self._last_done: dict[str, float] = {}

    def _normal(self, device) -> str:
        d = str(device or self.default_device).lower()
        return "cuda:0" if d == "cuda" else d

    def size(self, device=None) -> int:
        """Inferences computing at once on ``device``."""
        d = self._normal(device)
        return int(self.per_device or default_infer_concurrency(d))

    def _capacity(self, d: str) -> int:
        return self.size(d) * (1 + self.handoff)

    def expected(self, device, job) -> float | None:
        """The recent median service time of ``job`` on ``device`` (s), or None before its first one."""
        times = self._service.get((self._normal(device), str(job)))
        return float(sorted(times)[len(times) // 2]) if times else None

    def _observe(self, d: str, job: str, seconds: float) -> None:
        times = self._service.setdefault((d, job), [])
        times.append(float(seconds))
        del times[:-self.ESTIMATE_WINDOW]

    def observe(self, device, job, seconds: float) -> None:
        """Record a service time of ``job`` on ``device`` (``slot`` records its own)."""
        with self._lock:
            self._observe(self._normal(device), str(job), seconds)

    def _pick(self, d: str, now: float) -> dict:
        queue = self._waiting[d]
        if self.order == "arrival" or len(queue) == 1:
            return queue[0]
        known = [t for (dev, _), times in self._service.items() if dev == d for t in times]
        longest = max(known) if known else 1.0

        def ratio(w):
            e = max(self.expected(d, w["job"]) or longest, 1e-3)
            return ((now - w["t"]) + e) / e

        return max(queue, key=lambda w: (ratio(w), -w["seq"]))   # ties: first come

    def _admit(self, d: str) -> None:
        now = time.monotonic()
        while self._waiting.get(d) and self._busy.get(d, 0) < self._capacity(d):
            w = self._pick(d, now)
            self._waiting[d].remove(w)
            self._busy[d] = self._busy.get(d, 0) + 1
            w["admitted"].set()

    @contextmanager
    def slot(self, device=None, job: str | None = None):
        """Hold one of ``device``'s slots for an inference of ``job`` (the model: what the order estimates by)."""
        d = self._normal(device)
        me = {"job": str(job), "t": time.monotonic(), "admitted": threading.Event()}
        with self._lock:
            self._pending += 1
            self._seq += 1
            me["seq"] = self._seq
            self._waiting.setdefault(d, []).append(me)
            self._admit(d)
        try:
            me["admitted"].wait()
            t_admit = time.monotonic()
            try:
                yield
            finally:
                with self._lock:
                    now = time.monotonic()
                    # one computation at a time per slot: a handed-off request's service starts when the previous
                    # one ends, not when it was admitted
                    start = max(t_admit, self._last_done.get(d, 0.0)) if self.size(d) == 1 else t_admit
                    self._observe(d, str(job), now - start)
                    self._last_done[d] = now
                    self._busy[d] -= 1
                    self._admit(d)
        finally:
            with self._lock:
                self._pending -= 1

    def idle(self) -> bool:
        """No inference computing or waiting (background work yields to inference)."""
        with self._lock:
            return self._pending == 0

    def info(self) -> dict:
        """``per_device``: inferences computing at once; ``busy``: requests admitted (computing, or handed to a
        worker that computes another); ``waiting``: per device; ``pending``: admitted or waiting, all devices;
        ``expected_s``: each model's recent median service time per device (what ``order`` uses)."""
        with self._lock:
            devices = set(self._busy) | set(self._waiting) or {self._normal(None)}
            expected = {}
            for (d, job) in self._service:
                expected.setdefault(d, {})[job] = round(self.expected(d, job), 4)
            return {"per_device": {d: self.size(d) for d in sorted(devices)}, "handoff_per_slot": self.handoff,
                    "order": self.order, "busy": dict(self._busy),
                    "waiting": {d: len(q) for d, q in self._waiting.items()}, "pending": self._pending,
                    "expected_s": expected}


def _pool(name: str) -> ThreadPoolExecutor:
    with _pools_lock:
        if name not in _pools:
            n = INFER_THREADS if name == "infer" else IO_THREADS
            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"mldr-{name}")
            _start_threads(pool, n)
            _pools[name] = pool
        return _pools[name]


def _start_threads(pool: ThreadPoolExecutor, n: int) -> None:
    """Start all ``n`` threads of ``pool`` now. A ThreadPoolExecutor starts a thread per submit while none is
    idle, and ``Thread.start`` waits until the new thread runs: left lazy, the first burst of requests starts
    them from the event loop, which then waits on each (py-spy, 40 + 40 requests: a tenth of the loop's time).
    Each task waits for all the others, so no thread is reused before all ``n`` exist."""
    barrier = threading.Barrier(n)

    def wait():
        try:
            barrier.wait(timeout=10)
        except threading.BrokenBarrierError:   # a slow start: the rest start lazily, as before
            pass

    for f in [pool.submit(wait) for _ in range(n)]:
        f.result()


def warm_pools() -> None:
    """Create both pools and their threads (at server start, off any request)."""
    for name in ("infer", "io"):
        _pool(name)


def _run_to_completion(coro_fn, kwargs):
    """Run an ``async def`` handler in this worker thread (one event loop per thread, reused)."""
    loop = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = asyncio.new_event_loop()
    return loop.run_until_complete(coro_fn(**kwargs))


# form fields MONAI Label's handlers json.loads() without a check (a bad one was an HTTP 500)
JSON_FORM_FIELDS = ("params", "info")


def check_form(module: str, kwargs: dict) -> None:
    """422 for what MONAI Label's handlers would turn into a 500: form fields that are not JSON objects,
    an /infer without an image."""
    from monailabel_dr.lib.errors import BadInput

    for name in JSON_FORM_FIELDS:
        value = kwargs.get(name)
        if isinstance(value, str) and value.strip():
            try:
                parsed = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as e:
                raise BadInput(f"form field {name!r} is not JSON ({e}); send a JSON object, e.g. {name}={{}}") from None
            if not isinstance(parsed, dict):
                raise BadInput(f"form field {name!r} must be a JSON object ({{...}}), got {type(parsed).__name__}")
    if module == "monailabel.endpoints.train" and kwargs.get("params") is not None and not isinstance(kwargs["params"], dict):
        raise BadInput("the train request body must be a JSON object of settings, e.g. {\"max_epochs\": 10}")
    from monailabel.interfaces.utils.app import app_instance

    try:
        app = app_instance()
    except Exception:   # no app yet (start-up): MONAI Label answers as it does
        app = None
    if app is not None and hasattr(app, "check_request"):
        app.check_request(module, kwargs)
    if module == "monailabel.endpoints.infer" and "image" in kwargs:
        if not kwargs.get("file") and not kwargs.get("image") and not kwargs.get("session_id"):
            raise BadInput("no image: give ?image=<id in the datastore>, or upload the photograph as the form field 'file'")


def _route_override(module: str, kwargs: dict):
    """The app's own answer for this request (``app.route_override``: a zero-argument callable), or None."""
    from monailabel.interfaces.utils.app import app_instance

    try:
        app = app_instance()
    except Exception:   # no app yet (start-up)
        return None
    fn = getattr(app, "route_override", None)
    return fn(module, kwargs) if fn is not None else None


def _offloaded(original, pool_name: str, state):
    module = original.__module__

    @functools.wraps(original)   # same signature: FastAPI's dependant was built from it
    async def handler(**kwargs):
        check_form(module, kwargs)   # on the loop, both modes: cheap
        override = _route_override(module, kwargs)   # the app answers this request itself (e.g. output=dicom_seg)
        if not getattr(state, _ENABLED_KEY, True):   # --conf offload false: the stock path, on the loop
            return override() if override is not None else await original(**kwargs)
        loop = asyncio.get_running_loop()
        if override is not None:
            return await loop.run_in_executor(_pool(pool_name), override)
        return await loop.run_in_executor(_pool(pool_name), _run_to_completion, original, kwargs)

    handler.__mldr_offloaded__ = original
    return handler


def _route_objects(routes, seen=None):
    """Every object of a FastAPI app's route tree that carries a ``dependant``: plain ``APIRoute`` objects and,
    in FastAPI versions that include routers lazily (0.13x and later: ``_IncludedRouter``), the included
    routers' original routes and the per-inclusion route contexts already built from them."""
    seen = set() if seen is None else seen
    for route in routes:
        if id(route) in seen:
            continue
        seen.add(id(route))
        if getattr(route, "dependant", None) is not None:
            yield route
        original = getattr(route, "original_router", None)
        if original is not None:
            yield from _route_objects(getattr(original, "routes", []), seen)
            for name in ("_effective_candidates", "_effective_low_priority_routes"):
                yield from _route_objects(getattr(route, name, None) or [], seen)


def install(fastapi_app, enabled: bool = True) -> int:
    """Offload MONAI Label's handlers of ``fastapi_app`` (or, ``enabled=False``, keep them on the loop: the
    flag is read per request, so a new app instance in the same process switches it); returns how many
    route objects were changed by this call.

    FastAPI calls ``dependant.call`` per request and builds the dependant of a lazily included route from
    its ``endpoint``: both are replaced by a wrapper with the original's signature, so authentication and
    parameter parsing stay FastAPI's (tests/test_offload.py checks the handlers run in worker threads)."""
    setattr(fastapi_app.state, _ENABLED_KEY, bool(enabled))
    wrappers = getattr(fastapi_app.state, "mldr_offload_wrappers", None)
    if wrappers is None:
        wrappers = {}
        setattr(fastapi_app.state, "mldr_offload_wrappers", wrappers)
    changed = 0
    for route in _route_objects(fastapi_app.router.routes):
        call = route.dependant.call
        module = getattr(call, "__module__", "") or ""
        if not module.startswith("monailabel.endpoints.") or module in SKIP_MODULES:
            continue
        if not asyncio.iscoroutinefunction(call) or hasattr(call, "__mldr_offloaded__"):
            continue
        wrapped = wrappers.get(call)
        if wrapped is None:
            wrapped = wrappers[call] = _offloaded(call, "infer" if module in INFER_MODULES else "io", fastapi_app.state)
        route.dependant.call = wrapped
        if getattr(route, "endpoint", None) is call:
            route.endpoint = wrapped
        changed += 1
    setattr(fastapi_app.state, _INSTALLED_KEY, True)
    if enabled:
        warm_pools()
    logger.info(f"{changed} MONAI Label route handlers run off the event loop (lib/offload.py)")
    return changed


def install_in_server(enabled: bool) -> bool:
    """Install on MONAI Label's FastAPI app when this process is the server (``monailabel.app`` imported)."""
    from monailabel_dr.lib.upload_limit import server_fastapi_app

    fastapi_app = server_fastapi_app()
    if fastapi_app is None:
        return False
    install(fastapi_app, enabled)
    if not enabled:
        logger.info("--conf offload false: MONAI Label's stock request handling (every request on the event loop)")
    return True
