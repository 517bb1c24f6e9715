"""MONAI transforms for fundus photographs (shared by every model's infer task and trainer).

MONAI's own ``LoadImaged`` reads png/jpg as (W, H, C) through PIL and knows nothing
about the black border of a fundus photograph; ``LoadFundusd`` owns both: it reads
with :mod:`monailabel_dr.fundus.io` (display orientation, H x W), detects the field of
view, crops/pads/resizes it to the model's square working size and records the
geometry so outputs can be restored exactly to the input's pixel grid.

The output is channel-first (C, S, S) float32, MONAI's convention for 2-D images.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from monailabel_dr.fundus import geometry, io
from monailabel_dr.fundus.landmarks import detect_landmarks

GEOMETRY_KEY = "fundus_geometry"
FOV_KEY = "fov"
SOURCE_INFO_KEY = "fundus_source"
SOURCE_FOV_KEY = "fundus_source_fov"
LANDMARKS_KEY = "fundus_landmarks"
_LANDMARK_POOL = None


def _landmark_pool():
    global _LANDMARK_POOL
    if _LANDMARK_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _LANDMARK_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mldr-landmarks")
    return _LANDMARK_POOL


def landmarks_of(data: Mapping) -> object | None:
    """The optic disc / fovea LoadFundusd(landmarks=True) detected for ``data`` (waits for the detection)."""
    value = data.get(LANDMARKS_KEY)
    return value.result() if hasattr(value, "result") else value


class LoadFundusd(MapTransform):
    """Read a fundus photograph, crop its field of view and resize it to ``size`` x ``size``.

    Writes ``data[key]`` (3, S, S) float32 in [0, 1], ``data["fundus_geometry"]`` (a dict,
    see :class:`FundusGeometry`), ``data["fov"]`` (1, S, S) float32 field-of-view mask and
    ``data["fundus_source"]`` (original size, channels, dtype, whether it was grey) and, with
    ``keep_source_fov``, ``data["fundus_source_fov"]`` (bool (H, W) FOV at the input's size)
    and, with ``landmarks``, ``data["fundus_landmarks"]`` (optic disc and fovea,
    :class:`monailabel_dr.fundus.landmarks.Landmarks`, input pixels).
    Raises :class:`FundusIOError` for unusable input (caller maps it to HTTP 422).
    """

    def __init__(
        self,
        keys: KeysCollection,
        size: int,
        max_pixels: int = io.DEFAULT_MAX_PIXELS,
        min_side: int = io.DEFAULT_MIN_SIDE,
        require_colour: bool = False,
        keep_source_fov: bool = False,
        landmarks: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.keep_source_fov = keep_source_fov
        self.landmarks = landmarks
        self.size = int(size)
        self.max_pixels = int(max_pixels)
        self.min_side = int(min_side)
        self.require_colour = require_colour

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            src = d[key]
            if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__"):
                raw = io.read_image(src, max_pixels=self.max_pixels, min_side=self.min_side)
            else:
                raw = np.asarray(src)
            grey = io.is_grey(raw)
            if grey and self.require_colour:
                raise io.FundusIOError(
                    "this model needs a colour (RGB) fundus photograph; the image is single-channel/grey "
                    "(e.g. red-free), which the model was not trained on"
                )
            rgb = io.to_rgb_float(raw)
            source_fov = geometry.detect_fov(rgb, unit_rgb=True)   # rgb: to_rgb_float's output
            if self.landmarks:  # on the full-resolution photograph, before it is resized
                # in a worker thread (OpenCV releases the GIL), while the image is resized and the network runs;
                # read it with landmarks_of(data)
                d[LANDMARKS_KEY] = _landmark_pool().submit(detect_landmarks, rgb, source_fov)
            work, geom, fov = geometry.prepare(rgb, self.size, fov=source_fov, unit_rgb=True)
            if self.keep_source_fov:  # inference: outputs are masked with the exact input-resolution FOV
                d[SOURCE_FOV_KEY] = source_fov
            d[key] = torch.from_numpy(np.ascontiguousarray(work.transpose(2, 0, 1), dtype=np.float32))
            d[GEOMETRY_KEY] = geom.to_dict()
            d[FOV_KEY] = torch.from_numpy(fov[None].astype(np.float32))
            d[SOURCE_INFO_KEY] = {"height": int(raw.shape[0]), "width": int(raw.shape[1]), "grey": bool(grey)}
        return d


class LoadLesionTargetsd(MapTransform):
    """Lesion targets in the working geometry of ``LoadFundusd`` (run it first).

    Sources (per item): ``data["masks"]`` = {lesion: path} of binary masks (the IDRiD layout; a
    lesion without a file is empty), or ``data[key]`` = path of a label map (0 background, 1 MA,
    2 HE, 3 EX, 4 SE). Writes ``data[key]`` = float32 (m + 1, S, S): per-lesion coverage in
    [0, 1] (area-averaged when the image is shrunk, so a 2-pixel microaneurysm is not lost to
    nearest-neighbour sampling), and the field-of-view mask as the last channel.
    """

    def __init__(self, keys: KeysCollection = "label", masks_key: str = "masks", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.masks_key = masks_key

    def __call__(self, data):
        from monailabel_dr.fundus.lesions import LESION_VALUES, LESIONS

        d = dict(data)
        geom = geometry.FundusGeometry.from_dict(d[GEOMETRY_KEY])
        shape = (geom.height, geom.width)
        masks = d.pop(self.masks_key, None)
        for key in self.keys:
            if masks is None and key not in d:
                continue
            if masks is not None:
                truth = {}
                for les in LESIONS:
                    p = masks.get(les)
                    truth[les] = (io.read_label(p, shape=shape) > 0) if p else np.zeros(shape, bool)
            else:
                lab = io.read_label(d[key], shape=shape)
                truth = {les: lab == LESION_VALUES[les] for les in LESIONS}
            chans = [geometry.to_working(truth[les].astype(np.float32), geom, interpolation="area") for les in LESIONS]
            fov = d[FOV_KEY]
            fov = fov.numpy()[0] if torch.is_tensor(fov) else np.asarray(fov)[0]
            out = np.stack([np.clip(c, 0, 1) for c in chans] + [fov.astype(np.float32)]).astype(np.float32)
            d[key] = torch.from_numpy(out)
        return d


class RandLesionPromptd(Randomizable, MapTransform):
    """Pick the lesion a training sample is prompted with (TP-DRSeg trains one lesion per sample).

    Input ``data[key]``: (m + 1, S, S) from :class:`LoadLesionTargetsd` (lesion coverages + FOV).
    Output ``data[key]``: (2, S, S), the chosen lesion's coverage and the FOV, and
    ``data[cls_key]``: the lesion index (int64 tensor). A lesion present in the image (any
    coverage >= 0.5) is chosen uniformly; with probability ``negative_prob`` (or when none is
    present) any lesion is, so absent lesions teach the model to answer an empty mask.
    """

    def __init__(self, keys: KeysCollection = "label", cls_key: str = "cls", negative_prob: float = 0.2,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.cls_key = cls_key
        self.negative_prob = float(negative_prob)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            lab = lab if torch.is_tensor(lab) else torch.as_tensor(np.asarray(lab))
            m = lab.shape[0] - 1
            present = [i for i in range(m) if bool((lab[i] >= 0.5).any())]
            if not present or self.R.rand() < self.negative_prob:
                k = int(self.R.randint(m))
            else:
                k = int(present[self.R.randint(len(present))])
            d[key] = torch.stack([lab[k], lab[m]])
            d[self.cls_key] = torch.tensor(k, dtype=torch.int64)
        return d


class LocalContrastd(MapTransform):
    """:func:`monailabel_dr.fundus.preprocess.local_contrast` on ``data[key]`` (3, S, S) inside ``data["fov"]``
    (run :class:`LoadFundusd` first)."""

    def __init__(self, keys: KeysCollection = "image", sigma_fraction: float | None = None, gain: float | None = None,
                 allow_missing_keys: bool = False):
        from monailabel_dr.fundus import preprocess

        super().__init__(keys, allow_missing_keys)
        self.sigma_fraction = preprocess.DEFAULT_SIGMA_FRACTION if sigma_fraction is None else float(sigma_fraction)
        self.gain = preprocess.DEFAULT_GAIN if gain is None else float(gain)

    def __call__(self, data):
        from monailabel_dr.fundus.preprocess import local_contrast

        d = dict(data)
        fov = d[FOV_KEY]
        fov = (fov.numpy() if torch.is_tensor(fov) else np.asarray(fov))[0] > 0.5
        for key in self.key_iterator(d):
            x = d[key]
            x = x.numpy() if torch.is_tensor(x) else np.asarray(x)
            out = local_contrast(x.transpose(1, 2, 0), fov, self.sigma_fraction, self.gain)
            d[key] = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
        return d


def preprocessing_transforms(options: Mapping | None, keys: KeysCollection = "image") -> list:
    """The deterministic preprocessing a profile asks for (its ``preprocess`` block, checked by
    :func:`monailabel_dr.fundus.preprocess.parse_preprocess`), after :class:`LoadFundusd` and before
    augmentation / standardisation; the same list for a model's infer task and trainer, so what is
    evaluated is what is served. ``none`` (the default) adds nothing."""
    from monailabel_dr.fundus.preprocess import parse_preprocess

    spec = parse_preprocess((options or {}).get("preprocess"))
    if spec["method"] == "none":
        return []
    return [LocalContrastd(keys=keys, sigma_fraction=spec.get("sigma_fraction"), gain=spec.get("gain"))]


LESION_MAPS_KEY = "lesion_maps"


class LesionMapsd(MapTransform):
    """Lesion probability maps of a frozen lesion network for a photograph, at a grader's working size.

    Runs before :class:`LoadFundusd` on the photograph's path in ``data[key]``: the field of view is cropped
    and resized to ``lesion_size`` (the lesion model's own working resolution), preprocessed as its profile says
    (``preprocess``: the lesion profile's block, e.g. local contrast) and standardised exactly as the ``lesion_seg``
    infer task does, the network's sigmoid maps (zero outside the field of view) are
    max-pooled to ``out_size`` (the maps line up with the grader's image: the crop is the same, only the
    scale differs; with ``out_size`` a divisor of ``lesion_size`` the pooling windows nest exactly) and written to ``data[LESION_MAPS_KEY]`` (m, out, out).
    Max rather than mean pooling keeps a 2-pixel microaneurysm visible.

    ``network`` is a callable returning the lesion network (e.g. the grader's frozen branch), called at the
    first use, so a trainer can build this before its network is loaded.
    """

    def __init__(self, keys: KeysCollection, network, lesion_size: int, out_size: int,
                 max_pixels: int = io.DEFAULT_MAX_PIXELS, min_side: int = io.DEFAULT_MIN_SIDE, device: str = "cpu",
                 preprocess: Mapping | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.network = network
        self.lesion_size = int(lesion_size)
        self.out_size = int(out_size)
        self.load = LoadFundusd(keys="image", size=self.lesion_size, max_pixels=max_pixels, min_side=min_side)
        # the lesion profile's preprocessing (its `preprocess` block), as its infer task applies it
        self.preprocess = preprocessing_transforms({"preprocess": preprocess})
        self.device = device

    def __call__(self, data):
        import torch.nn.functional as F
        from monai.transforms import NormalizeIntensity

        d = dict(data)
        for key in self.key_iterator(d):
            sub = self.load({"image": d[key]})
            for t in self.preprocess:
                sub = t(sub)
            x = NormalizeIntensity()(sub["image"])
            x = torch.as_tensor(x, dtype=torch.float32)[None].to(self.device)
            net = self.network()
            with torch.no_grad():
                p = torch.sigmoid(net(x).float()) * sub[FOV_KEY][None].to(self.device)
            d[LESION_MAPS_KEY] = F.adaptive_max_pool2d(p, (self.out_size, self.out_size))[0].cpu()
        return d


def lesion_map_transforms(network_config: Mapping, network, grader_size: int, max_pixels: int, min_side: int,
                          device: str = "cpu") -> tuple[list, list]:
    """``(before, after)`` transforms of a lesion-attention grading profile: :class:`LesionMapsd` to run before
    :class:`LoadFundusd`, and the concatenation of the maps after the image's own preprocessing and
    standardisation (so the grader gets (3 + m, S, S)). Both empty for a profile without attention."""
    att = (network_config or {}).get("attention")
    if not att:
        return [], []
    from monai.transforms import ConcatItemsd, DeleteItemsd

    before = [LesionMapsd(keys="image", network=network, lesion_size=int(att["lesion_size"]), out_size=int(grader_size),
                          max_pixels=max_pixels, min_side=min_side, device=device, preprocess=att.get("lesion_preprocess"))]
    after = [ConcatItemsd(keys=["image", LESION_MAPS_KEY], name="image", dim=0), DeleteItemsd(keys=LESION_MAPS_KEY)]
    return before, after
