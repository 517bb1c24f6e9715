"""Shared behaviour of every infer task of the app, on top of MONAI Label's BasicInferTask.

- never serve random weights: a model without a checkpoint answers HTTP 409 with
  how to train it or where to put a checkpoint;
- unusable images answer HTTP 422 (the fundus I/O error message), not 500;
- `info()` reports the model's state (trained or not, which checkpoint, when);
- the same MONAI pre-transforms (LoadFundusd + per-image standardisation, as in
  the CAM paper) for every model; outputs are restored to the input geometry.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.transforms import NormalizeIntensityd
from monailabel.tasks.infer.basic_infer import BasicInferTask

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.fundus import geometry, io
from monailabel_dr.lib.checkpoints import checkpoint_state, load_weights, read_record
from monailabel_dr.lib.checkpoints import describe as describe_record
from monailabel_dr.lib.errors import BadInput, ClientError, ModelNotTrained, find_cause
from monailabel_dr.lib.params import Param, check_device, check_request, describe
from monailabel_dr.transforms import LoadFundusd, lesion_map_transforms, preprocessing_transforms

logger = logging.getLogger(__name__)


class FundusInferTask(BasicInferTask):
    """Base for the app's infer tasks; subclasses set type, labels and post-processing."""

    require_colour = True
    result_extensions: tuple[str, ...] = io.LABEL_EXTENSIONS
    detect_landmarks = False  # optic disc / fovea on the input photograph (lesion quadrants)
    # the task's own request parameters (lib/params.py); MONAI Label's common ones are always accepted
    params: dict[str, Param] = {}

    def __init__(
        self,
        name: str,
        model: ModelSettings,
        app: AppSettings,
        network: torch.nn.Module,
        type: str,
        labels: Any,
        description: str,
        config: dict[str, Any] | None = None,
    ):
        cfg = {"device": app.device, "result_extension": ".png"}
        cfg.update(config or {})
        super().__init__(
            path=[p for p in (model.checkpoint_override, model.published_path) if p],
            network=network,
            type=type,
            labels=labels,
            dimension=2,
            description=description,
            config=cfg,
            load_strict=True,
        )
        self.name = name
        self.model = model
        self.app_settings = app
        self._load_lock = threading.RLock()   # one load of the served checkpoint at a time (_get_network)
        self.loads = 0                        # how many times a checkpoint was loaded (tests: concurrent first requests)

    # ------------------------------------------------------------------ state
    def is_valid(self) -> bool:
        # Listed in /info even when untrained, so clients see the state and how to train.
        return True

    def state(self) -> dict[str, Any]:
        s = checkpoint_state(self.model.serve_path)
        s.update({"profile": self.model.profile_name, "image_size": self.model.image_size,
                  "weights_model": self.model.name})
        if not s["trained"]:
            s["how_to_train"] = self._untrained_message()
        else:
            s.update(self.quality())
        return s

    def quality(self) -> dict[str, Any]:
        """How good the served checkpoint is: its validation record (lib/checkpoints.py) and a sentence."""
        rec = read_record(self.model.serve_path)
        return {"validation": rec, "quality": describe_record(rec), "early_checkpoint": bool(rec and not rec.get("complete"))}

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["state"] = self.state()
        if self.params:
            i["parameters"] = describe(self.params)   # what each request parameter accepts
        colors = self.label_colors()
        if colors:
            i["label_colors"] = colors  # {name: [r, g, b]} (lib/slicer.py)
        return i

    def label_colors(self) -> dict[str, list[int]]:
        """RGB (0-255) per label name of a segmentation model (the lesion colours by default)."""
        from monailabel_dr.lib.slicer import label_colors

        return label_colors(self.labels) if self.type == "segmentation" and isinstance(self.labels, dict) else {}

    def _untrained_message(self) -> str:
        m = self.model.name
        return (
            f"model '{self.name}' has no trained weights yet (expected {self.model.serve_path}). "
            f"Train it: `curl -X POST 'http://HOST:PORT/train/{m}?run_sync=false'` after saving final labels, "
            f"or offline `monailabel-dr train {m} --studies DATASTORE`; or put a checkpoint at that path, "
            f"or start the server with `--conf {m}_checkpoint /path/to/{m}.pt`."
        )

    # ------------------------------------------------------------- transforms
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        # a lesion-attention grader: its frozen lesion branch's maps from the photograph at the branch's own
        # working size, exactly as its trainer computed them (transforms.lesion_map_transforms)
        device = (data or {}).get("device") or self.app_settings.device
        before, after = lesion_map_transforms(
            self.model.network, lambda: self._get_network(device, data).lesion_net, self.model.image_size,
            self.app_settings.max_image_pixels, self.app_settings.min_image_side, device=str(device))
        return [
            *before,
            LoadFundusd(
                keys="image",
                size=self.model.image_size,
                max_pixels=self.app_settings.max_image_pixels,
                min_side=self.app_settings.min_image_side,
                require_colour=self.require_colour,
                keep_source_fov=True,
                landmarks=self.detect_landmarks,
            ),
            # the profile's deterministic preprocessing (e.g. local contrast), exactly as its trainer applies it
            *preprocessing_transforms(self.model.options),
            # The CAM paper standardises every image by its own mean and std.
            NormalizeIntensityd(keys="image"),
            *after,
        ]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def inverse_transforms(self, data=None):
        return None  # outputs are restored explicitly with the recorded FundusGeometry

    # ---------------------------------------------------------------- running
    def __call__(self, request, callbacks=None):
        # every declared request parameter checked before anything runs (lib/params.py): 422 naming it
        request = check_request(request, self.params, f"model '{self.name}'")
        if request.get("device") is not None:
            request["device"] = check_device(request["device"]) or self.app_settings.device
        if not os.path.isfile(self.model.serve_path):
            raise ModelNotTrained(self._untrained_message())
        ext = str(request.get("result_extension") or self._config.get("result_extension") or ".png").lower()
        if ext not in self.result_extensions:
            raise BadInput(f"result_extension {ext!r} is not supported; use one of {', '.join(self.result_extensions)} (never jpg)")
        try:
            return super().__call__(request, callbacks)
        except ClientError:
            raise
        except Exception as e:  # MONAI wraps transform errors in RuntimeError: unwrap ours
            cause = find_cause(e, (ClientError,))
            if cause is not None:
                raise cause
            cause = find_cause(e, (io.FundusIOError,))
            if cause is not None:
                raise BadInput(str(cause)) from e
            raise

    def _get_network(self, device, data):
        """The served checkpoint's network on ``device``: one copy per device, loaded once, reloaded once when
        the file changes (a retrain published it).

        Thread-safe (requests run in worker threads, lib/offload.py): the cache is read without a lock when the
        file is unchanged; otherwise one thread loads while concurrent first requests wait for it, and the new
        network is put in the cache only once its weights are fully loaded, so no request sees half-loaded
        weights. A request already running keeps the network it started with."""
        path = self.model.serve_path
        key = self._file_key(path)
        cached = self._networks.get(device)
        if cached and cached[1] == key:
            return cached[0]
        with self._load_lock:
            key = self._file_key(path)
            cached = self._networks.get(device)
            if cached and cached[1] == key:
                return cached[0]
            network = self.load_network(path, device).to(torch.device(device)).eval()
            self._networks[device] = (network, key)
            self.loads += 1
            return network

    def _file_key(self, path: str):
        try:
            st = os.stat(path)
        except OSError:
            raise ModelNotTrained(self._untrained_message()) from None
        return (st.st_mtime_ns, st.st_size)

    def load_network(self, path: str, device: str) -> torch.nn.Module:
        """A copy of the task's network with the checkpoint's weights (strict); 409 when they do not fit."""
        import copy

        network = copy.deepcopy(self.network).to(torch.device(device))
        try:
            load_weights(network, path, device)
        except Exception as e:
            raise self.unusable_checkpoint(path, e) from e
        return network

    def unusable_checkpoint(self, path: str, e: Exception) -> ModelNotTrained:
        return ModelNotTrained(
            f"checkpoint {path} for model '{self.name}' cannot be loaded into the '{self.model.profile_name}' "
            f"profile network ({type(e).__name__}: {str(e)[:400]}). Retrain the model or point "
            f"--conf {self.model.name}_checkpoint to a checkpoint of this profile."
        )

    def result_path(self, data: dict) -> str:
        ext = str(data.get("result_extension") or ".png").lower()
        return tempfile.NamedTemporaryFile(suffix=ext, delete=False).name

    def model_json(self) -> dict[str, Any]:
        """The ``model`` block of every answer: which checkpoint answered, and how good it is."""
        s = checkpoint_state(self.model.serve_path)
        return {"name": self.model.name, "profile": self.model.profile_name, "checkpoint": s.get("checkpoint"),
                "modified": s.get("modified"), **self.quality()}


def probabilities_at_input(data: dict) -> tuple[np.ndarray, np.ndarray, geometry.FundusGeometry]:
    """Sigmoid of ``data["pred"]`` (m, S, S) logits restored to the input's pixel grid: (m, H, W)
    probabilities, zero outside the field of view; the FOV mask (H, W) and the geometry."""
    geom = geometry.FundusGeometry.from_dict(data["fundus_geometry"])
    logits = data["pred"]
    logits = logits if torch.is_tensor(logits) else torch.as_tensor(logits)
    work = torch.sigmoid(logits.float()).cpu().numpy()
    fov_w = (data["fov"][0].numpy() if torch.is_tensor(data["fov"]) else np.asarray(data["fov"])[0]) > 0.5
    work = work * fov_w[None]
    fov = data.get("fundus_source_fov")
    if fov is None:
        fov = geometry.to_original(fov_w.astype(np.uint8), geom, interpolation="nearest") > 0
    fov = np.asarray(fov, bool)
    return restore_channels(work, geom, fov, "linear"), fov, geom


def restore_channels(work: np.ndarray, geom: geometry.FundusGeometry, fov: np.ndarray,
                     interpolation: str = "linear") -> np.ndarray:
    """(m, S, S) non-negative working-resolution maps -> (m, H, W) float32 on the input grid, 0 outside the
    field of view ``fov`` (H, W) bool.

    What every infer task that answers full-size maps runs: each channel is restored straight into one
    uninitialised array (no per-channel full-size copy, no stack, no zero-fill of the whole array: to_original
    zeroes what lies outside the field of view's bounding box), the channels in parallel threads (OpenCV and
    numpy release the GIL), and the pixels of the box outside the field of view set to 0."""
    out = np.empty((work.shape[0], geom.height, geom.width), np.float32)
    y0, y1, x0, x1 = geom.bbox
    outside = ~fov[y0:y1, x0:x1]

    def restore(c: int) -> None:
        geometry.to_original(np.asarray(work[c]).astype(np.float32, copy=False), geom, interpolation=interpolation,
                             out=out[c])
        np.copyto(out[c, y0:y1, x0:x1], 0, where=outside)

    channel_map(restore, range(work.shape[0]))
    return out


_CHANNEL_POOL = None
_CHANNEL_THREAD_PREFIX = "mldr-channels"


def channel_pool():
    """Threads for per-channel work on full-size arrays within one request (as many as CPU cores, at most 4)."""
    global _CHANNEL_POOL
    if _CHANNEL_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _CHANNEL_POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                           thread_name_prefix=_CHANNEL_THREAD_PREFIX)
    return _CHANNEL_POOL


def channel_map(fn: Callable, items) -> list:
    """``[fn(x) for x in items]`` in the channel pool's threads, in order. Called from one of those threads (a
    per-channel step that itself splits its work), it runs inline: waiting there on the same bounded pool
    could leave every thread waiting on work queued behind it."""
    if threading.current_thread().name.startswith(_CHANNEL_THREAD_PREFIX):
        return [fn(x) for x in items]
    return list(channel_pool().map(fn, items))
