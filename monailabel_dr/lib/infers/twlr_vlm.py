"""`twlr_vlm` infer task: TWLR's stage-1 vision-language grader.

JSON as the `grading` task (grade probabilities, referable from the grade softmax, lesion presence).
With ``saliency`` = ``patch_text`` (patch-text similarity) or ``gradcam`` (Grad-CAM on the patch-token
grid), it also returns the per-lesion saliency maps at input geometry as a multichannel .nrrd /
.nii.gz (MA, HE, EX, SE; min-max normalised per map, 0 outside the field of view).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monailabel.interfaces.tasks.infer_v2 import InferType

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.fundus import geometry, io
from monailabel_dr.fundus.lesions import GRADES, LESIONS
from monailabel_dr.lib.errors import BadInput, ModelNotTrained
from monailabel_dr.lib.infers.base import FundusInferTask, restore_channels
from monailabel_dr.lib.params import Param
from monailabel_dr.lib.infers.grading import grading_result
from monailabel_dr.networks.clip_towers import WeightsUnavailable
from monailabel_dr.networks.twlr import SALIENCY_METHODS, TWLRConfig, build_twlr_grader
from monailabel_dr.transforms import LoadFundusd


class TWLRGraderTask(FundusInferTask):
    """Shared by the TWLR tasks: [0, 1] RGB input, the stage-1 grader built on first use (the paper
    profile loads CLIP weights then) and loaded with the published checkpoint."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        TWLRConfig.from_dict(self.model.network)   # the network block checked now (a typo fails the start, not a request)

    def pre_transforms(self, data=None):
        return [LoadFundusd(keys="image", size=self.working_size(), max_pixels=self.app_settings.max_image_pixels,
                            min_side=self.app_settings.min_image_side, require_colour=self.require_colour,
                            keep_source_fov=True)]

    def working_size(self) -> int:
        return self.model.image_size

    def load_network(self, path: str, device: str):
        base = self._networks.get("base")
        if base is None:
            try:
                base = self._networks["base"] = build_twlr_grader(self.model.network, image_size=self.model.image_size)
            except WeightsUnavailable as e:
                raise ModelNotTrained(f"twlr ({self.model.profile_name} profile) cannot load its CLIP weights: {e}") from e
        network = copy.deepcopy(base)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            network.load_state_dict(ckpt.get("model", ckpt), strict=True)
        except Exception as e:
            raise self.unusable_checkpoint(path, e) from e
        return network


class TWLRVLMInfer(TWLRGraderTask):
    params = {"saliency": Param.choice("", *SALIENCY_METHODS)}
    result_extensions = (".png", *io.MULTICHANNEL_EXTENSIONS)

    def __init__(self, name: str, model: ModelSettings, app: AppSettings):
        super().__init__(
            name=name, model=model, app=app, network=None, type=InferType.CLASSIFICATION,
            labels={g: i for i, g in enumerate(GRADES)},
            description="TWLR stage 1: grade and lesion presence by image-text similarity; per-lesion saliency on request",
            config={"saliency": "", "result_extension": ".nrrd"},
        )

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        method = str(data.get("saliency") or "").lower()
        if method and method not in SALIENCY_METHODS:
            raise BadInput(f"saliency must be one of {SALIENCY_METHODS} (or empty), got {method!r}")
        network = self._get_network(device, data)
        image = torch.as_tensor(data["image"])[None].float().to(device)
        if method:
            sal, logits = network.saliency(image, method)
            data["saliency_maps"] = sal[0].float().cpu()
        else:
            with torch.no_grad():
                logits = network(image)
        data["pred"] = logits.float().cpu()
        return data

    def writer(self, data, extension=None, dtype=None):
        result = grading_result(data["pred"], data)
        result["model"] = self.model_json()
        sal = data.get("saliency_maps")
        if sal is None:
            return None, result
        path = self.result_path(data)
        if not path.endswith(io.MULTICHANNEL_EXTENSIONS):
            raise BadInput("saliency maps are written as .nrrd or .nii.gz: set result_extension")
        geom = geometry.FundusGeometry.from_dict(data["fundus_geometry"])
        s = self.model.image_size
        work = F.interpolate(sal[None], size=(s, s), mode="bilinear", align_corners=False)[0].numpy()
        fov = data.get("fundus_source_fov")
        if fov is not None:
            maps = restore_channels(work, geom, np.asarray(fov, bool))   # saliency is in [0, 1]
        else:
            maps = np.stack([geometry.to_original(m, geom, interpolation="linear") for m in work]).astype(np.float32)
        io.write_multichannel(path, maps, list(LESIONS))
        result["saliency"] = {"method": str(data["saliency"]).lower(), "channels": list(LESIONS)}
        return path, result
