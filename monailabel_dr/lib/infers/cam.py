"""`cam` infer task: class activation map of the grader and lesion region proposals.

Follows the CAM paper (Gondal et al.): the grader's GAP + linear head gives
``CAM_c = sum_k w_k^c A_k`` on its high-resolution last feature map; the map is
upsampled to the working size, min-max normalised to [0, 1] inside the field of
view, restored to the input geometry, thresholded at 0.65, and each connected
component becomes a region proposal whose score is its maximum CAM value.

Output label (segmentation type, so 3D Slicer shows it): the normalised map
quantised into levels (``cam_levels``, default edges 0.2/0.4/0.65/0.8 -> values
1-4; value >= 3 is the proposal threshold). JSON: target class and probability,
proposals with score, bounding box [x0, y0, x1, y1] (x1/y1 exclusive, input
pixels), area and centroid.

``method=gradcam`` uses ``monai.visualize.GradCAM`` on the same layer instead.
Request parameters: ``target`` (``referable`` - the paper's RDR class, default;
``predicted``; a grade ``0``-``4``; or a lesion ``MA``/``HE``/``EX``/``SE``),
``method``, ``threshold``, ``result_extension`` (.png/.nrrd/.nii.gz).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from monailabel.interfaces.tasks.infer_v2 import InferType
from scipy import ndimage

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.fundus import geometry, io
from monailabel_dr.fundus.lesions import GRADES, LESIONS
from monailabel_dr.lib.errors import BadInput
from monailabel_dr.lib.infers.base import FundusInferTask
from monailabel_dr.lib.params import Param
from monailabel_dr.networks.attention_grader import build_grader
from monailabel_dr.metrics.lesions import CAM_THRESHOLD, proposals_from_map
from monailabel_dr.networks.cam_grader import LESION_SLICE, N_GRADES, REFERABLE_INDEX, split_outputs

# quantisation edges of the served CAM map; the third is the proposal threshold, so level >= 3 is the proposed region
DEFAULT_LEVELS = (0.2, 0.4, CAM_THRESHOLD, 0.8)
LEVEL_COLORS = [(0, 90, 255), (0, 200, 120), (255, 170, 0), (255, 0, 0)]


def level_names(edges) -> dict[str, int]:
    return {f"CAM >= {e:.2f}": i + 1 for i, e in enumerate(edges)}


def quantise(cam: np.ndarray, edges) -> np.ndarray:
    """Label map: value i+1 where cam >= edges[i] (the highest edge reached)."""
    cam = np.asarray(cam)
    # edges in the map's own precision, so a value exactly at an edge counts as reaching it
    edges = np.asarray(edges, dtype=cam.dtype if cam.dtype.kind == "f" else np.float64)
    return np.digitize(cam, edges, right=False).astype(np.uint8)


def region_proposals(cam: np.ndarray, threshold: float = CAM_THRESHOLD) -> list[dict]:
    """The paper's proposals (:func:`monailabel_dr.metrics.lesions.proposals_from_map`: 8-connected components
    of cam >= threshold, scored by their maximum) as JSON, highest score first."""
    labels, scores = proposals_from_map(cam, threshold=threshold)
    n = int(scores.size)
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones(labels.shape, dtype=np.int64), labels, idx)
    centroids = ndimage.center_of_mass(labels > 0, labels, idx)
    boxes = ndimage.find_objects(labels)
    out = []
    for i in range(n):
        ys, xs = boxes[i]
        out.append({
            "score": round(float(scores[i]), 4),
            "bbox": [int(xs.start), int(ys.start), int(xs.stop), int(ys.stop)],
            "area_px": int(areas[i]),
            "centroid": [round(float(centroids[i][1]), 1), round(float(centroids[i][0]), 1)],
        })
    out.sort(key=lambda r: -r["score"])
    for rank, r in enumerate(out):
        r["id"] = rank + 1
    return out


def resolve_target(target, logits: torch.Tensor) -> tuple[int, str]:
    """Map the request's `target` to an output index of the grader."""
    t = str(target if target is not None else "referable").strip()
    if t.lower() == "referable":
        return REFERABLE_INDEX, "referable DR"
    if t.lower() == "predicted":
        g = int(torch.argmax(logits[:N_GRADES]))
        return g, f"grade {g} ({GRADES[g]})"
    if t.isdigit() and 0 <= int(t) < N_GRADES:
        return int(t), f"grade {t} ({GRADES[int(t)]})"
    if t.upper() in LESIONS:
        return LESION_SLICE.start + LESIONS.index(t.upper()), f"lesion {t.upper()}"
    raise BadInput(f"unknown CAM target {target!r}; use referable, predicted, 0-4 or one of {list(LESIONS)}")


class CAMInfer(FundusInferTask):
    params = {"threshold": Param.number(0, 1), "method": Param.choice("cam", "gradcam"),
              "target": Param.choice("referable", "predicted", *[str(g) for g in range(5)], *[x.lower() for x in LESIONS])}
    def __init__(self, name: str, model: ModelSettings, app: AppSettings):
        edges = DEFAULT_LEVELS
        super().__init__(
            name=name,
            model=model,
            app=app,
            network=build_grader(model.network),
            type=InferType.SEGMENTATION,
            labels=level_names(edges),
            description="Class activation map of the DR grader (CAM paper) with lesion region proposals",
            config={
                "target": "referable",
                "method": str(app.get("cam_method", "cam")),
                "threshold": float(app.get("cam_threshold", CAM_THRESHOLD)),
                "result_extension": ".png",
            },
        )
        self.edges = edges

    def label_colors(self) -> dict[str, list[int]]:
        return {name: list(LEVEL_COLORS[v - 1]) for name, v in self.labels.items()}

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        network = self._get_network(device, data)
        x = data["image"]
        x = (x if torch.is_tensor(x) else torch.as_tensor(x))[None].to(torch.device(device))
        method = str(data.get("method", "cam")).lower()
        if method not in ("cam", "gradcam"):
            raise BadInput(f"unknown CAM method {method!r}; use cam or gradcam")
        with torch.no_grad():
            logits, cams = network.forward_with_cam(x)
        index, target_name = resolve_target(data.get("target"), logits[0])
        size = x.shape[-2:]
        if method == "cam":
            cam = F.interpolate(cams[:, index : index + 1], size=size, mode="bilinear", align_corners=False)[0, 0]
        else:
            gc = GradCAM(nn_module=network, target_layers=getattr(network, "cam_layer", "cam_conv"))
            with torch.enable_grad():
                cam = gc(x.clone().requires_grad_(True), class_idx=index)[0, 0]
        data["cam_raw"] = cam.detach().float().cpu().numpy()
        data["cam_feature_shape"] = [int(v) for v in cams.shape[-2:]]
        data["logits"] = logits[0].detach().cpu()
        data["cam_target"] = {"index": index, "name": target_name, "method": method}
        return data

    @staticmethod
    def cam_at_input(data) -> np.ndarray:
        """The min-max normalised CAM (within the field of view) restored to the input's pixel grid, 0 outside
        the field of view: what the label levels and the region proposals are made of."""
        geom = geometry.FundusGeometry.from_dict(data["fundus_geometry"])
        fov = data["fov"][0].numpy() > 0.5 if torch.is_tensor(data["fov"]) else np.asarray(data["fov"])[0] > 0.5
        cam = data["cam_raw"].astype(np.float32)
        inside = cam[fov] if fov.any() else cam.ravel()
        lo, hi = float(inside.min()), float(inside.max())
        norm = np.zeros_like(cam) if hi - lo < 1e-12 else np.clip((cam - lo) / (hi - lo), 0.0, 1.0)
        norm[~fov] = 0.0
        full = geometry.to_original(norm, geom, interpolation="linear").astype(np.float32)
        full *= np.asarray(data["fundus_source_fov"], bool)  # nothing outside the field of view (values are >= 0)
        return full

    def predict(self, image_path: str, **params) -> tuple[np.ndarray, dict, np.ndarray]:
        """The served CAM of one image file at its input size (:meth:`cam_at_input`), the JSON answer
        (regions included) and the field of view (H, W), through the same pipeline as ``/infer/cam``."""
        _, data = self({**params, "image": image_path, "skip_writer": True})
        full = self.cam_at_input(data)
        return full, self.answer(data, full), np.asarray(data["fundus_source_fov"], bool)

    def writer(self, data, extension=None, dtype=None):
        full = self.cam_at_input(data)
        names = {v: k for k, v in self.labels.items()}
        colors = {i + 1: c for i, c in enumerate(LEVEL_COLORS)}
        path = self.result_path(data)
        io.write_label(path, quantise(full, self.edges), label_names=names, colors=colors)
        return path, self.answer(data, full)

    def answer(self, data, full: np.ndarray) -> dict:
        """The JSON answer (target, probability, region proposals) for the CAM ``full`` of :meth:`cam_at_input`."""
        geom = geometry.FundusGeometry.from_dict(data["fundus_geometry"])
        threshold = float(data.get("threshold", CAM_THRESHOLD))
        probs = split_outputs(data["logits"].float())
        idx = data["cam_target"]["index"]
        if idx < N_GRADES:
            p = float(probs["grade"][idx])
        elif idx == REFERABLE_INDEX:
            p = float(probs["referable"])
        else:
            p = float(probs["lesions"][idx - LESION_SLICE.start])
        return {
            "target": data["cam_target"]["name"],
            "method": data["cam_target"]["method"],
            "target_probability": round(p, 4),
            "grade": int(torch.argmax(probs["grade"])),
            "threshold": threshold,
            "levels": {k: v for k, v in self.labels.items()},
            "regions": region_proposals(full, threshold),
            "cam_resolution": data["cam_feature_shape"],
            "feature_map_stride": int(np.prod(self.model.network.get("strides", [1]))),
            "image_size": [geom.height, geom.width],
            "model": self.model_json(),
        }
