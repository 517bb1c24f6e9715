"""Fundus preprocessing applied after the field of view is cropped and resized.

``local_contrast``: the local contrast normalisation that won the Kaggle 2015 DR challenge
(B. Graham, "Kaggle Diabetic Retinopathy Detection competition report", 2015): subtract a
Gaussian-blurred copy of the image, so that illumination, pigmentation and camera colour
balance drop out and small local structure (microaneurysms, dot haemorrhages, exudates) is
amplified:

    out = 0.5 + gain * (I - G_sigma * I)     sigma = sigma_fraction * FOV radius, clipped to [0, 1]

Graham used gain 4 and sigma = radius / 30 on 8-bit images (out = 4 I - 4 G*I + 128). Here the blur
is a *normalised* convolution over the field of view, ``G*(I m) / G*m``, so the black border does
not darken the rim of the retina (a plain blur would draw a bright ring just inside the edge that
Graham removed by cropping the outer 10 % of the radius, which also removes real retina). Outside
the field of view the output is the neutral 0.5.

OpenCV's GaussianBlur does the blurring; no MONAI transform implements this (MONAI's
``GaussianSmooth`` has no masked / normalised mode and runs on torch tensors, slower on a CPU for
one image).

Nothing here knows about MONAI, MONAI Label or torch.
"""

from __future__ import annotations

import cv2
import numpy as np

PREPROCESSING = ("none", "local_contrast")
DEFAULT_SIGMA_FRACTION = 1.0 / 30.0   # Graham: sigma = radius / 30
DEFAULT_GAIN = 4.0                    # Graham: 4 I - 4 G*I


def local_contrast(rgb: np.ndarray, fov: np.ndarray, sigma_fraction: float = DEFAULT_SIGMA_FRACTION,
                   gain: float = DEFAULT_GAIN) -> np.ndarray:
    """Local contrast normalisation of an (H, W, 3) float image in [0, 1] inside ``fov`` (H, W) bool.

    ``sigma_fraction`` is relative to the field of view's radius (half the larger side of its
    bounding box; the full side of the square when the mask is empty)."""
    img = np.asarray(rgb, dtype=np.float32)
    m = np.asarray(fov, dtype=bool)
    if img.ndim != 3 or m.shape != img.shape[:2]:
        raise ValueError(f"local_contrast needs (H, W, 3) and an (H, W) mask, got {img.shape} and {m.shape}")
    if m.any():
        ys, xs = np.nonzero(m)
        radius = 0.5 * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    else:
        radius = 0.5 * max(img.shape[:2])
    sigma = max(0.5, float(sigma_fraction) * float(radius))
    mf = m.astype(np.float32)
    num = cv2.GaussianBlur(img * mf[..., None], (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_CONSTANT)
    den = cv2.GaussianBlur(mf, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_CONSTANT)
    background = num / np.maximum(den, 1e-6)[..., None]
    out = np.clip(0.5 + float(gain) * (img - background), 0.0, 1.0)
    out[~m] = 0.5
    return out.astype(np.float32)


def parse_preprocess(spec) -> dict:
    """A profile's ``preprocess`` block, checked: ``none`` / ``local_contrast`` or
    ``{method: local_contrast, sigma_fraction: ..., gain: ...}`` -> ``{"method": ..., settings}``."""
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"preprocess must be a method name or a mapping, got {spec!r}")
    spec = dict(spec)
    method = str(spec.pop("method", "none"))
    if method not in PREPROCESSING:
        raise ValueError(f"preprocess.method {method!r}: use one of {list(PREPROCESSING)}")
    accepted = {"none": set(), "local_contrast": {"sigma_fraction", "gain"}}[method]
    unknown = sorted(set(spec) - accepted)
    if unknown:
        raise ValueError(f"preprocess ({method}): unknown key(s) {unknown}; accepted: {['method', *sorted(accepted)]}")
    out = {"method": method}
    for k in sorted(accepted):
        if k in spec:
            v = float(spec[k])
            if not np.isfinite(v) or v <= 0:
                raise ValueError(f"preprocess.{k} must be a positive number, got {spec[k]!r}")
            out[k] = v
    return out


def effective_preprocess(spec) -> dict:
    """:func:`parse_preprocess` with every default written out: what the preprocessing computes, so two
    blocks that compute the same compare equal (``{method: local_contrast}`` and ``{method: local_contrast,
    gain: 4}``)."""
    out = parse_preprocess(spec)
    if out["method"] == "local_contrast":
        out = {"sigma_fraction": DEFAULT_SIGMA_FRACTION, "gain": DEFAULT_GAIN, **out}
    return dict(sorted(out.items()))
