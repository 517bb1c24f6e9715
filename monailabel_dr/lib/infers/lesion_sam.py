"""`lesion_sam` infer task: TP-DRSeg, a lesion named or described in words -> mask, at the input geometry.

Request parameters (besides MONAI Label's ``image`` / ``result_extension``):

- ``lesion``: ``MA``, ``HE``, ``EX``, ``SE``, a comma list or list of them, or ``all`` (the default
  when no ``text`` is given). Each uses its configured explicit description(s)
  (``configs/lesion_descriptions.yaml``; the bare names with ``--conf lesion_sam_set
  network.text_mode=name``).
- ``text``: a free description or a list of them ("yellow waxy spots near the macula"); each is
  encoded by CLIP into its own prior, and uses the prompt-generator class of the lesion whose
  description it is closest to (reported in the JSON).
- ``foreground`` / ``background``: refinement points ``[[x, y], ...]`` in input-image pixels
  (column, row; a third coordinate, as 3D Slicer sends, is ignored); ``roi``: a box
  ``[x0, y0, x1, y1]`` in input pixels. They go through SAM's own prompt encoder and are added to
  the text-derived prompts of every requested lesion.
- ``mode``: ``faithful`` (the paper: the image encoder runs once per prompt, with that prompt's
  prior in every injector) or ``fast`` (one encoder pass with the pixel-wise maximum of all the
  prompts' priors in the injectors, then the prompt generator and mask decoder once per prompt
  with its own prior). ``fast`` costs about one encoder pass whatever the number of prompts; its
  masks differ from ``faithful`` where another prompt's prior changes the shared encoder features.
- ``threshold`` (0.5); ``output``: ``label`` (one label map: MA=1, HE=2, EX=3, SE=4, free-text
  prompts 5, 6, ... in order; where prompts overlap the most probable wins), ``probabilities``
  (one channel per prompt, .nrrd / .nii.gz) or ``prior`` (the explicit prior maps P_e, one channel
  per prompt, .nrrd / .nii.gz: the explanation of what CLIP matched to the text).

JSON: per prompt the text(s) used, the class, presence (max probability in the field of view),
area in input pixels, connected components, SAM's predicted IoU; the label values; mode; sizes.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monailabel.interfaces.tasks.infer_v2 import InferType

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.fundus import geometry, io
from monailabel_dr.fundus.lesions import LESION_VALUES, LESIONS
from monailabel_dr.lib.errors import BadInput, ModelNotTrained
from monailabel_dr.lib.infers.base import FundusInferTask, channel_map, probabilities_at_input
from monailabel_dr.lib.params import Param
from monailabel_dr.lib.infers.lesion_seg import label_map_from_probs, map_components
from monailabel_dr.networks.tp_drseg import TPDRSegConfig, WeightsUnavailable, build_tp_drseg
from monailabel_dr.transforms import LoadFundusd

MODES = ("faithful", "fast")
OUTPUTS = ("label", "probabilities", "prior")
MAX_TEXT_PROMPTS = 8
MAX_TEXT_CHARS = 300


def _as_list(v, name: str) -> list:
    if v is None or v == "":
        return []
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, (list, tuple)):
        return list(v)
    raise BadInput(f"parameter {name!r}: expected a string or a list, got {type(v).__name__}")


def parse_lesions(value, has_text: bool) -> list[int]:
    items = [str(x).strip().upper() for x in _as_list(value, "lesion")]
    if not items:
        return [] if has_text else list(range(len(LESIONS)))
    if "ALL" in items:
        return list(range(len(LESIONS)))
    bad = [x for x in items if x not in LESIONS]
    if bad:
        raise BadInput(f"lesion {bad} unknown: use {', '.join(LESIONS)} or all")
    return sorted({LESIONS.index(x) for x in items})


def parse_texts(value) -> list[str]:
    if value is None or value == "":
        return []
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise BadInput("text must be a string or a list of strings")
    texts = [t.strip() for t in texts if t.strip()]
    if len(texts) > MAX_TEXT_PROMPTS:
        raise BadInput(f"at most {MAX_TEXT_PROMPTS} text prompts per request")
    if any(len(t) > MAX_TEXT_CHARS for t in texts):
        raise BadInput(f"a text prompt is limited to {MAX_TEXT_CHARS} characters")
    return texts


def parse_points(value, name: str, geom: geometry.FundusGeometry) -> np.ndarray:
    """[[x, y(, z)], ...] in input pixels -> (N, 2) working-image (x, y)."""
    if value is None or value == [] or value == "":
        return np.zeros((0, 2), np.float32)
    try:
        pts = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BadInput(f"{name} must be a list of [x, y] points") from e
    if pts.ndim == 1 and pts.size in (2, 3):
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] not in (2, 3) or not np.all(np.isfinite(pts)):
        raise BadInput(f"{name} must be a list of [x, y] points (input-image pixels)")
    pts = pts[:, :2]
    if np.any(pts < 0) or np.any(pts[:, 0] > geom.width - 1) or np.any(pts[:, 1] > geom.height - 1):
        raise BadInput(f"{name}: a point lies outside the {geom.width}x{geom.height} image")
    m = geom.matrix()
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def parse_roi(value, geom: geometry.FundusGeometry) -> np.ndarray | None:
    if value is None or value == [] or value == "":
        return None
    try:
        box = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise BadInput("roi must be [x0, y0, x1, y1]") from e
    if box.size != 4 or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        raise BadInput("roi must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0 (input-image pixels)")
    corners = parse_points([[box[0], box[1]], [box[2], box[3]]], "roi", geom)
    return corners.reshape(4)


class LesionSamInfer(FundusInferTask):
    # lesion / text / points / roi are parsed against the image by the functions above (422 on bad ones)
    params = {"threshold": Param.number(0, 1), "output": Param.choice(*OUTPUTS), "mode": Param.choice(*MODES),
              "lesion": Param.any(), "text": Param.any(), "foreground": Param.any(), "background": Param.any(),
              "roi": Param.any()}
    def __init__(self, name: str, model: ModelSettings, app: AppSettings):
        TPDRSegConfig.from_dict(model.network)   # the network block checked now (a typo fails the start, not a request)
        super().__init__(
            name=name,
            model=model,
            app=app,
            network=None,   # built on first use: the paper profile loads SAM / CLIP weights then
            type=InferType.SEGMENTATION,
            labels={les: LESION_VALUES[les] for les in LESIONS},
            description="TP-DRSeg: lesion (MA/HE/EX/SE/all) or free-text prompt -> mask; SAM points/box refine",
            config={"lesion": "", "text": "", "mode": "faithful", "threshold": 0.5, "output": "label",
                    "result_extension": ".png"},
        )

    # ------------------------------------------------------------------ transforms
    def pre_transforms(self, data=None):
        # TP-DRSeg normalises with SAM's and CLIP's own pixel statistics: the image stays in [0, 1].
        return [
            LoadFundusd(keys="image", size=self.model.image_size, max_pixels=self.app_settings.max_image_pixels,
                        min_side=self.app_settings.min_image_side, require_colour=self.require_colour,
                        keep_source_fov=True),
        ]

    # ------------------------------------------------------------------ network
    def load_network(self, path: str, device: str):
        """The profile's model (frozen SAM / CLIP weights loaded once) with the checkpoint's trained tensors."""
        base = self._networks.get("base")
        if base is None:
            try:
                base = self._networks["base"] = build_tp_drseg(self.model.network, image_size=self.model.image_size)
            except WeightsUnavailable as e:
                raise ModelNotTrained(f"lesion_sam ({self.model.profile_name} profile) cannot load its frozen "
                                      f"weights: {e}") from e
        network = copy.deepcopy(base)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            state = ckpt.get("model", ckpt)
            expected = set(network.trainable_state_dict())
            missing = expected - set(state)
            unexpected = set(state) - set(network.state_dict())
            if missing or unexpected:
                raise ValueError(f"{len(missing)} trained tensors missing (e.g. {sorted(missing)[:3]}), "
                                 f"{len(unexpected)} unknown (e.g. {sorted(unexpected)[:3]})")
            src = ckpt.get("weights_source")
            mine = network.weights_source()
            if src and (src.get("sam"), src.get("clip")) != (mine.get("sam"), mine.get("clip")):
                raise ValueError(f"it was trained on frozen weights {src}, this profile loads {mine}")
            network.load_state_dict(state, strict=False)
        except Exception as e:
            raise self.unusable_checkpoint(path, e) from e
        return network

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        geom = geometry.FundusGeometry.from_dict(data["fundus_geometry"])
        texts = parse_texts(data.get("text"))
        lesions = parse_lesions(data.get("lesion"), has_text=bool(texts))
        mode = str(data.get("mode", "faithful")).lower()
        if mode not in MODES:
            raise BadInput(f"mode must be one of {MODES}, got {mode!r}")
        fg = parse_points(data.get("foreground"), "foreground", geom)
        bg = parse_points(data.get("background"), "background", geom)
        roi = parse_roi(data.get("roi"), geom)
        points = labels = None
        if len(fg) or len(bg):
            points = np.concatenate([fg, bg])
            labels = np.array([1] * len(fg) + [0] * len(bg), np.int64)
        network = self._get_network(device, data)
        image = data["image"]
        image = (image if torch.is_tensor(image) else torch.as_tensor(image))[None].float().to(device)
        t0 = time.time()
        with torch.no_grad():
            out = network(image, lesions=lesions, texts=texts, mode=mode, points=points, point_labels=labels, boxes=roi)
        data["pred"] = out["logits"].float().cpu()             # (K, S, S): one map per prompt
        data["prompt_prior"] = out["prior"].float().cpu()
        data["prompt_info"] = {"lesions": lesions, "texts": texts, "classes": out["classes"], "used": out["texts"],
                               "iou": out["iou"].float().cpu().tolist(), "mode": mode,
                               "refinement": {"foreground": int(len(fg)), "background": int(len(bg)),
                                              "roi": roi is not None},
                               "seconds_network": round(time.time() - t0, 3)}
        return data

    # ------------------------------------------------------------------ output
    full_resolution = staticmethod(probabilities_at_input)

    def prior_full_resolution(self, data, geom) -> np.ndarray:
        prior = data["prompt_prior"][:, None]
        s = self.model.image_size
        work = F.interpolate(prior, size=(s, s), mode="bilinear", align_corners=False)[:, 0].numpy()
        return np.stack([geometry.to_original(c, geom, interpolation="linear") for c in work]).astype(np.float32)

    def predict(self, image_path: str, **params) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (4, H, W) of every lesion (LESIONS order) and the FOV mask, as /infer computes them."""
        request = {"image": image_path, "skip_writer": True, "lesion": "all", "text": ""}
        request.update(params)
        _, data = self(request)
        probs, fov, _ = self.full_resolution(data)
        return probs, fov

    def writer(self, data, extension=None, dtype=None):
        probs, fov, geom = self.full_resolution(data)
        info = data["prompt_info"]
        threshold = float(data.get("threshold", 0.5))
        kind = str(data.get("output", "label")).lower()
        if kind not in OUTPUTS:
            raise BadInput(f"output must be one of {OUTPUTS}, got {kind!r}")
        names = [LESIONS[k] for k in info["lesions"]] + [f"text_{i + 1}" for i in range(len(info["texts"]))]
        values = [LESION_VALUES[LESIONS[k]] for k in info["lesions"]] + \
                 [len(LESIONS) + 1 + i for i in range(len(info["texts"]))]
        path = self.result_path(data)
        if kind in ("probabilities", "prior"):
            if not path.endswith(io.MULTICHANNEL_EXTENSIONS):
                raise BadInput(f"{kind} maps are written as .nrrd or .nii.gz: set result_extension")
            maps = probs if kind == "probabilities" else self.prior_full_resolution(data, geom)
            io.write_multichannel(path, maps, names)
        else:
            best = label_map_from_probs(probs, threshold, geom.bbox)   # 1..K (prompt order), 0 = none
            lut = np.array([0] + values, dtype=np.uint8)
            io.write_label(path, lut[best])
        prompts = []
        # the prompts' components in parallel threads (OpenCV's labelling releases the GIL), inside the FOV's box
        all_comps = channel_map(lambda i: map_components(probs[i], threshold, fov, geom.bbox), range(len(names)))
        for i, name in enumerate(names):
            comps = all_comps[i]
            prompts.append({
                "name": name,
                "label_value": values[i],
                "texts": info["used"][i],
                "class": LESIONS[info["classes"][i]],
                "presence_probability": round(float(probs[i].max()), 4),
                "area_px": int(comps.areas.sum()),
                "components": comps.n,
                "predicted_iou": round(float(info["iou"][i]), 4),
            })
        result = {
            "prompts": prompts,
            "lesions": {p["name"]: {k: p[k] for k in ("presence_probability", "area_px", "components")}
                        for p in prompts if p["name"] in LESIONS},
            "label_values": {p["name"]: p["label_value"] for p in prompts},
            "mode": info["mode"],
            "refinement": info["refinement"],
            "threshold": threshold,
            "output": kind,
            "overlap_rule": "highest probability among prompts >= threshold",
            "working_size": self.model.image_size,
            "image_size": [geom.height, geom.width],
            "seconds_network": info["seconds_network"],
            "model": self.model_json(),
        }
        return path, result
