"""Field of view (FOV) detection and the mapping between original and working resolution.

All arrays are in display orientation: (H, W) or (H, W, C), row 0 at the top.

The working image is built by cropping the photograph to the FOV bounding box,
centring that box in a zero-padded square of side ``side`` and resizing the square
to ``out_size`` x ``out_size``. The whole mapping is one affine transform
(:meth:`FundusGeometry.matrix`, OpenCV pixel-centre convention); :func:`to_working`
applies it and :func:`to_original` applies its exact inverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .io import FundusIOError, to_rgb_float
from .components import connected_components

__all__ = ["FundusGeometry", "compute_geometry", "detect_fov", "prepare", "to_original", "to_working"]

INTERPOLATIONS: dict[str, int] = {
    "linear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "area": cv2.INTER_AREA,
}
_CV_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)
_CV_MAX_CHANNELS = 4  # cv2.resize (INTER_AREA) handles at most 4 channels per call
MIN_FOV_FRACTION = 0.05


@dataclass(frozen=True)
class FundusGeometry:
    """Original image size, FOV bounding box and working resolution."""

    height: int
    width: int
    bbox: tuple[int, int, int, int]  # (y0, y1, x0, x1); y1, x1 exclusive; original pixels
    side: int  # side of the square the bbox is centred in
    out_size: int  # working resolution S (S x S)

    def __post_init__(self) -> None:
        for name in ("height", "width", "side", "out_size"):
            object.__setattr__(self, name, int(getattr(self, name)))
        bbox = tuple(int(v) for v in self.bbox)
        object.__setattr__(self, "bbox", bbox)
        y0, y1, x0, x1 = bbox
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise ValueError(f"bbox {bbox} is not inside a {self.height}x{self.width} image")
        if self.side < max(y1 - y0, x1 - x0):
            raise ValueError(f"side {self.side} is smaller than the bbox {bbox}")
        if self.out_size < 1:
            raise ValueError(f"out_size must be >= 1, got {self.out_size}")

    @property
    def pad(self) -> tuple[int, int]:
        """(top, left) zero padding that centres the bbox in the square."""
        y0, y1, x0, x1 = self.bbox
        return (self.side - (y1 - y0)) // 2, (self.side - (x1 - x0)) // 2

    @property
    def scale(self) -> float:
        return self.out_size / self.side

    def to_dict(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "width": self.width,
            "bbox": list(self.bbox),
            "side": self.side,
            "out_size": self.out_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FundusGeometry:
        y0, y1, x0, x1 = d["bbox"]
        return cls(int(d["height"]), int(d["width"]), (y0, y1, x0, x1), int(d["side"]), int(d["out_size"]))

    def matrix(self) -> np.ndarray:
        """2x3 affine mapping original (x, y) -> working (x, y), pixel centres at integers.

        x_w = (x - X0 + 0.5) * s - 0.5 with X0 = x0 - pad_left the square's left edge and
        s = out_size / side (the convention of cv2.resize, so "area" agrees with it).
        """
        s = self.scale
        pad_y, pad_x = self.pad
        sq_y0, sq_x0 = self.bbox[0] - pad_y, self.bbox[2] - pad_x
        return np.array([[s, 0.0, (0.5 - sq_x0) * s - 0.5], [0.0, s, (0.5 - sq_y0) * s - 0.5]])

    def _crop_matrix(self) -> np.ndarray:
        """``matrix()`` expressed for coordinates inside the bbox crop."""
        m = self.matrix()
        m[0, 2] += m[0, 0] * self.bbox[2]
        m[1, 2] += m[1, 1] * self.bbox[0]
        return m


# --------------------------------------------------------------------------- FOV


_HALF_RED_GREEN = np.array([[0.5, 0.5, 0.0]], np.float32)


def _brightness(rgb: np.ndarray, unit_rgb: bool = False) -> np.ndarray:
    """(R + G) / 2 in [0, 1] as float32 (blue carries little signal in fundus photographs).

    ``unit_rgb``: ``rgb`` is already float32 (H, W, 3) in [0, 1] (``to_rgb_float``'s output), so it is not
    checked again (two passes over a 12 MP photograph). The sum is then OpenCV's ``transform`` with weights
    0.5, 0.5, 0: the same float32 values as ``(R + G) * 0.5`` (halving is exact, adding 0 x B changes
    nothing; tests/test_fundus_io.py), in one parallel pass instead of two strided ones."""
    arr = np.asarray(rgb)
    if arr.ndim == 3 and arr.shape[2] >= 3 and arr.dtype in (np.uint8, np.uint16):
        scale = 255.0 if arr.dtype == np.uint8 else 65535.0
        return (arr[..., 0].astype(np.float32) + arr[..., 1]) / np.float32(2 * scale)
    f = arr if unit_rgb else to_rgb_float(arr)
    if f.ndim == 3 and f.shape[2] == 3 and f.dtype == np.float32 and f.size:
        return cv2.transform(f, _HALF_RED_GREEN).reshape(f.shape[:2])
    return (f[..., 0] + f[..., 1]) * np.float32(0.5)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes of a uint8 0/1 mask: flood the background from outside (OpenCV), the rest is inside."""
    h, w = mask.shape
    outside = np.zeros((h + 2, w + 2), np.uint8)  # 1-px frame so every border region is reached
    outside[1:-1, 1:-1] = mask
    flood_mask = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(outside, flood_mask, (0, 0), (2,))
    return outside[1:-1, 1:-1] != 2


FOV_DETECT_SIDE = 1024


def detect_fov(rgb: np.ndarray, unit_rgb: bool = False) -> np.ndarray:
    """Boolean (H, W) field-of-view mask of an RGB float [0, 1] (or uint8/uint16, or grey) image
    (``unit_rgb``: it is ``to_rgb_float``'s output, not checked again).

    Smoothed (R+G)/2 brightness is thresholded just above the dark background level
    (so dark fundi are kept), then the largest connected component is taken and its
    holes are filled. A borderless image gives (almost) the whole image. Raises
    :class:`FundusIOError` for a (nearly) uniform picture or a FOV under 5 % of it.
    """
    full = _brightness(rgb, unit_rgb)
    h, w = full.shape
    # Detect on a copy at most FOV_DETECT_SIDE px wide: a 12 MP photograph gives the same
    # border to within a few pixels, ~10x faster; the mask is scaled back with nearest.
    scale = FOV_DETECT_SIDE / max(h, w)
    bright = cv2.resize(full, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA) if scale < 1 else full
    if float(bright.std()) < 0.01:
        raise FundusIOError(
            "no field of view found: the image is (nearly) uniform; a colour fundus photograph is expected"
        )
    sigma = float(np.clip(min(bright.shape) / 500.0, 1.0, 4.0))
    smooth = cv2.GaussianBlur(bright, (0, 0), sigma)
    lo, hi = (float(v) for v in np.percentile(smooth, (0.5, 99.5)))
    if hi - lo < 0.02:
        raise FundusIOError(
            "no field of view found: the image has almost no contrast; a colour fundus photograph is expected"
        )
    # Just above the darkest level: black borders (with JPEG noise) fall below, dark fundus does not.
    thresh = lo + max(0.1 * (hi - lo), 0.01)
    above = (smooth > thresh).astype(np.uint8)
    comps = connected_components(above)
    if comps.n < 1:
        raise FundusIOError("no field of view found: no region is brighter than the background")
    largest = 1 + int(np.argmax(comps.areas))
    fov = _fill_holes((comps.labels == largest).astype(np.uint8))
    if scale < 1:
        fov = cv2.resize(fov.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    fraction = float(fov.mean())
    if fraction < MIN_FOV_FRACTION:
        raise FundusIOError(
            f"no field of view found: the largest bright region covers only {100 * fraction:.1f} % "
            f"of the image (at least {100 * MIN_FOV_FRACTION:.0f} % expected for a fundus photograph)"
        )
    return fov


def compute_geometry(fov: np.ndarray, out_size: int) -> FundusGeometry:
    """Geometry from a boolean (H, W) FOV mask and a working resolution S."""
    mask = np.asarray(fov, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"fov must be (H, W), got shape {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise FundusIOError("no field of view found: the FOV mask is empty")
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(y1 - y0, x1 - x0)
    return FundusGeometry(mask.shape[0], mask.shape[1], (y0, y1, x0, x1), side, int(out_size))


# --------------------------------------------------------------------------- resampling


def _nearest_index(k: np.ndarray, num: int, den: int) -> np.ndarray:
    """floor((2k + 1) * num / (2 den)) for integer pixel indices k, in exact integer arithmetic.

    This is nearest-neighbour sampling through geom.matrix() (or its inverse) along one
    axis. It is written by hand rather than using cv2's INTER_NEAREST because OpenCV
    quantises coordinates to 1/1024 px (warpAffine) or drops the half-pixel offset
    (resize), which would break the exact round trip to_original(to_working(mask)).
    """
    return (2 * k.astype(np.int64) + 1) * num // (2 * den)


def _gather(src: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """out[i, j] = src[rows[i], cols[j]] where both are in range, 0 elsewhere (separable indexing)."""
    out = np.zeros(shape + src.shape[2:], dtype=src.dtype)
    ok_r = (rows >= 0) & (rows < src.shape[0])
    ok_c = (cols >= 0) & (cols < src.shape[1])
    if ok_r.any() and ok_c.any():
        out[np.ix_(ok_r, ok_c)] = src[rows[ok_r]][:, cols[ok_c]]
    return out


def _cv_apply(arr: np.ndarray, fn: Any) -> np.ndarray:
    """Run an OpenCV resampling ``fn`` on any dtype / channel count, keeping dtype and shape rank."""
    dtype = arr.dtype
    if dtype.kind == "b":
        work = arr.astype(np.float32)
    elif dtype in _CV_DTYPES:
        work = arr
    elif dtype.kind == "f":
        work = arr.astype(np.float32)
    else:  # int8/int32/int64/uint32...: interpolate in float64, round back
        work = arr.astype(np.float64)
    if work.ndim == 3 and work.shape[2] > _CV_MAX_CHANNELS:
        parts = [
            fn(np.ascontiguousarray(work[..., i : i + _CV_MAX_CHANNELS]))
            for i in range(0, work.shape[2], _CV_MAX_CHANNELS)
        ]
        parts = [p[..., None] if p.ndim == 2 else p for p in parts]
        out = np.concatenate(parts, axis=2)
    else:
        out = fn(np.ascontiguousarray(work))
        if work.ndim == 3 and out.ndim == 2:  # OpenCV drops a trailing single channel
            out = out[..., None]
    if dtype.kind == "b":
        return out >= 0.5
    if dtype.kind in "biu" and dtype not in _CV_DTYPES:
        info = np.iinfo(dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(dtype)
    return out.astype(dtype, copy=False)


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")


def to_working(img: np.ndarray, geom: FundusGeometry, interpolation: str = "linear") -> np.ndarray:
    """(H, W[, C]) original -> (S, S[, C]) working: crop to bbox, centre in a zero square, resize."""
    _check_interpolation(interpolation)
    arr = np.asarray(img)
    if arr.shape[:2] != (geom.height, geom.width):
        raise ValueError(f"image is {arr.shape[:2]}, geometry expects {(geom.height, geom.width)}")
    y0, y1, x0, x1 = geom.bbox
    crop = arr[y0:y1, x0:x1]
    pad_y, pad_x = geom.pad
    size = geom.out_size
    if interpolation == "nearest":
        # working pixel u samples square pixel floor((u + 0.5) * side / S) = crop pixel that - pad
        u = np.arange(size)
        rows = _nearest_index(u, geom.side, size) - pad_y
        cols = _nearest_index(u, geom.side, size) - pad_x
        return _gather(crop, rows, cols, (size, size))
    if interpolation == "area":
        # warpAffine has no area mode: same affine realised as zero-pad + cv2.resize(INTER_AREA)
        def fn(a: np.ndarray) -> np.ndarray:
            sq = cv2.copyMakeBorder(
                a,
                pad_y,
                geom.side - (y1 - y0) - pad_y,
                pad_x,
                geom.side - (x1 - x0) - pad_x,
                cv2.BORDER_CONSTANT,
                value=(0, 0, 0, 0),
            )
            return cv2.resize(sq, (size, size), interpolation=cv2.INTER_AREA)

        return _cv_apply(crop, fn)
    m = geom._crop_matrix()
    return _cv_apply(
        crop,
        lambda a: cv2.warpAffine(
            a,
            m,
            (size, size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(0, 0, 0, 0),
        ),
    )


def to_original(arr: np.ndarray, geom: FundusGeometry, interpolation: str = "linear",
                out: np.ndarray | None = None) -> np.ndarray:
    """(S, S[, C]) working -> (H, W[, C]) original via the exact inverse affine; zeros outside the bbox.

    ``out``: an (H, W[, C]) array of the result's dtype to write into (returned); it need not be zero-filled,
    the part outside the bbox is set to 0 here. A single-channel float32 linear restore is then written by
    OpenCV straight into ``out``'s bbox (no bbox-size intermediate and copy: on a 12 MP photograph these were
    a third of the restore's time)."""
    _check_interpolation(interpolation)
    work = np.asarray(arr)
    size = geom.out_size
    if work.shape[:2] != (size, size):
        raise ValueError(f"array is {work.shape[:2]}, geometry expects {(size, size)}")
    y0, y1, x0, x1 = geom.bbox
    bh, bw = y1 - y0, x1 - x0
    pad_y, pad_x = geom.pad
    if out is not None:
        if out.shape != (geom.height, geom.width) + work.shape[2:]:
            raise ValueError(f"out is {out.shape}, expected {(geom.height, geom.width) + work.shape[2:]}")
        out[:y0] = 0
        out[y1:] = 0
        out[y0:y1, :x0] = 0
        out[y0:y1, x1:] = 0
        if interpolation == "linear" and work.ndim == 2 and work.dtype == np.float32 == out.dtype:
            cv2.warpAffine(work, geom._crop_matrix(), (bw, bh), dst=out[y0:y1, x0:x1],
                           flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=(0, 0, 0, 0))
            return out
    if interpolation == "nearest":
        # crop pixel k is square pixel k + pad, which samples working pixel floor((k + pad + 0.5) * S / side)
        rows = _nearest_index(np.arange(bh) + pad_y, size, geom.side)
        cols = _nearest_index(np.arange(bw) + pad_x, size, geom.side)
        crop = _gather(work, rows, cols, (bh, bw))
    elif interpolation == "area":

        def fn(a: np.ndarray) -> np.ndarray:
            sq = cv2.resize(a, (geom.side, geom.side), interpolation=cv2.INTER_AREA)
            return sq[pad_y : pad_y + bh, pad_x : pad_x + bw]

        crop = _cv_apply(work, fn)
    else:
        m = geom._crop_matrix()
        crop = _cv_apply(
            work,
            lambda a: cv2.warpAffine(
                a,
                m,
                (bw, bh),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=(0, 0, 0, 0),
            ),
        )
    if out is None:
        out = np.zeros((geom.height, geom.width) + work.shape[2:], dtype=crop.dtype)
    out[y0:y1, x0:x1] = crop
    return out


def prepare(img: np.ndarray, out_size: int, fov: np.ndarray | None = None,
            unit_rgb: bool = False) -> tuple[np.ndarray, FundusGeometry, np.ndarray]:
    """RGB image -> (working RGB float32 (S, S, 3), geometry, working FOV mask bool (S, S)).

    ``fov``: a field-of-view mask already detected on this image (else it is detected here).
    ``unit_rgb``: ``img`` is already ``to_rgb_float``'s output (not converted or checked again).
    """
    rgb = img if unit_rgb else to_rgb_float(img)
    fov = detect_fov(rgb, unit_rgb=True) if fov is None else np.asarray(fov, dtype=bool)
    geom = compute_geometry(fov, out_size)
    interpolation = "area" if out_size < geom.side else "linear"
    work = to_working(rgb, geom, interpolation).astype(np.float32, copy=False)
    work_fov = to_working(fov, geom, interpolation)
    return work, geom, work_fov
