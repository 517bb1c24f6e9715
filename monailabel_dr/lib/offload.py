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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

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
    """A bounded number of concurrent inferences per device (one semaphore per device string).

    ``handoff``: requests admitted per slot beyond the one computing. 0 for inference in this process (the
    slot is the computation). With worker processes (lib/infer_workers.py) it is 1: each worker gets its next
    request while it computes the current one, so it starts it the moment it is done instead of waiting for
    this process (busy with label saves, HTTP and the previous answer, under one GIL) to release the slot
    and hand the next one over. The worker runs one at a time, so at most ``size`` inferences compute per
    device either way; the load test measured the gain (docs/benchmarks.md, 2026-12-07)."""

    def __init__(self, per_device: int | None, default_device: str, handoff: int = 0):
        self.per_device = per_device
        self.default_device = str(default_device)
        self.handoff = int(handoff)
        self._sems: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._busy: dict[str, int] = {}
        self._pending = 0   # requests waiting for a slot or computing, all devices

    def _normal(self, device) -> str:
        d = str(device or self.default_device).lower()
        return "cuda:0" if d == "cuda" else d

    def size(self, device=None) -> int:
        """Inferences computing at once on ``device``."""
        d = self._normal(device)
        return int(self.per_device or default_infer_concurrency(d))

    @contextmanager
    def slot(self, device=None):
        d = self._normal(device)
        with self._lock:
            sem = self._sems.get(d)
            if sem is None:
                sem = self._sems[d] = threading.BoundedSemaphore(self.size(d) * (1 + self.handoff))
            self._pending += 1
        try:
            with sem:
                with self._lock:
                    self._busy[d] = self._busy.get(d, 0) + 1
                try:
                    yield
                finally:
                    with self._lock:
                        self._busy[d] -= 1
        finally:
            with self._lock:
                self._pending -= 1

    def idle(self) -> bool:
        """No inference computing or waiting (background work yields to inference)."""
        with self._lock:
            return self._pending == 0

    def info(self) -> dict:
        """``per_device``: inferences computing at once; ``busy``: requests admitted (computing, or handed to a
        worker that computes another); ``pending``: admitted or waiting, all devices."""
        with self._lock:
            return {"per_device": {d: self.size(d) for d in (self._sems or {self._normal(None): None})},
                    "handoff_per_slot": self.handoff, "busy": dict(self._busy), "pending": self._pending}


def _pool(name: str) -> ThreadPoolExecutor:
    with _pools_lock:
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(max_workers=INFER_THREADS if name == "infer" else IO_THREADS,
                                              thread_name_prefix=f"mldr-{name}")
        return _pools[name]


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
