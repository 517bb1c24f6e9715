"""``disagreement``: how much the app's lesion localisers disagree on an image (row ``lesion_seg``).

Members, among those served and trained (at least two, else 409):

- ``cam``: the grader's CAM region proposals (the ``cam`` infer of row ``grading``, target
  referable DR, ``--conf cam_method``): the CAM min-max normalised inside the field of view,
  restored to the input grid and thresholded at ``--conf cam_threshold`` (0.65): the pixels
  of the proposals ``/infer/cam`` reports. Gated by the grader's own verdict (``cam_gate``, default true): when
  it calls the image not referable (P < 0.5) the mask is empty, because a min-max normalised
  CAM always has a region >= 0.65 and would otherwise disagree with every lesion-free map;
- ``lesion_seg``: Lesion-Net, any lesion with probability >= ``threshold`` (0.5);
- ``lesion_sam``: TP-DRSeg prompted with all four lesions, any lesion >= ``threshold``.

Each is the member's ``/infer`` path (same checkpoint selection, pre-transforms, geometry
restoration) at the input's pixel grid. Stored under ``score_disagreement``:
``disagreement`` (**the ranking key**): the mean over member pairs of ``1 - Dice`` (two
empty masks agree: Dice 1), ``pair_dice``, ``members``, ``mask_pixels``. The score is current
while the set of trained members and each one's checkpoint are unchanged (``models``).

On the ``lesion_seg`` row because the score asks "which image's lesions should be drawn
next": it needs a lesion model, and serving ``lesion_seg`` with either other member is enough.
"""

from __future__ import annotations

import numpy as np
import torch

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.fundus import geometry
from monailabel_dr.lib.activelearning.common import (
    FundusScoringMethod,
    ScoreStrategy,
    bool_param,
    find_infer,
    float_param,
    model_identity,
    shared_infer_task,
    sig,
)
from monailabel_dr.lib.errors import BadInput, ModelNotTrained
from monailabel_dr.lib.infers.cam import CAMInfer
from monailabel_dr.lib.infers.lesion_sam import LesionSamInfer
from monailabel_dr.lib.infers.lesion_seg import LesionSegInfer
from monailabel_dr.metrics.lesions import CAM_THRESHOLD
from monailabel_dr.metrics.uncertainty import pairwise_disagreement
from monailabel_dr.networks.cam_grader import split_outputs

MEMBERS = {"cam": CAMInfer, "lesion_seg": LesionSegInfer, "lesion_sam": LesionSamInfer}


def cam_mask(data: dict, threshold: float) -> np.ndarray:
    """The CAM proposal pixels at the input grid, normalised as ``CAMInfer.writer`` does (min-max inside
    the working FOV, restored with the recorded geometry, zero outside the input FOV). The writer only
    returns a quantised label file and box summaries, so these few lines repeat its normalisation."""
    geom = geometry.FundusGeometry.from_dict(data["fundus_geometry"])
    fov = data["fov"][0].numpy() > 0.5 if torch.is_tensor(data["fov"]) else np.asarray(data["fov"])[0] > 0.5
    cam = np.asarray(data["cam_raw"], dtype=np.float32)
    inside = cam[fov] if fov.any() else cam.ravel()
    lo, hi = float(inside.min()), float(inside.max())
    norm = np.zeros_like(cam) if hi - lo < 1e-12 else np.clip((cam - lo) / (hi - lo), 0.0, 1.0)
    norm[~fov] = 0.0
    full = geometry.to_original(norm, geom, interpolation="linear")
    return (full >= threshold) & np.asarray(data["fundus_source_fov"], dtype=bool)


def _no_landmarks(task) -> None:
    if isinstance(task, LesionSegInfer):
        task.detect_landmarks = False


class DisagreementScoring(FundusScoringMethod):
    name = "disagreement"
    rank_key = "disagreement"

    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app, "Disagreement of the lesion localisers (CAM proposals, lesion_seg, lesion_sam): "
                                     "mean pairwise 1 - Dice of their lesion masks (ranking key disagreement)")

    def members(self) -> dict[str, tuple[str, str]]:
        """Served members: {member: (row, infer name)}."""
        out = {}
        for member, cls in MEMBERS.items():
            where = find_infer(self.app_settings, cls)
            if where is not None:
                out[member] = where
        return out

    def identity(self) -> dict:
        served = self.members()
        trained = {m: model_identity(self.app_settings.models[row]) for m, (row, _) in served.items()}
        ok = {m: v for m, v in trained.items() if v is not None}
        if len(ok) < 2:
            missing = [f"{m} (model '{served[m][0]}', expected {self.app_settings.models[served[m][0]].serve_path})"
                       for m in served if m not in ok]
            not_served = [m for m in MEMBERS if m not in served]
            raise ModelNotTrained(
                f"scoring method '{self.name}' compares the lesion masks of at least two trained models among "
                f"{list(MEMBERS)}; trained: {sorted(ok) or 'none'}; untrained: {missing or 'none'}; "
                f"not served (--conf models): {not_served or 'none'}. Train one more (`POST /train/<model>`) "
                f"or give a checkpoint (`--conf <model>_checkpoint`). It never scores with random weights."
            )
        return {served[m][0]: v for m, v in ok.items()}

    def prepare(self, request: dict) -> dict:
        threshold = float_param(request, "threshold", 0.5, 0.0, 1.0)
        cam_threshold = float_param(request, "cam_threshold", float(self.app_settings.get("cam_threshold", CAM_THRESHOLD)), 0.0, 1.0)
        sam_mode = str(request.get("sam_mode") or "faithful").lower()
        if sam_mode not in ("faithful", "fast"):
            raise BadInput(f"sam_mode must be faithful or fast, got {sam_mode!r}")
        return {"threshold": threshold, "cam_threshold": cam_threshold, "cam_gate": bool_param(request, "cam_gate", True),
                "sam_mode": sam_mode, "device": self.device(request)}

    def _mask(self, member: str, row: str, infer: str, image_path: str, params: dict) -> tuple[np.ndarray, dict]:
        task = shared_infer_task(self.app_settings, row, infer, configure=_no_landmarks)
        device = params["device"]
        if member == "cam":
            _, data = task({"image": image_path, "skip_writer": True, "target": "referable",
                            "device": device})
            referable = float(split_outputs(data["logits"].float())["referable"])
            gated = params["cam_gate"] and referable < 0.5
            mask = cam_mask(data, params["cam_threshold"])
            if gated:
                mask = np.zeros_like(mask)
            return mask, {"referable_probability": round(referable, 4), "gated": bool(gated)}
        extra = {"mode": params["sam_mode"]} if member == "lesion_sam" else {}
        probs, _ = task.predict(image_path, device=device, **extra)
        return (probs >= params["threshold"]).any(axis=0), {}

    def score_image(self, image_id: str, image_path: str, params: dict) -> dict:
        trained_rows = set(params["identity"])
        masks, notes = {}, {}
        for member, (row, infer) in self.members().items():
            if row in trained_rows:
                masks[member], note = self._mask(member, row, infer, image_path, params)
                if note:
                    notes[member] = note
        value, pairs = pairwise_disagreement(masks)
        return {
            "disagreement": sig(value),
            "pair_dice": {k: sig(v) for k, v in pairs.items()},
            "members": sorted(masks),
            "mask_pixels": {m: int(v.sum()) for m, v in masks.items()},
            "threshold": params["threshold"],
            "cam_threshold": params["cam_threshold"],
            **({"cam": notes["cam"]} if "cam" in notes else {}),
        }


class DisagreementStrategy(ScoreStrategy):
    name = "disagreement"
    scoring_class = DisagreementScoring

    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app, "Unlabelled image on which the trained lesion localisers disagree most (disagreement)")
