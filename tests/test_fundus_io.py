"""Tests for monailabel_dr.fundus.io and monailabel_dr.fundus.geometry (synthetic images only)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import nibabel as nib
import nrrd
import numpy as np
import pytest
from PIL import Image

from monailabel_dr.fundus.geometry import (
    FundusGeometry,
    compute_geometry,
    detect_fov,
    prepare,
    to_original,
    to_working,
)
from monailabel_dr.fundus.io import (
    FundusIOError,
    file_extension,
    is_grey,
    label_values,
    read_image,
    read_label,
    read_multichannel,
    to_rgb_float,
    write_image,
    write_label,
    write_multichannel,
)
from monailabel_dr.fundus import io as io_module
from monailabel_dr.fundus.lesions import LESION_COLORS, LESION_NAMES, LESIONS

from conftest import IDRID

H, W = 301, 457  # non-square on purpose
CY, CX, R = 150, 230, 140


def disc_mask(h: int = H, w: int = W, cy: int = CY, cx: int = CX, r: int = R) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def fundus(h: int = H, w: int = W, r: int = R, peak: float = 0.8, seed: int = 0) -> np.ndarray:
    """Synthetic colour fundus: reddish disc on black, brighter towards one side, mild noise (float RGB)."""
    rng = np.random.default_rng(seed)
    mask = disc_mask(h, w, r=r)
    yy, xx = np.mgrid[:h, :w]
    shade = 0.6 + 0.4 * (xx / w)  # asymmetric illumination
    img = np.zeros((h, w, 3), np.float32)
    for c, gain in enumerate((1.0, 0.5, 0.15)):
        img[..., c] = peak * gain * shade
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    img[~mask] = rng.uniform(0, 0.015, (int((~mask).sum()), 3))  # JPEG-like noisy black border
    return np.clip(img, 0, 1)


def test_file_extension() -> None:
    assert file_extension("x.nii.gz") == ".nii.gz"
    assert file_extension("/a/b/X.NII.GZ") == ".nii.gz"
    assert file_extension("a.b.PNG") == ".png"
    assert file_extension("seg.seg.nrrd") == ".nrrd"
    assert file_extension("noext") == ""


# --------------------------------------------------------------------------- geometry


def drawn_mask() -> np.ndarray:
    """Rectangles and single pixels inside the FOV, at asymmetric positions."""
    m = np.zeros((H, W), bool)
    m[60:100, 150:210] = True
    m[180:230, 280:330] = True
    m[140:150, 100:180] = True
    for y, x in ((150, 230), (31, 225), (270, 240), (150, 95), (149, 364)):
        m[y, x] = True
    assert (m & ~disc_mask()).sum() == 0
    return m


@pytest.mark.parametrize("clip", [0, 40])
def test_nearest_round_trip_is_exact(clip: int) -> None:
    fov = disc_mask(r=R + clip)  # clip > 0: disc cut at top/bottom -> non-square bbox, padding
    geom = compute_geometry(fov, 8)
    y0, y1, x0, x1 = geom.bbox
    assert geom.side == max(y1 - y0, x1 - x0)
    mask = drawn_mask()
    labels = mask.astype(np.uint8) * 3
    for size in (geom.side, geom.side + 1, geom.side + 37, 2 * geom.side + 3, 1000):
        g = FundusGeometry(H, W, geom.bbox, geom.side, size)
        work = to_working(mask, g, "nearest")
        assert work.shape == (size, size) and work.dtype == bool
        back = to_original(work, g, "nearest")
        assert back.dtype == bool
        np.testing.assert_array_equal(back, mask)
        back_l = to_original(to_working(labels, g, "nearest"), g, "nearest")
        assert back_l.dtype == np.uint8
        np.testing.assert_array_equal(back_l, labels)


def test_nearest_round_trip_exact_for_large_side() -> None:
    # S = side + 1 on a full-size FOV: OpenCV's 1/1024-px fixed-point nearest fails here, ours must not
    rng = np.random.default_rng(4)
    h, w = 1500, 1700
    geom = FundusGeometry(h, w, (10, 1490, 100, 1560), 1480, 1481)
    mask = np.zeros((h, w), bool)
    mask[10:1490, 100:1560] = rng.random((1480, 1460)) > 0.5
    np.testing.assert_array_equal(to_original(to_working(mask, geom, "nearest"), geom, "nearest"), mask)


@pytest.mark.parametrize("interp", ["linear", "area", "nearest"])
@pytest.mark.parametrize("dtype,channels", [(np.float32, 0), (np.float32, 3), (np.uint8, 0), (np.float64, 0)])
def test_to_original_into_an_uninitialised_array(interp: str, dtype, channels: int) -> None:
    """``out`` may hold anything: the result is the same as a fresh array's, zeros outside the bbox included
    (the single-channel float32 linear restore is written by OpenCV straight into it)."""
    geom = compute_geometry(disc_mask(), 96)
    shape = (96, 96, channels) if channels else (96, 96)
    work = (np.random.default_rng(1).random(shape) * (200 if dtype == np.uint8 else 1)).astype(dtype)
    want = to_original(work, geom, interp)
    out = np.full(want.shape, 77 if dtype == np.uint8 else np.nan, dtype)
    got = to_original(work, geom, interp, out=out)
    assert got is out
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="out is"):
        to_original(work, geom, interp, out=np.zeros((H + 1, W) + shape[2:], dtype))


@pytest.mark.parametrize("interp", ["linear", "area", "nearest"])
def test_downscaled_round_trip_keeps_shapes(interp: str) -> None:
    geom = compute_geometry(disc_mask(), 96)  # S = 96 < side = 281
    assert geom.out_size < geom.side
    mask = np.zeros((H, W), bool)
    rects = [(60, 100, 150, 210), (180, 230, 280, 330), (120, 150, 100, 180)]
    for y0, y1, x0, x1 in rects:
        mask[y0:y1, x0:x1] = True
    work = to_working(mask.astype(np.float32), geom, interp)
    back = to_original(work, geom, "linear" if interp != "nearest" else "nearest") >= 0.5
    for y0, y1, x0, x1 in rects:
        true = np.zeros_like(mask)
        true[y0:y1, x0:x1] = True
        got = back & cv2.dilate(true.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        iou = (got & true).sum() / (got | true).sum()
        assert iou > 0.9, (interp, iou)
        cy, cx = np.argwhere(true).mean(axis=0)
        gy, gx = np.argwhere(got).mean(axis=0)
        assert abs(cy - gy) <= 1.0 and abs(cx - gx) <= 1.0, (interp, cy, gy, cx, gx)


def test_matrix_places_points_and_serialises() -> None:
    geom = compute_geometry(disc_mask(r=R + 40), 512)
    d = json.loads(json.dumps(geom.to_dict()))
    assert FundusGeometry.from_dict(d) == geom
    assert all(type(v) is int for v in (d["height"], d["width"], d["side"], d["out_size"], *d["bbox"]))
    m = geom.matrix()
    y0, y1, x0, x1 = geom.bbox
    # centre of the bbox maps to the centre of the working square
    cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
    np.testing.assert_allclose(m @ [cx, cy, 1], [(512 - 1) / 2] * 2, atol=0.5 * m[0, 0] + 1e-9)
    # a marked pixel lands where the matrix says (linear warp of a blob: weighted centroid)
    img = np.zeros((H, W), np.float32)
    img[100:103, 300:303] = 1.0
    work = to_working(img, geom, "linear")
    ys, xs = np.nonzero(work)
    wy, wx = np.average(ys, weights=work[ys, xs]), np.average(xs, weights=work[ys, xs])
    np.testing.assert_allclose(m @ [301, 101, 1], [wx, wy], atol=0.05)
    # outside the bbox is zero in the original frame
    back = to_original(np.ones((512, 512, 2), np.float32), geom)
    assert (y0, y1) == (0, H) and x0 > 0 and x1 < W  # clipped disc: bbox spans the full height
    assert back.shape == (H, W, 2) and back[:, :x0].max() == 0 and back[:, x1:].max() == 0
    assert back[:, x0 + 1 : x1 - 1].min() > 0.99
    with pytest.raises(ValueError):
        to_working(img[:, :-1], geom)


def test_to_working_keeps_dtype_and_channels() -> None:
    geom = compute_geometry(disc_mask(), 128)
    rgb = fundus()
    maps = np.random.default_rng(1).random((H, W, 6)).astype(np.float32)
    for interp in ("linear", "nearest", "area"):
        w = to_working(rgb, geom, interp)
        assert w.shape == (128, 128, 3) and w.dtype == np.float32
        w6 = to_working(maps, geom, interp)
        assert w6.shape == (128, 128, 6)
        assert to_original(w6, geom, interp).shape == (H, W, 6)
        lab = to_working(np.full((H, W), 7, np.int32), geom, interp)
        assert lab.dtype == np.int32 and lab.max() == 7
    with pytest.raises(ValueError):
        to_working(rgb, geom, "cubic")


# --------------------------------------------------------------------------- FOV


def test_detect_fov_dark_image() -> None:
    truth = disc_mask()
    dark = fundus(peak=0.18)  # very dark fundus, noisy black border
    fov = detect_fov(dark)
    assert fov.dtype == bool and fov.shape == (H, W)
    iou = (fov & truth).sum() / (fov | truth).sum()
    assert iou > 0.95, iou
    fov8 = detect_fov((fundus() * 255).astype(np.uint8))
    assert (fov8 & truth).sum() / (fov8 | truth).sum() > 0.95


def test_detect_fov_fills_holes_and_ignores_small_blobs() -> None:
    img = fundus()
    img[120:160, 200:240] = 0.0  # a dark lesion inside the FOV is not a hole in the mask
    img[2:12, 2:40] = 1.0  # burnt-in text in the border is not the FOV
    fov = detect_fov(img)
    assert fov[140, 220] and not fov[5, 20]


def test_detect_fov_borderless_is_whole_image() -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:H, :W]
    base = 0.35 + 0.2 * np.sin(xx / 23.0) * np.cos(yy / 31.0)
    img = np.stack([base, 0.6 * base, 0.2 * base], -1) + rng.normal(0, 0.02, (H, W, 3))
    fov = detect_fov(np.clip(img, 0, 1).astype(np.float32))
    assert fov.mean() > 0.97


def test_detect_fov_refuses_flat_and_tiny() -> None:
    with pytest.raises(FundusIOError, match="no field of view"):
        detect_fov(np.full((H, W, 3), 0.5, np.float32))
    with pytest.raises(FundusIOError, match="no field of view"):
        detect_fov(np.zeros((H, W, 3), np.uint8))
    tiny = np.zeros((H, W, 3), np.float32)
    tiny[disc_mask(r=20)] = 0.8
    with pytest.raises(FundusIOError, match="covers only"):
        detect_fov(tiny)


def test_prepare() -> None:
    work, geom, wfov = prepare((fundus() * 255).astype(np.uint8), 256)
    assert work.shape == (256, 256, 3) and work.dtype == np.float32
    assert wfov.shape == (256, 256) and wfov.dtype == bool
    assert work.min() >= 0.0 and work.max() <= 1.0
    assert abs(geom.side - 2 * R - 1) <= 2 and (geom.height, geom.width) == (H, W)
    # the disc fills the square: FOV fraction close to pi/4
    assert abs(wfov.mean() - np.pi / 4) < 0.02


# --------------------------------------------------------------------------- labels


def make_label() -> np.ndarray:
    lab = np.zeros((H, W), np.uint8)
    lab[5, 7] = 1  # near top-left
    lab[200:210, 400:405] = 4  # bottom-right
    lab[30:35, 300:320] = 2
    lab[250, 20] = 3
    return lab


@pytest.mark.parametrize("ext", [".png", ".nrrd", ".nii.gz"])
def test_label_round_trip(tmp_path: Path, ext: str) -> None:
    lab = make_label()
    path = write_label(tmp_path / f"lab{ext}", lab)
    back = read_label(path)
    assert back.shape == (H, W) and back.dtype.kind in "iu"
    np.testing.assert_array_equal(back, lab)
    assert back[5, 7] == 1 and back[205, 402] == 4 and back[250, 20] == 3


def test_label_uint16_png(tmp_path: Path) -> None:
    lab = make_label().astype(np.uint16)
    lab[100, 100] = 300
    back = read_label(write_label(tmp_path / "big.png", lab))
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, lab)


def test_write_label_refuses_lossy_and_unknown(tmp_path: Path) -> None:
    for name in ("lab.jpg", "lab.jpeg", "lab.bmp"):
        with pytest.raises(ValueError, match=r"\.png, \.nrrd, \.nii\.gz"):
            write_label(tmp_path / name, make_label())


def test_label_nrrd_header(tmp_path: Path) -> None:
    path = write_label(tmp_path / "lab.nrrd", make_label())
    hdr = nrrd.read_header(path)
    assert list(hdr["sizes"]) == [W, H, 1]
    assert hdr["space"] == "left-posterior-superior"
    np.testing.assert_array_equal(hdr["space directions"], np.eye(3))
    np.testing.assert_array_equal(hdr["space origin"], np.zeros(3))
    names = {int(hdr[f"Segment{k}_LabelValue"]): hdr[f"Segment{k}_Name"] for k in range(4)}
    assert names == {i + 1: LESION_NAMES[c] for i, c in enumerate(LESIONS)}
    for k in range(4):
        code = LESIONS[int(hdr[f"Segment{k}_LabelValue"]) - 1]
        assert hdr[f"Segment{k}_ID"] == code and hdr[f"Segment{k}_Layer"] == "0"
        rgb = [float(v) for v in hdr[f"Segment{k}_Color"].split()]
        np.testing.assert_allclose(rgb, np.array(LESION_COLORS[code]) / 255, atol=1e-5)
    assert hdr["Segment0_Extent"] == "7 7 5 5 0 0"  # MA: single pixel at column 7, row 5
    data, _ = nrrd.read(path)  # raw (x, y, z) index: x = column, y = row
    assert data[7, 5, 0] == 1 and data[402, 205, 0] == 4


def test_label_custom_names(tmp_path: Path) -> None:
    lab = np.zeros((H, W), np.uint8)
    lab[10, 10] = 1
    lab[20, 20] = 9
    hdr = nrrd.read_header(
        write_label(tmp_path / "c.nrrd", lab, label_names={1: "Optic disc"}, colors={1: (0, 255, 0)})
    )
    assert hdr["Segment0_Name"] == "Optic disc" and hdr["Segment0_Color"] == "0 1 0"
    assert (
        hdr["Segment1_LabelValue"] == "9" and hdr["Segment1_Name"] == "Label 9"
    )  # unnamed values still shown


def test_label_nifti_affine(tmp_path: Path) -> None:
    img = nib.load(write_label(tmp_path / "lab.nii.gz", make_label()))
    assert img.shape == (W, H, 1)
    np.testing.assert_array_equal(img.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    data = np.asarray(img.dataobj)
    assert data[7, 5, 0] == 1
    # voxel (i=7, j=5) in RAS -> LPS (7, 5, 0): the same point as PNG pixel (row 5, col 7) in ITK
    ras = img.affine @ [7, 5, 0, 1]
    np.testing.assert_array_equal([-ras[0], -ras[1], ras[2]], [7, 5, 0])


def _nrrd_hdr(**extra: object) -> dict:
    hdr: dict = {"space": "left-posterior-superior", "encoding": "raw"}
    hdr.update(extra)
    return hdr


def test_read_slicer_style_nrrd(tmp_path: Path) -> None:
    lab = make_label()
    # 2-D, sizes (W, H)
    p2 = str(tmp_path / "slicer2d.nrrd")
    nrrd.write(
        p2,
        lab.T.copy(),
        _nrrd_hdr(
            **{
                "space directions": [[1, 0, 0], [0, 1, 0]],
                "space origin": [0, 0, 0],
                "kinds": ["domain", "domain"],
            }
        ),
    )
    np.testing.assert_array_equal(read_label(p2), lab)
    # seg.nrrd with a leading singleton list axis, sizes (1, W, H, 1)
    p4 = str(tmp_path / "layers.seg.nrrd")
    dirs = np.vstack([np.full((1, 3), np.nan), np.eye(3)])
    nrrd.write(
        p4,
        lab.T[None, :, :, None].copy(),
        _nrrd_hdr(
            **{
                "space directions": dirs,
                "space origin": [0, 0, 0],
                "kinds": ["list", "domain", "domain", "domain"],
            }
        ),
    )
    np.testing.assert_array_equal(read_label(p4), lab)
    # RAS space with directions diag(-1, -1): the same placement as identity LPS
    pr = str(tmp_path / "ras.nrrd")
    nrrd.write(
        pr,
        lab.T[..., None].copy(),
        {
            "space": "right-anterior-superior",
            "space directions": np.diag([-1.0, -1.0, 1.0]),
            "space origin": [0.0, 0.0, 0.0],
        },
    )
    np.testing.assert_array_equal(read_label(pr), lab)
    # RAS identity directions: stored flipped in both axes, origin at the far corner
    pf = str(tmp_path / "ras_flip.nrrd")
    flipped = lab[::-1, ::-1].T[..., None].copy()
    nrrd.write(
        pf,
        flipped,
        {
            "space": "right-anterior-superior",
            "space directions": np.eye(3),
            "space origin": [-(W - 1.0), -(H - 1.0), 0.0],
        },
    )
    np.testing.assert_array_equal(read_label(pf), lab)
    # no header geometry at all: like ITK, identity / origin 0
    pb = str(tmp_path / "bare.nrrd")
    nrrd.write(pb, lab.T.copy())
    np.testing.assert_array_equal(read_label(pb), lab)


def test_read_cropped_slicer_segmentation(tmp_path: Path) -> None:
    lab = make_label()
    crop = lab[3:260, 5:410]  # extent cropped by Slicer: origin at (x=5, y=3)
    assert crop.sum() == lab.sum()
    p = str(tmp_path / "crop.seg.nrrd")
    nrrd.write(
        p,
        crop.T[..., None].copy(),
        _nrrd_hdr(**{"space directions": np.eye(3), "space origin": [5.0, 3.0, 0.0]}),
    )
    np.testing.assert_array_equal(read_label(p, shape=(H, W)), lab)
    padded = read_label(p)
    np.testing.assert_array_equal(padded, lab[:260, :410])
    with pytest.raises(FundusIOError, match="outside"):
        read_label(p, shape=(200, W))
    half = str(tmp_path / "half.nrrd")
    nrrd.write(
        half,
        crop.T[..., None].copy(),
        _nrrd_hdr(**{"space directions": np.eye(3), "space origin": [5.5, 3.0, 0.0]}),
    )
    with pytest.raises(FundusIOError, match="not on a pixel"):
        read_label(half)


def test_read_label_refuses_unmappable(tmp_path: Path) -> None:
    lab = make_label()
    c, s = np.cos(0.3), np.sin(0.3)
    p = str(tmp_path / "rot.nrrd")
    nrrd.write(
        p,
        lab.T[..., None].copy(),
        _nrrd_hdr(**{"space directions": [[c, s, 0], [-s, c, 0], [0, 0, 1]], "space origin": [0, 0, 0]}),
    )
    with pytest.raises(FundusIOError, match="rotated"):
        read_label(p)
    pv = str(tmp_path / "vol.nrrd")
    nrrd.write(
        pv,
        np.zeros((W, H, 3), np.uint8),
        _nrrd_hdr(**{"space directions": np.eye(3), "space origin": [0, 0, 0]}),
    )
    with pytest.raises(FundusIOError, match="3-D volume"):
        read_label(pv)
    rgb = tmp_path / "rgb.png"
    cv2.imwrite(str(rgb), np.dstack([lab * 60, lab, lab]))
    with pytest.raises(FundusIOError, match="single-channel"):
        read_label(rgb)
    with pytest.raises(FundusIOError, match="not found"):
        read_label(tmp_path / "missing.png")
    with pytest.raises(FundusIOError, match="accepted"):
        read_label(tmp_path / "x.jpg")


# --------------------------------------------------------------------------- images


def photo() -> np.ndarray:
    rgb = (fundus() * 255).astype(np.uint8)
    rgb[10:19, 300:309] = (250, 10, 20)  # marker near the top right (non-symmetric)
    rgb[280:289, 40:49] = (10, 240, 30)  # marker near the bottom left
    return rgb


def _check_markers(img: np.ndarray, tol: int) -> None:
    assert img.shape == (H, W, 3)
    np.testing.assert_allclose(img[14, 304].astype(int), (250, 10, 20), atol=tol)
    np.testing.assert_allclose(img[284, 44].astype(int), (10, 240, 30), atol=tol)


@pytest.mark.parametrize("ext", [".png", ".tif", ".tiff", ".nii.gz", ".nii"])
def test_read_image_lossless_rgb(tmp_path: Path, ext: str) -> None:
    rgb = photo()
    img = read_image(write_image(tmp_path / f"a{ext}", rgb))
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img, rgb)
    _check_markers(img, 0)


def test_read_image_jpg(tmp_path: Path) -> None:
    img = read_image(write_image(tmp_path / "a.jpg", photo()))
    assert img.dtype == np.uint8
    _check_markers(img, 40)


def _pil_decode(path: Path) -> np.ndarray:
    """What read_image returned before JPEGs were decoded with OpenCV: PIL's decode."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("options", [{}, {"subsampling": 0}, {"subsampling": 1}, {"progressive": True},
                                     {"quality": 60, "optimize": True}])
def test_jpeg_fast_decode_is_pil_decode(tmp_path: Path, options) -> None:
    """8-bit colour JPEGs are decoded by OpenCV (io._decode_complete_jpeg) and give PIL's pixels exactly, for every
    chroma subsampling and progressive files; the EXIF orientation is ignored as PIL's decode ignores it."""
    rgb = photo()
    exif = Image.Exif()
    exif[0x0112] = 6   # "rotate 90": OpenCV would apply it unless told not to
    Image.fromarray(rgb).save(tmp_path / "a.jpg", exif=exif, **options)
    with Image.open(tmp_path / "a.jpg") as im:
        assert io_module._decode_complete_jpeg(tmp_path / "a.jpg", im) is not None   # the fast path ran
    got = read_image(tmp_path / "a.jpg")
    assert got.dtype == np.uint8 and got.shape == rgb.shape
    np.testing.assert_array_equal(got, _pil_decode(tmp_path / "a.jpg"))


@pytest.mark.skipif(not IDRID.is_dir(), reason="needs ../shared/data (real IDRiD and graded JPEG photographs)")
def test_jpeg_fast_decode_is_pil_decode_on_real_photographs() -> None:
    graded = sorted((IDRID.parent / "graded_dr" / "images").glob("*.jp*g"))
    files = sorted((IDRID / "images").glob("*.jpg"))[:2] + graded[:: max(1, len(graded) // 4)][:4]
    assert files
    for f in files:
        np.testing.assert_array_equal(read_image(f), _pil_decode(f), err_msg=f.name)


def test_truncated_or_padded_jpeg_goes_through_pil(tmp_path: Path) -> None:
    """OpenCV decodes a truncated JPEG to a grey-filled image; it must still be refused, as PIL refuses it. A JPEG
    with bytes after its end marker is read through PIL and gives the same pixels."""
    Image.fromarray(photo()).save(tmp_path / "a.jpg", quality=95)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) * 2 // 3])
    with Image.open(tmp_path / "trunc.jpg") as im:
        assert io_module._decode_complete_jpeg(tmp_path / "trunc.jpg", im) is None
    with pytest.raises(FundusIOError, match="corrupt or truncated"):
        read_image(tmp_path / "trunc.jpg")
    (tmp_path / "tail.jpg").write_bytes(data + b"trailing bytes")
    with Image.open(tmp_path / "tail.jpg") as im:
        assert io_module._decode_complete_jpeg(tmp_path / "tail.jpg", im) is None
    np.testing.assert_array_equal(read_image(tmp_path / "tail.jpg"), read_image(tmp_path / "a.jpg"))
    Image.fromarray(photo()[..., 1]).save(tmp_path / "grey.jpg")   # grey and CMYK JPEGs stay with PIL
    with Image.open(tmp_path / "grey.jpg") as im:
        assert io_module._decode_complete_jpeg(tmp_path / "grey.jpg", im) is None
    assert read_image(tmp_path / "grey.jpg").shape == (H, W)


def test_read_image_16bit_and_grey(tmp_path: Path) -> None:
    grey16 = photo()[..., 1].astype(np.uint16) * 257
    grey16[3, 400] = 65535
    for ext in (".png", ".tif"):
        img = read_image(write_image(tmp_path / f"g16{ext}", grey16))
        assert img.dtype == np.uint16 and img.shape == (H, W)
        np.testing.assert_array_equal(img, grey16)
    rgb16 = photo().astype(np.uint16) * 257
    rgb16[3, 400] = (65535, 1, 300)
    for ext in (".png", ".tif"):
        img = read_image(write_image(tmp_path / f"c16{ext}", rgb16))
        assert img.dtype == np.uint16
        np.testing.assert_array_equal(img, rgb16)
    grey = photo()[..., 0]
    np.testing.assert_array_equal(read_image(write_image(tmp_path / "g.nii.gz", grey)), grey)


def test_read_image_mode_conversions(tmp_path: Path) -> None:
    rgb = photo()
    rgba = np.dstack([rgb, np.full((H, W), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)
    palette = np.random.default_rng(2).integers(0, 256, (256, 3), dtype=np.uint8)
    index = (np.arange(H * W).reshape(H, W) % 251).astype(np.uint8)
    pal_im = Image.fromarray(index, "P")
    pal_im.putpalette(palette.ravel().tolist())
    pal_im.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_image(tmp_path / "pal.png"), palette[index])
    la = np.dstack([rgb[..., 0], np.full((H, W), 255, np.uint8)])
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    grey = read_image(tmp_path / "la.png")
    assert grey.shape == (H, W)
    np.testing.assert_array_equal(grey, rgb[..., 0])


def test_read_image_nifti_layouts(tmp_path: Path) -> None:
    rgb = photo()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    # (X, Y, 1, 3)
    nib.save(nib.Nifti1Image(rgb.transpose(1, 0, 2)[:, :, None, :].copy(), lps), tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "a.nii.gz"), rgb)
    # (X, Y, 3)
    nib.save(nib.Nifti1Image(rgb.transpose(1, 0, 2).copy(), lps), tmp_path / "b.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "b.nii.gz"), rgb)
    # (X, Y) float grey
    g = rgb[..., 1].astype(np.float32) / 255
    nib.save(nib.Nifti1Image(g.T.copy(), lps), tmp_path / "g.nii.gz")
    out = read_image(tmp_path / "g.nii.gz")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, g)
    # identity RAS affine: ITK/Slicer show it rotated by 180 degrees, so do we
    nib.save(nib.Nifti1Image(rgb[..., 0].T.copy(), np.eye(4)), tmp_path / "ras.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "ras.nii.gz"), rgb[::-1, ::-1, 0])
    # an origin off the pixel grid does not matter for a photograph
    off = np.diag([-1.0, -1.0, 1.0, 1.0])
    off[:3, 3] = (10.25, -3.5, 2.0)
    nib.save(nib.Nifti1Image(rgb[..., 2].T.copy(), off), tmp_path / "off.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "off.nii.gz"), rgb[..., 2])
    # RGB24 written by write_image
    written = nib.load(write_image(tmp_path / "c.nii.gz", rgb))
    assert written.get_data_dtype().names == ("R", "G", "B") and written.shape == (W, H, 1)
    # a real volume is refused
    nib.save(nib.Nifti1Image(np.zeros((W, H, 7), np.uint8), lps), tmp_path / "vol.nii.gz")
    with pytest.raises(FundusIOError, match="2-D photograph"):
        read_image(tmp_path / "vol.nii.gz")


def test_read_image_errors(tmp_path: Path) -> None:
    with pytest.raises(FundusIOError, match="not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "a.bmp").write_bytes(b"BM")
    with pytest.raises(FundusIOError, match=r"unsupported image file type '\.bmp'.*\.jpg"):
        read_image(tmp_path / "a.bmp")
    (tmp_path / "text.png").write_text("this is not an image\n")
    with pytest.raises(FundusIOError, match="not a readable PNG") as err:
        read_image(tmp_path / "text.png")
    assert str(tmp_path) not in str(err.value)  # no server paths in user-facing messages
    good = Path(write_image(tmp_path / "good.png", photo())).read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(FundusIOError, match="corrupt or truncated"):
        read_image(tmp_path / "trunc.png")
    (tmp_path / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(FundusIOError):
        read_image(tmp_path / "garbage.jpg")
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(FundusIOError, match="NIfTI"):
        read_image(tmp_path / "bad.nii.gz")
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    with pytest.raises(FundusIOError, match="too small.*at least 64"):
        read_image(tmp_path / "one.png")


def test_read_image_size_limit_from_header(tmp_path: Path) -> None:
    Image.new("1", (8000, 6000)).save(tmp_path / "huge.png")  # 48 MP, a few kB on disk
    t0 = time.perf_counter()
    with pytest.raises(FundusIOError, match=r"8000x6000.*too large.*40\.0 MP"):
        read_image(tmp_path / "huge.png")
    assert time.perf_counter() - t0 < 0.5  # refused from the header, not decoded
    Image.new("L", (6000, 4000)).save(tmp_path / "ok.png")
    assert read_image(tmp_path / "ok.png").shape == (4000, 6000)
    with pytest.raises(FundusIOError, match="too large"):
        read_image(tmp_path / "ok.png", max_pixels=1_000_000)


def test_to_rgb_float_and_is_grey() -> None:
    g8 = np.array([[0, 255], [51, 102]], np.uint8)
    f = to_rgb_float(g8)
    assert f.shape == (2, 2, 3) and f.dtype == np.float32
    np.testing.assert_allclose(f[1, 0], [0.2, 0.2, 0.2], atol=1e-6)
    np.testing.assert_allclose(to_rgb_float(np.full((2, 2, 3), 65535, np.uint16)), 1.0)
    fl = to_rgb_float(np.array([[-1.0, 3.0]], np.float64))
    np.testing.assert_allclose(fl[0, :, 0], [0.0, 1.0])
    inside = np.array([[0.25, 0.5]], np.float32)
    np.testing.assert_allclose(to_rgb_float(inside)[0, :, 1], [0.25, 0.5])
    assert is_grey(g8) and is_grey(g8[..., None]) and is_grey(np.dstack([g8] * 3))
    assert not is_grey(photo())
    # every 8-bit value gives exactly float32(v) / 255 (to_rgb_float looks it up in a table)
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(to_rgb_float(np.dstack([every, every[::-1], every.T]))[..., 0], every.astype(np.float32) / 255.0)
    assert np.array_equal(to_rgb_float(every)[..., 2], every.astype(np.float32) / 255.0)
    # the FOV's brightness of to_rgb_float's output (OpenCV transform) is (R + G) * 0.5 exactly, for every pair of
    # 8-bit values
    from monailabel_dr.fundus.geometry import _brightness

    r, g = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    unit = to_rgb_float(np.dstack([r, g, g[::-1]]))
    assert np.array_equal(_brightness(unit, unit_rgb=True), (unit[..., 0] + unit[..., 1]) * np.float32(0.5))
    assert np.array_equal(_brightness(unit), _brightness(unit, unit_rgb=True))
    # is_grey checks a sparse grid first: a colour difference off the grid is still found
    big = np.dstack([np.full((64, 64), 7, np.uint8)] * 3)
    assert is_grey(big)
    big[33, 17, 2] = 8
    assert not is_grey(big)


# --------------------------------------------------------------------------- probability maps


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz"])
def test_multichannel_round_trip(tmp_path: Path, ext: str) -> None:
    rng = np.random.default_rng(5)
    maps = rng.random((4, H, W)).astype(np.float32)
    maps[2, 5, 7] = 7.0  # non-symmetric marker
    names = list(LESIONS)
    path = write_multichannel(tmp_path / f"p{ext}", maps, names)
    back, got = read_multichannel(path)
    assert got == names and back.dtype == np.float32 and back.shape == (4, H, W)
    np.testing.assert_array_equal(back, maps)
    assert back[2, 5, 7] == 7.0
    if ext == ".nrrd":
        hdr = nrrd.read_header(path)
        assert list(hdr["sizes"]) == [4, W, H, 1] and hdr["kinds"][0] == "list"
        assert json.loads(hdr["channel_names"]) == names
    else:
        img = nib.load(path)
        assert img.shape == (W, H, 1, 4)
        np.testing.assert_array_equal(img.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="accepted"):
        write_multichannel(tmp_path / "p.png", maps, names)
    with pytest.raises(ValueError, match="names"):
        write_multichannel(tmp_path / f"q{ext}", maps, names[:2])


# --------------------------------------------------------------------------- label values


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64, bool, np.float32])
def test_label_values_is_np_unique(dtype) -> None:
    """io.label_values (a one-pass table for integer maps) answers what np.unique does, negative values,
    a single value, an empty map and wide ranges (np.unique's fallback) included."""
    rng = np.random.default_rng(3)
    cases = [rng.integers(0, 5, (40, 60)), rng.integers(-7, 3, (40, 60)), np.full((5, 4), 3), np.zeros((0, 4)),
             np.array([[0, 1 << 21], [5, 5]])]
    for arr in cases:
        a = arr.astype(dtype)
        if np.dtype(dtype).kind in "iu" and not np.array_equal(a, arr):
            continue   # the case does not fit the type (a negative in uint8, 2^21 in int16...)
        got = label_values(a)
        assert got.tolist() == np.unique(a).tolist(), (dtype, arr)
