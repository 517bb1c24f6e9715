"""`lesion_seg` infer task: Lesion-Net lesion maps at the input geometry.

Output label (segmentation type, 3D Slicer shows it): one label map, 0 background, MA=1,
HE=2, EX=3, SE=4. Overlap rule: a pixel where several lesions reach the threshold gets
the lesion with the highest probability (the per-lesion maps themselves are multi-label).
With ``"output": "probabilities"`` the result file is instead the per-lesion probability
maps as a multi-channel ``.nrrd`` / ``.nii.gz`` (channel names MA, HE, EX, SE).

JSON: per lesion the presence probability (global max inside the field of view, the
paper's P_j), the pixel area and the number of connected components above the threshold,
and the components per retinal quadrant. Quadrants are centred on the fovea and split
by the disc-fovea axis and its perpendicular (superior/inferior x nasal/temporal, nasal
= the disc side) when :mod:`monailabel_dr.fundus.landmarks` finds both; otherwise on
the field-of-view centre with a horizontal axis (upper/lower x left/right), and the JSON
says which (``quadrants.reference``) and where the landmarks were found.

The working resolution is the profile's ``image_size`` (``--conf lesion_seg_image_size``);
inference runs on the whole field of view at that size and is mapped back to the input's
pixel grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType

from monailabel_dr.config import AppSettings, ConfError, ModelSettings
from monailabel_dr.fundus import io
from monailabel_dr.fundus.components import Components, connected_components, kept_components
from monailabel_dr.fundus.landmarks import QuadrantFrame, quadrant_frame
from monailabel_dr.fundus.lesions import LESION_VALUES, LESIONS
from monailabel_dr.lib.checkpoints import check_members, check_preprocess, operating_thresholds, read_record
from monailabel_dr.lib.errors import BadInput
from monailabel_dr.lib.infers.base import FundusInferTask, channel_map, probabilities_at_input
from monailabel_dr.lib.params import Param
from monailabel_dr.networks.lesion_net import TTA_MODES, FlipTTAInferer, build_lesion_net
from monailabel_dr.transforms import landmarks_of


def per_lesion(threshold, m: int) -> list[float]:
    """One threshold per lesion channel: a number for all, or a sequence of ``m``."""
    if isinstance(threshold, (int, float)):
        return [float(threshold)] * m
    t = [float(v) for v in threshold]
    if len(t) != m:
        raise ValueError(f"{len(t)} thresholds for {m} lesion maps")
    return t


_BAND_ROWS = 256   # rows per band of label_map_from_probs (12 bands on a 2848-row photograph)


def label_map_from_probs(probs: np.ndarray, threshold, bbox: tuple[int, int, int, int] | None = None,
                         masks: list[np.ndarray] | None = None) -> np.ndarray:
    """(m, H, W) probabilities -> label map: the most probable lesion among those >= their threshold (ties:
    the first lesion), 0 where none is. ``threshold``: one number, or one per lesion (``per_lesion``).
    ``bbox`` (y0, y1, x0, x1): the probabilities are 0 outside it (the field of view's box), so with
    thresholds > 0 only the box is computed. ``masks``: the served masks per lesion (:func:`served_masks`)
    where they are less than ``probs >= threshold`` (a minimum component peak or area); a lesion is only
    taken inside its mask.

    One pass per lesion with a running maximum: the same map as ``argmax(where(p >= t, p, -1), axis=0)``
    (first index on ties), but ``np.argmax`` over the first axis of a 4 x 12 MP array is a strided scan
    that took about 1 s of a full-size request. With ``bbox``, the box is cut into bands of rows computed in
    parallel threads (numpy releases the GIL; a pixel's label depends only on the lesions' probabilities at
    that pixel, so the map is the same): half the time on 2 cores."""
    probs = np.asarray(probs)
    thr = per_lesion(threshold, probs.shape[0])
    if bbox is not None and min(thr) > 0:
        y0, y1, x0, x1 = bbox
        lab = np.zeros(probs.shape[1:], np.uint8)

        def band(rows: tuple[int, int]) -> None:
            a, b = rows
            lab[a:b, x0:x1] = label_map_from_probs(
                probs[:, a:b, x0:x1], thr, masks=None if masks is None else [m[a:b, x0:x1] for m in masks])

        channel_map(band, [(a, min(a + _BAND_ROWS, y1)) for a in range(y0, y1, _BAND_ROWS)])
        return lab
    lab = np.zeros(probs.shape[1:], np.uint8)
    best = np.full(probs.shape[1:], -1.0, np.float32 if probs.dtype == np.float32 else np.float64)
    for i in range(probs.shape[0]):
        p = probs[i]
        take = p >= thr[i] if masks is None else masks[i].astype(bool)
        np.logical_and(take, p > best, out=take)   # strictly greater: an earlier lesion keeps a tie
        lab[take] = i + 1
        np.copyto(best, p, where=take)
    return lab


def min_area_px(min_area_ppm: float | None, fov_area_px: int) -> int:
    """A minimum component area given in parts per million of the field of view, in pixels of this image (at
    least 1): the same rule at every resolution (3 ppm is 26 px on a 4288 x 2848 IDRiD photograph)."""
    return max(1, int(np.ceil(float(min_area_ppm or 0) * 1e-6 * float(fov_area_px))))


def served_masks(probs: np.ndarray, threshold, min_peak: float | None, min_area: int = 0) -> list[np.ndarray] | None:
    """The lesion masks the label map and the statistics count when a minimum component peak or area is set:
    per lesion, the components of ``p >= threshold`` whose highest probability reaches ``min_peak`` and that
    have at least ``min_area`` pixels (:func:`monailabel_dr.fundus.components.kept_components`), in parallel
    threads; None without either (every component above the threshold counts)."""
    if not min_peak and min_area <= 1:
        return None
    thr = per_lesion(threshold, probs.shape[0])
    return channel_map(lambda i: kept_components(probs[i], thr[i], float(min_peak or 0), int(min_area)),
                       range(probs.shape[0]))


def map_components(p: np.ndarray, threshold: float, fov: np.ndarray, bbox: tuple[int, int, int, int] | None = None,
                   mask: np.ndarray | None = None) -> Components:
    """The components of ``p >= threshold`` inside the field of view ``fov`` (or of ``mask``, a served mask,
    inside it), centroids in the input's pixel grid. ``p`` must be 0 outside the field of view, so for a
    threshold > 0 the FOV test is implied (one pass, no copy); ``bbox`` (y0, y1, x0, x1), the box outside
    which ``p`` is 0: then only the box is labelled (a fifth fewer pixels on a 4288 x 2848 photograph)."""
    y0 = x0 = 0
    if threshold > 0:
        if bbox is not None:
            y0, y1, x0, x1 = bbox
            p = p[y0:y1, x0:x1]
        m = (p >= threshold).view(np.uint8) if mask is None else mask[y0:y0 + p.shape[0], x0:x0 + p.shape[1]]
    else:
        m = ((p >= threshold) & fov).view(np.uint8) if mask is None else mask & fov.view(np.uint8)
    comps = connected_components(m)
    return comps if not (y0 or x0) else comps._replace(centroids=comps.centroids + np.array([x0, y0], np.float64))


def lesion_stats(probs: np.ndarray, fov: np.ndarray, threshold, frame: QuadrantFrame,
                 fov_radius: float | None = None, masks: list[np.ndarray] | None = None,
                 bbox: tuple[int, int, int, int] | None = None) -> dict:
    """Presence, area, component count and per-quadrant counts per lesion (input pixels), at ``threshold``
    (one number, or one per lesion).

    ``probs`` must already be zero outside the field of view. Components are 8-connected
    (OpenCV's labelling, which also gives the centroids, ~3x faster than scipy on 12 MP).
    With ``fov_radius`` (px), also ``nearest_to_centre``: the distance of the closest component's
    centroid to the quadrants' centre (the fovea when it was found), in field-of-view radii (None
    without components). ``masks``: the served masks (:func:`served_masks`) instead of ``p >= threshold``.
    ``bbox``: the field of view's box, outside which the probabilities are 0 (:func:`map_components`).
    """
    thr = per_lesion(threshold, len(LESIONS))

    def one(i: int) -> tuple[str, dict]:
        les = LESIONS[i]
        p = probs[i]
        comps = map_components(p, thr[i], fov, bbox, None if masks is None else masks[i])
        cents = comps.centroids
        quads = dict.fromkeys(frame.names, 0)
        for q in frame.classify(cents[:, 0], cents[:, 1]) if comps.n else []:
            quads[q] += 1
        stats_les = {
            "presence_probability": round(float(p.max()), 4),
            "present": bool(comps.n),
            "area_px": int(comps.areas.sum()),
            "components": comps.n,
            "components_per_quadrant": quads,
        }
        if fov_radius:
            d = np.hypot(cents[:, 0] - frame.centre[0], cents[:, 1] - frame.centre[1]) / float(fov_radius)
            stats_les["nearest_to_centre"] = round(float(d.min()), 4) if comps.n else None
        return les, stats_les

    # the lesions in parallel threads (OpenCV's labelling and numpy release the GIL), in LESIONS order
    return dict(channel_map(one, range(len(LESIONS))))


def fov_radius(geom) -> float:
    """Radius (px, input grid) of the field of view: half the larger side of its bounding box."""
    y0, y1, x0, x1 = geom.bbox
    return 0.5 * max(y1 - y0, x1 - x0)


@dataclass(frozen=True)
class InferenceSettings:
    """The profile's ``inference`` block (typed on load, unknown keys refused).

    - ``tta``: test-time flips (``none``, ``hflip``: 2 network passes, ``flips``: h, v and both, 4 passes;
      :class:`monailabel_dr.networks.lesion_net.FlipTTAInferer`); a request's ``tta`` overrides it.
    - ``thresholds``: the label map's and statistics' operating points when a request gives no
      ``threshold``: ``validation`` = the per-lesion thresholds the trainer chose on its validation
      images for the served weights (stored in the checkpoint's record; 0.5 where the checkpoint has
      none), or one number for every lesion.
    - ``min_peak``: a minimum component peak (hysteresis thresholding; off by default): a component of
      ``p >= threshold`` counts, in the label map and the statistics, only when its highest probability
      reaches ``max(threshold, min_peak)``: fewer components reported on healthy eyes for a little lesion
      Dice (the trade-off, measured: docs/results.md, bench/component_rules_sweep.py). A request's ``min_peak``
      overrides it (0: off).
    - ``min_area_ppm``: a minimum component area in parts per million of the field of view (off by
      default; :func:`min_area_px`): smaller components are not counted, in the label map and the
      statistics. A request's ``min_area_ppm`` overrides it (0: off).
    """

    tta: str = "none"
    thresholds: str | float = 0.5
    min_peak: float | None = None
    min_area_ppm: float | None = None

    @classmethod
    def parse(cls, block: dict | None, where: str) -> "InferenceSettings":
        from monailabel_dr.networks.lesion_net import TTA_MODES

        block = dict(block or {})
        unknown = sorted(set(block) - {"tta", "thresholds", "min_peak", "min_area_ppm"})
        if unknown:
            raise ConfError(f"{where}: unknown inference key(s) {unknown}; "
                            "accepted: ['min_area_ppm', 'min_peak', 'thresholds', 'tta']")
        tta = str(block.get("tta", cls.tta)).lower()
        if tta not in TTA_MODES:
            raise ConfError(f"{where}: inference.tta {tta!r}: use one of {sorted(TTA_MODES)}")
        thr = block.get("thresholds", cls.thresholds)
        if not (thr == "validation" or (isinstance(thr, (int, float)) and not isinstance(thr, bool) and 0 < thr < 1)):
            raise ConfError(f"{where}: inference.thresholds {thr!r}: use 'validation' or a number in (0, 1)")
        peak = block.get("min_peak", cls.min_peak)
        if peak is not None and not (isinstance(peak, (int, float)) and not isinstance(peak, bool) and 0 <= peak < 1):
            raise ConfError(f"{where}: inference.min_peak {peak!r}: use a number in [0, 1) (0 or null: off)")
        area = block.get("min_area_ppm", cls.min_area_ppm)
        if area is not None and not (isinstance(area, (int, float)) and not isinstance(area, bool) and 0 <= area <= 1000):
            raise ConfError(f"{where}: inference.min_area_ppm {area!r}: use a number in [0, 1000] (0 or null: off)")
        return cls(tta=tta, thresholds=thr if thr == "validation" else float(thr),
                   min_peak=float(peak) if peak else None, min_area_ppm=float(area) if area else None)


class LesionSegInfer(FundusInferTask):
    detect_landmarks = True
    params = {"threshold": Param.number(0, 1, words=("validation",)), "min_peak": Param.number(0, 1, high_open=True),
              "min_area_ppm": Param.number(0, 1000),
              "output": Param.choice("label", "probabilities"), "tta": Param.choice(*sorted(TTA_MODES))}

    def __init__(self, name: str, model: ModelSettings, app: AppSettings):
        self.inference = InferenceSettings.parse(model.options.get("inference"),
                                                 f"{model.name} profile '{model.profile_name}'")
        super().__init__(
            name=name,
            model=model,
            app=app,
            network=build_lesion_net(model.network),
            type=InferType.SEGMENTATION,
            labels={les: LESION_VALUES[les] for les in LESIONS},
            description="Lesion-Net segmentation of MA, HE, EX, SE (label map 1-4; probability maps on request)",
            # threshold "validation": the checkpoint's per-lesion operating thresholds (InferenceSettings)
            config={"threshold": self.inference.thresholds, "tta": self.inference.tta, "output": "label",
                    "result_extension": ".png"},
        )

    def load_network(self, path: str, device: str):
        """The base's strict load, after checking the file was trained with this profile's preprocessing and
        holds as many networks as it serves (409 naming both)."""
        try:
            check_preprocess(path, self.model.options.get("preprocess"), f"the '{self.model.profile_name}' profile")
            check_members(path, int(self.model.network.get("members", 1) or 1), f"the '{self.model.profile_name}' profile")
        except ValueError as e:
            raise self.unusable_checkpoint(path, e) from e
        return super().load_network(path, device)

    def inferer(self, data=None):
        return FlipTTAInferer(str((data or {}).get("tta") or self.inference.tta))

    def thresholds(self, requested=None) -> tuple[list[float], str]:
        """The per-lesion thresholds of a request and where they come from: the request's number, the
        profile's number, or ``validation`` (the served checkpoint's record, 0.5 where it has none)."""
        want = self.inference.thresholds if requested is None or requested == "" else requested
        if want != "validation":
            return per_lesion(float(want), len(LESIONS)), "request" if requested not in (None, "") else "profile"
        stored = operating_thresholds(read_record(self.model.serve_path), LESIONS)
        if stored is None:
            return per_lesion(0.5, len(LESIONS)), "0.5 (the served checkpoint stores no validation thresholds)"
        return [stored[les] for les in LESIONS], "validation (per-lesion, chosen by the trainer on its validation images)"

    def min_peak(self, requested=None) -> float | None:
        """The minimum component peak of a request (0: off), else the profile's (InferenceSettings)."""
        if requested is None or requested == "":
            return self.inference.min_peak
        return float(requested) or None

    def min_area_ppm(self, requested=None) -> float | None:
        """The minimum component area (ppm of the field of view) of a request (0: off), else the profile's."""
        if requested is None or requested == "":
            return self.inference.min_area_ppm
        return float(requested) or None

    def masks_for(self, probs: np.ndarray, fov: np.ndarray, params: dict | None = None) -> list[np.ndarray] | None:
        """What the label map and the statistics of a request with ``params`` count per lesion (None: every
        component of ``p >= threshold``); evaluation scores these masks (lib/evaluation.py)."""
        params = params or {}
        thr, _ = self.thresholds(params.get("threshold"))
        ppm = self.min_area_ppm(params.get("min_area_ppm"))
        area = min_area_px(ppm, int(np.count_nonzero(fov))) if ppm else 0
        return served_masks(probs, thr, self.min_peak(params.get("min_peak")), area)

    full_resolution = staticmethod(probabilities_at_input)

    def predict(self, image_path: str, **params) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (m, H, W) and FOV mask of one image file, through the same pipeline as /infer."""
        _, data = self({**params, "image": image_path, "skip_writer": True})
        probs, fov, _ = self.full_resolution(data)
        return probs, fov

    def answer(self, image_path: str) -> dict:
        """The JSON answer of ``/infer/lesion_seg`` for one image file (the label file is not kept)."""
        import os

        label, result = self({"image": image_path, "result_extension": ".png"})
        if label and os.path.isfile(label):
            os.remove(label)
        return result

    def writer(self, data, extension=None, dtype=None):
        probs, fov, geom = self.full_resolution(data)
        thr, source = self.thresholds(data.get("threshold"))
        peak, ppm = self.min_peak(data.get("min_peak")), self.min_area_ppm(data.get("min_area_ppm"))
        area = min_area_px(ppm, int(np.count_nonzero(fov))) if ppm else 0
        masks = served_masks(probs, thr, peak, area)
        kind = str(data.get("output", "label")).lower()
        path = self.result_path(data)
        if kind == "probabilities":
            if not path.endswith(io.MULTICHANNEL_EXTENSIONS):
                raise BadInput("probability maps are written as .nrrd or .nii.gz: set result_extension")
            io.write_multichannel(path, probs, list(LESIONS))
        elif kind == "label":
            io.write_label(path, label_map_from_probs(probs, thr, geom.bbox, masks=masks))
        else:
            raise BadInput(f"output must be 'label' or 'probabilities', got {kind!r}")
        fov_centre = ((geom.bbox[2] + geom.bbox[3] - 1) / 2.0, (geom.bbox[0] + geom.bbox[1] - 1) / 2.0)
        landmarks = landmarks_of(data)
        frame = quadrant_frame(landmarks, fov_centre)
        result = {
            "lesions": lesion_stats(probs, fov, thr, frame, fov_radius=fov_radius(geom), masks=masks, bbox=geom.bbox),
            "fov_area_px": int(fov.sum()),
            # one number when every lesion has the same, else per lesion
            "threshold": thr[0] if len(set(thr)) == 1 else dict(zip(LESIONS, thr)),
            "threshold_source": source,
            "min_peak": peak,
            "min_area_ppm": ppm,
            "min_area_px": area if ppm else None,
            "tta": str(data.get("tta") or self.inference.tta),
            "output": kind,
            "overlap_rule": "highest probability among lesions >= threshold",
            "quadrants": frame.to_dict(),
            "landmarks": landmarks.to_dict() if landmarks is not None else None,
            "working_size": self.model.image_size,
            "image_size": [geom.height, geom.width],
            "model": self.model_json(),
        }
        return path, result
