"""`twlr_inpaint` infer task: TWLR's stage 2, iterative severity regression (METHODS.md §4).

The stage-1 grader (`twlr` model) grades the image, its lesion saliency (of the lesions above ``tau``)
is thresholded, dilated and restricted to the field of view, only the new region is inpainted, and
the image is regraded, until one of the stopping rules of
:func:`monailabel_dr.fundus.severity_regression.severity_regression` holds. The loop runs at the profile's
``regression.size``; outputs are restored to the input geometry.

Request parameters (defaults from the profile's ``regression`` block): ``tau``, ``threshold``,
``dilation``, ``t_max``, ``min_new_fraction``, ``patience``, ``saliency`` (patch_text | gradcam),
``backend`` (ns | telea | unet | external), ``radius`` (OpenCV), and ``output``:

- ``label`` (default; segmentation type, Slicer shows it): the weak lesion masks, the union of the
  regions removed per lesion, as one label map (MA=1, HE=2, EX=3, SE=4);
- ``image``: the final "healthier" image (.png): the input photograph with only the removed regions
  replaced by the inpainted pixels;
- ``sequence``: every step's image as a multi-frame .tif (frame 0 = the input, working resolution);
- ``sequence_masks``: every step's newly inpainted region as a multi-frame .tif of label values.

JSON: the trajectory (per step: grade, grade probabilities, lesion probabilities, new area per
lesion), the stop reason, the settings used, and weak-mask areas per lesion at input resolution.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import cv2
import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferType

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.fundus import geometry, io
from monailabel_dr.fundus.inpainting import BACKENDS, make_inpainter
from monailabel_dr.fundus.lesions import GRADES, LESION_VALUES, LESIONS
from monailabel_dr.lib.errors import BadInput, ModelNotTrained
from monailabel_dr.lib.infers.base import load_weights, restore_channels
from monailabel_dr.lib.infers.twlr_vlm import TWLRGraderTask
from monailabel_dr.lib.params import Param
from monailabel_dr.networks.inpainter import build_inpainter
from monailabel_dr.fundus.severity_regression import Regression, RegressionSettings, severity_regression
from monailabel_dr.networks.twlr import SALIENCY_METHODS, grading_probe

OUTPUTS = ("label", "image", "sequence", "sequence_masks")
_LOOP_KEYS = tuple(f.name for f in dataclasses.fields(RegressionSettings))


class TWLRInpaintInfer(TWLRGraderTask):
    # the loop's settings (RegressionSettings checks them again, with the profile's defaults filled in)
    params = {"tau": Param.number(0, 1, low_open=True, high_open=True),
              "threshold": Param.number(0, 1, low_open=True, high_open=True),
              "dilation": Param.integer(0, 64), "t_max": Param.integer(1, 50),
              "min_new_fraction": Param.number(0, 1), "patience": Param.integer(1, 50),
              "saliency": Param.choice(*SALIENCY_METHODS), "backend": Param.choice(*BACKENDS),
              "radius": Param.integer(1, 50), "output": Param.choice(*OUTPUTS)}
    result_extensions = (*io.LABEL_EXTENSIONS, ".tif", ".tiff")

    def __init__(self, name: str, model: ModelSettings, app: AppSettings):
        self.regression = dict(model.options.get("regression") or {})
        defaults = {k: self.regression[k] for k in (*_LOOP_KEYS, "backend", "radius") if k in self.regression}
        super().__init__(
            name=name, model=model, app=app, network=None, type=InferType.SEGMENTATION,
            labels={les: LESION_VALUES[les] for les in LESIONS},
            description="TWLR stage 2: iterative saliency-guided inpainting towards a healthier eye; weak lesion masks",
            config={**defaults, "output": "label", "result_extension": ".png"},
        )
        self._inpainters: dict = {}

    def working_size(self) -> int:
        return int(self.regression.get("size", self.model.image_size))

    # ------------------------------------------------------------------ settings
    def settings(self, data: dict) -> tuple[RegressionSettings, str, int]:
        values = {k: data.get(k, self.regression.get(k)) for k in _LOOP_KEYS}
        values = {k: v for k, v in values.items() if v is not None and v != ""}
        try:
            s = RegressionSettings.from_dict(values, SALIENCY_METHODS)
        except (TypeError, ValueError) as e:
            raise BadInput(f"twlr_inpaint settings: {e}") from e
        backend = str(data.get("backend") or self.regression.get("backend", "ns")).lower()
        if backend not in BACKENDS:
            raise BadInput(f"backend must be one of {BACKENDS}, got {backend!r}")
        try:
            radius = int(data.get("radius", self.regression.get("radius", 5)))
        except (TypeError, ValueError) as e:
            raise BadInput("radius must be an integer") from e
        if not 1 <= radius <= 50:
            raise BadInput("radius must be in 1..50")
        return s, backend, radius

    def inpainter_network(self, backend: str, device: str):
        if backend == "external":
            path = self.app_settings.get("twlr_inpainter_external")
            if not path or not os.path.isfile(str(path)):
                raise ModelNotTrained("the external inpainting backend needs a TorchScript file: "
                                      "--conf twlr_inpainter_external /path/to/inpainter.pt")
            key = ("external", str(path), os.stat(str(path)).st_mtime, device)
            if key not in self._inpainters:
                self._inpainters[key] = torch.jit.load(str(path), map_location=device).eval()
            return self._inpainters[key]
        m = self.app_settings.models.get("twlr_inpainter")
        if m is None:
            raise ModelNotTrained("the unet inpainting backend needs the twlr_inpainter model: serve it "
                                  "(--conf models ...,twlr_inpainter) and train it (POST /train/twlr_inpainter)")
        path = m.serve_path
        if not os.path.isfile(path):
            raise ModelNotTrained(f"twlr_inpainter has no trained weights yet (expected {path}): "
                                  "POST /train/twlr_inpainter, or use backend ns / telea")
        key = ("unet", path, os.stat(path).st_mtime, device)
        if key not in self._inpainters:
            try:
                net = load_weights(build_inpainter(m.network), path, device)
            except Exception as e:
                raise ModelNotTrained(f"twlr_inpainter checkpoint {path} does not fit its profile: {e}") from e
            self._inpainters = {key: net.to(device).eval()}
        return self._inpainters[key]

    # ------------------------------------------------------------------ run
    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        settings, backend, radius = self.settings(data)
        kind = str(data.get("output", "label")).lower()
        if kind not in OUTPUTS:
            raise BadInput(f"output must be one of {OUTPUTS}, got {kind!r}")
        grader = self._get_network(device, data)
        net = self.inpainter_network(backend, device) if backend in ("unet", "external") else None
        inpaint = make_inpainter(backend, radius, net, device)
        image = torch.as_tensor(data["image"]).float().clamp(0, 1)
        work = (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        fov = torch.as_tensor(data["fov"])[0].numpy() > 0.5
        t0 = time.time()
        data["regression"] = severity_regression(grading_probe(grader, settings.saliency, device), work, fov, inpaint, settings)
        data["regression_settings"] = {**dataclasses.asdict(settings), "backend": backend, "radius": radius,
                                       "size": self.working_size()}
        data["seconds_loop"] = round(time.time() - t0, 3)
        return data

    def full_resolution(self, data: dict, final_image: bool = False) -> dict:
        """The loop's results at the input's pixel grid: ``weak_label`` (H, W) uint8 (1-4), ``score`` (4, H, W)
        (the weak masks as a ranking, :attr:`Regression.score`), ``fov`` (H, W) bool and, when asked, the
        final image: the input photograph with only the removed regions replaced by inpainted pixels."""
        reg = data["regression"]
        geom = geometry.FundusGeometry.from_dict(data["fundus_geometry"])
        weak_label = np.zeros(reg.weak.shape[1:], np.uint8)
        for k in range(len(LESIONS) - 1, -1, -1):
            weak_label[reg.weak[k]] = LESION_VALUES[LESIONS[k]]
        weak_full = geometry.to_original(weak_label, geom, interpolation="nearest")
        fov = data.get("fundus_source_fov")
        if fov is None:
            fov_w = torch.as_tensor(data["fov"])[0].numpy() > 0.5
            fov = geometry.to_original(fov_w.astype(np.uint8), geom, interpolation="nearest") > 0
        weak_full[~fov] = 0
        # nearest, like the label map, so that score > 0.5 is exactly the weak mask at input resolution too
        score = restore_channels(np.asarray(reg.score, np.float32), geom, np.asarray(fov, bool), "nearest")
        out = {"weak_label": weak_full, "score": score, "fov": fov, "geometry": geom}
        if final_image:
            original = io.read_image(data["image_path"], max_pixels=self.app_settings.max_image_pixels,
                                     min_side=self.app_settings.min_image_side)
            original = (io.to_rgb_float(original) * 255 + 0.5).astype(np.uint8)
            inpainted = geometry.to_original(reg.images[-1], geom, interpolation="linear")
            removed = weak_full > 0
            final = original.copy()
            final[removed] = inpainted[removed]
            out["original"], out["final"] = original, final
        return out

    def regress(self, image_path: str, final_image: bool = False, **params) -> tuple[dict, Regression]:
        """One image file through the same pipeline as /infer: :meth:`full_resolution` and the loop's record."""
        _, data = self({**params, "image": image_path, "skip_writer": True})
        return self.full_resolution(data, final_image=final_image), data["regression"]

    def predict(self, image_path: str, **params) -> tuple[np.ndarray, np.ndarray]:
        """The contract of the lesion infer tasks (what ``evaluate`` scores): (4, H, W) maps and the FOV.
        Here the maps are the weak masks as a ranking (:attr:`Regression.score`; > 0.5 = weak mask)."""
        full, _ = self.regress(image_path, **params)
        return full["score"], full["fov"]

    def writer(self, data, extension=None, dtype=None):
        reg = data["regression"]
        kind = str(data.get("output", "label")).lower()
        path = self.result_path(data)
        full = self.full_resolution(data, final_image=kind == "image")
        geom, weak_full = full["geometry"], full["weak_label"]
        if kind == "label":
            if not path.endswith(io.LABEL_EXTENSIONS):
                raise BadInput(f"label maps are written as {io.LABEL_EXTENSIONS}")
            io.write_label(path, weak_full)
        elif kind == "image":
            if not path.endswith((".png", ".tif", ".tiff")):
                raise BadInput("the final image is written as .png or .tif: set result_extension")
            io.write_image(path, full["final"])
        else:
            if not path.endswith((".tif", ".tiff")):
                raise BadInput(f"{kind} is written as a multi-frame .tif: set result_extension=.tif")
            if kind == "sequence":
                frames = [cv2.cvtColor(im, cv2.COLOR_RGB2BGR) for im in reg.images]
            else:   # the masks hold lesion index + 1, which is LESION_VALUES; frame 0 (the input) has none
                frames = [np.zeros(reg.weak.shape[1:], np.uint8), *reg.masks]
            if not cv2.imwritemulti(path, frames):
                raise RuntimeError(f"could not write {path}")
        steps = [dataclasses.asdict(s) | {"grade_name": GRADES[s.grade]} for s in reg.steps]
        result = {
            "trajectory": steps,
            "grades": [s.grade for s in reg.steps],
            "grade_drop": reg.steps[0].grade - reg.steps[-1].grade,
            "steps": len(reg.steps) - 1,
            "stop_reason": reg.stop_reason,
            "weak_mask_area_px": {les: int((weak_full == LESION_VALUES[les]).sum()) for les in LESIONS},
            "label_values": {les: LESION_VALUES[les] for les in LESIONS},
            "settings": data["regression_settings"],
            "output": kind,
            "image_size": [geom.height, geom.width],
            "seconds_loop": data["seconds_loop"],
            "model": self.model_json(),
        }
        return path, result
