"""Inference in worker processes (``--conf infer_workers N``): the server process keeps the event loop,
label saves, the datastore and ``/info``; the network passes and the image work run elsewhere.

Why: with worker threads (lib/offload.py) nothing waits for an inference any more, but on a small
machine the inference and the label saves still share one Python interpreter, and much of an
inference on a small photograph is Python (MONAI transforms, the landmark analysis), which holds the
GIL. A worker process has its own.

How: each worker builds the app's infer tasks from the same ``--conf`` (``config.parse_conf``, the
rows of ``configs/models.yaml``; no datastore) once, at start, and keeps them: the model cache,
reload-on-publish and every check are the tasks' own. The app wraps each served task in
:class:`WorkerTask`: ``/info``, the declared parameters and the model state are read from the local
task, ``task(request)`` runs in a worker. The request's image is already a path (main.py resolves
ids), the result label file is a temporary file both processes see. A client error raised in a
worker (409, 422...) is raised again here with its status and text; anything else is a server error.
Requests with callbacks (the scoring methods' pre-transform hooks) stay in this process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

_TASKS: dict[str, Any] | None = None


def _init(app_dir: str, conf: dict) -> None:
    """In each worker: the app's infer tasks, built as main.py builds them."""
    global _TASKS
    from monailabel_dr.config import import_object, load_model_table, parse_conf

    settings = parse_conf(conf, app_dir, load_model_table())
    tasks = {}
    for model in settings.models.values():
        for infer_name, ref in model.spec.infers.items():
            tasks[infer_name] = import_object(ref)(infer_name, model, settings)
    if "grading" in tasks and "lesion_seg" in tasks:
        tasks["grading"].lesion_answer = tasks["lesion_seg"].answer
    _TASKS = tasks


def _ready() -> bool:
    return _TASKS is not None


def _run(name: str, request: dict):
    from monailabel_dr.lib.errors import ClientError

    try:
        return ("ok", _TASKS[name](request))
    except ClientError as e:
        return ("client", e.status_code, e.detail)
    except Exception as e:   # a server error: its text and trace go to the server log
        return ("error", f"{type(e).__name__}: {e}", traceback.format_exc())


class InferWorkers:
    """A pool of ``n`` worker processes (spawned: never a fork of the threaded server)."""

    def __init__(self, n: int, app_dir: str, conf: dict):
        self.n = int(n)
        self.pool = ProcessPoolExecutor(max_workers=self.n, mp_context=mp.get_context("spawn"),
                                        initializer=_init, initargs=(str(app_dir), dict(conf)))
        for _ in range(self.n):   # start them now (each imports torch and builds the tasks, seconds)
            self.pool.submit(_ready)

    def run(self, name: str, request: dict):
        from monailabel_dr.lib.errors import ClientError

        out = self.pool.submit(_run, name, request).result()
        if out[0] == "ok":
            return out[1]
        if out[0] == "client":
            raise ClientError(out[1], out[2])
        logger.error(f"inference worker: {out[1]}\n{out[2]}")
        raise RuntimeError(f"inference worker: {out[1]}")

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class WorkerTask:
    """A served infer task whose ``__call__`` runs in a worker process; everything else is the local task's."""

    def __init__(self, local, workers: InferWorkers):
        self._local = local
        self._workers = workers

    def __getattr__(self, name):
        return getattr(self._local, name)

    def __call__(self, request, callbacks=None):
        if callbacks:
            return self._local(request, callbacks)
        return self._workers.run(self._local.name, dict(request))
