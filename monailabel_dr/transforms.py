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
            source_fov = geometry.detect_fov(rgb)
            work, geom, fov = geometry.prepare(rgb, self.size, fov=source_fov)
            if self.keep_source_fov:  # inference: outputs are masked with the exact input-resolution FOV
                d[SOURCE_FOV_KEY] = source_fov
            if self.landmarks:  # on the full-resolution photograph, before it is resized
                d[LANDMARKS_KEY] = detect_landmarks(rgb, source_fov)
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
