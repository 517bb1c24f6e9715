"""The grader's image embeddings (pooled features before its linear head), kept for the
diversity strategy.

Not in image info: the datastore rewrites its whole JSON file at every
``update_image_info``, and 128-1024 floats per image would multiply its size several
times. They live in one ``.npz`` file per model in ``<model_dir>/active_learning/``
(``ids``, ``keys`` = the model identity each row was computed with, ``vectors``), written
atomically by the ``grade_uncertainty`` scoring and re-read when the file changes, so a
scoring run in a background process (``POST /scoring/...`` without ``run_sync``) is seen by
the server's strategies too. A row counts only while its key equals the current model's.
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np

_STORES: dict[str, "EmbeddingStore"] = {}
_STORES_LOCK = threading.Lock()


class EmbeddingStore:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[str, np.ndarray]] = {}
        self._pending: dict[str, tuple[str, np.ndarray]] = {}
        self._loaded_mtime: int | None = None

    @staticmethod
    def for_path(path: str) -> "EmbeddingStore":
        path = os.path.realpath(path)
        with _STORES_LOCK:
            store = _STORES.get(path)
            if store is None:
                store = _STORES[path] = EmbeddingStore(path)
            return store

    def _reload(self) -> None:  # under self._lock
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return
        if mtime == self._loaded_mtime:
            return
        try:
            with np.load(self.path, allow_pickle=False) as z:
                rows = {str(i): (str(k), np.asarray(v, np.float32)) for i, k, v in zip(z["ids"], z["keys"], z["vectors"])}
        except (OSError, ValueError, KeyError):
            rows = {}                                   # unreadable: recomputed by the next scoring run
        rows.update(self._pending)
        self._rows = rows
        self._loaded_mtime = mtime

    def put(self, image_id: str, key: str, vector) -> None:
        row = (key, np.asarray(vector, np.float32).reshape(-1))
        with self._lock:
            self._rows[image_id] = row
            self._pending[image_id] = row

    def get(self, image_ids, key: str) -> dict[str, np.ndarray]:
        """The vectors of ``image_ids`` computed with model identity ``key``."""
        with self._lock:
            self._reload()
            return {i: self._rows[i][1] for i in image_ids if i in self._rows and self._rows[i][0] == key}

    def flush(self) -> None:
        with self._lock:
            if not self._pending:
                return
            self._reload()                              # merge rows another process wrote meanwhile
            dim = next(iter(self._pending.values()))[1].shape[0]
            rows = {i: r for i, r in self._rows.items() if r[1].shape[0] == dim}
            ids = sorted(rows)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(self.path))
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, ids=np.array(ids, dtype=str), keys=np.array([rows[i][0] for i in ids], dtype=str),
                             vectors=np.stack([rows[i][1] for i in ids]) if ids else np.zeros((0, dim), np.float32))
                os.replace(tmp, self.path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            self._rows = rows
            self._pending.clear()
            self._loaded_mtime = os.stat(self.path).st_mtime_ns
