"""Tests of the synthetic fundus phantoms (monailabel_dr.fundus.phantoms)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from monailabel_dr.fundus.lesions import LESIONS, is_referable
from monailabel_dr.fundus.phantoms import (
    QUADRANTS,
    SEVERE_HE_PER_QUADRANT,
    Phantom,
    grade_from_findings,
    make_phantom,
)

SEEDS = (0, 1, 2)
GRADES = (0, 1, 2, 3, 4)


@lru_cache(maxsize=None)
def _phantom(seed: int, grade: int | None = None, size: tuple[int, int] = (480, 640)) -> Phantom:
    return make_phantom(seed, size=size, grade=grade)


def _graded():
    return [_phantom(s, g) for g in GRADES for s in SEEDS]


def _disc_mask(p: Phantom) -> np.ndarray:
    h, w = p.fov.shape
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = p.info["disc_center"]
    rx, ry = p.info["disc_radii"]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _union(p: Phantom) -> np.ndarray:
    u = p.nv_mask.copy()
    for m in p.masks.values():
        u |= m
    return u


def _ring(mask: np.ndarray, exclude: np.ndarray, inner: int, outer: int) -> np.ndarray:
    dist = ndimage.distance_transform_edt(~mask)
    return (dist > inner) & (dist <= outer) & ~exclude


def _chroma_r(rgb: np.ndarray) -> float:
    return float(rgb[0] / rgb.sum())


# ------------------------------------------------------------------ determinism


def test_same_seed_is_byte_identical():
    a = make_phantom(11, grade=4)
    b = make_phantom(11, grade=4)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.healthy.tobytes() == b.healthy.tobytes()
    assert np.array_equal(a.fov, b.fov) and np.array_equal(a.nv_mask, b.nv_mask)
    for name in LESIONS:
        assert np.array_equal(a.masks[name], b.masks[name])
    assert a.findings == b.findings and a.info == b.info and a.grade == b.grade
    c, d = make_phantom(5), make_phantom(5)  # grade drawn from the seed
    assert c.grade == d.grade and c.image.tobytes() == d.image.tobytes()


def test_different_seeds_differ():
    a, b = make_phantom(1, grade=2), make_phantom(2, grade=2)
    assert a.image.shape == b.image.shape
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.healthy, b.healthy)
    assert a.info["disc_center"] != b.info["disc_center"]


def test_does_not_touch_global_rng():
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    make_phantom(3, grade=3)
    assert np.random.random() == expected


# ------------------------------------------------------------------ grades


@pytest.mark.parametrize("grade", GRADES)
def test_requested_grade(grade):
    for seed in SEEDS:
        p = _phantom(seed, grade)
        assert p.grade == grade
        assert grade_from_findings(p.findings) == grade
        assert p.info["grade"] == grade
        assert p.findings["referable"] == is_referable(grade)


def test_grade_none_covers_all_grades():
    grades = [make_phantom(seed, size=(240, 320)).grade for seed in range(50)]
    assert set(grades) == set(GRADES)
    for seed in (0, 7):  # the drawn grade is reproducible and consistent with the findings
        p = make_phantom(seed, size=(240, 320))
        assert p.grade == grades[seed] == grade_from_findings(p.findings)


def test_grade_rule():
    quads = {q: SEVERE_HE_PER_QUADRANT for q in QUADRANTS}
    assert grade_from_findings({}) == 0
    assert grade_from_findings({"MA": 0, "HE": 0, "EX": 0, "SE": 0}) == 0
    assert grade_from_findings({"MA": 3}) == 1
    assert grade_from_findings({"MA": 3, "EX": 4}) == 2
    assert grade_from_findings({"SE": 1}) == 2
    assert grade_from_findings({"HE": 2, "haemorrhages_per_quadrant": {**quads, "inferior_nasal": 0}}) == 2
    few = {**quads, "superior_nasal": SEVERE_HE_PER_QUADRANT - 1}
    assert grade_from_findings({"HE": sum(few.values()), "haemorrhages_per_quadrant": few}) == 2
    assert grade_from_findings({"HE": sum(quads.values()), "haemorrhages_per_quadrant": quads}) == 3
    assert grade_from_findings({"MA": 2, "neovascularization": True}) == 4
    assert grade_from_findings({"preretinal_haemorrhage": True}) == 4


def test_amounts_separate_the_grades():
    for seed in SEEDS:
        mild, moderate, severe, pdr = (_phantom(seed, g) for g in (1, 2, 3, 4))
        assert 0 < mild.findings["MA"] and mild.findings["HE"] == mild.findings["EX"] == mild.findings["SE"] == 0
        assert moderate.findings["HE"] <= 8
        assert min(severe.findings["haemorrhages_per_quadrant"].values()) >= SEVERE_HE_PER_QUADRANT
        assert severe.findings["HE"] >= 4 * SEVERE_HE_PER_QUADRANT
        # severe haemorrhages are many more and larger than moderate ones
        assert severe.masks["HE"].sum() > 3 * max(1, moderate.masks["HE"].sum())
        assert pdr.findings["neovascularization"] or pdr.findings["preretinal_haemorrhage"]
        assert pdr.nv_mask.any() == pdr.findings["neovascularization"]
        assert not severe.nv_mask.any() and not moderate.nv_mask.any()


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_phantom(0, grade=5)
    with pytest.raises(ValueError):
        make_phantom(0, size=(10, 10))


# ------------------------------------------------------------------ masks


def test_masks_match_findings_fov_and_disc():
    for p in _graded():
        assert set(p.masks) == set(LESIONS)
        disc = _disc_mask(p)
        assert disc.any()
        for name, m in p.masks.items():
            assert m.dtype == bool and m.shape == p.fov.shape
            assert not (m & ~p.fov).any(), f"{name} outside the FOV"
            assert not (m & disc).any(), f"{name} on the optic disc"
        f = p.findings
        expected = {
            "MA": f["MA"] > 0,
            "HE": f["HE"] > 0 or f["preretinal_haemorrhage"],
            "EX": f["EX"] > 0,
            "SE": f["SE"] > 0,
        }
        assert p.lesion_presence() == expected
        assert all(isinstance(v, bool) for v in p.lesion_presence().values())
        if p.grade == 0:
            assert not any(m.any() for m in p.masks.values()) and not p.nv_mask.any()
        if p.grade == 1:
            assert p.lesion_presence() == {"MA": True, "HE": False, "EX": False, "SE": False}
        assert sum(f["haemorrhages_per_quadrant"].values()) == f["HE"]


def test_lesion_sizes_are_ordered():
    # median blob area: MA smallest, haemorrhages larger (ignoring the preretinal one)
    ma_areas, he_areas = [], []
    for seed in SEEDS:
        p = _phantom(seed, 3)
        for name, areas in (("MA", ma_areas), ("HE", he_areas)):
            lab, n = ndimage.label(p.masks[name])
            areas += list(np.bincount(lab.ravel())[1:])
    assert np.median(he_areas) > 4 * np.median(ma_areas)


# ------------------------------------------------------------------ healthy twin


def test_image_equals_healthy_outside_lesions():
    for p in _graded():
        assert p.image.dtype == np.uint8 and p.healthy.dtype == np.uint8
        assert p.image.shape == p.healthy.shape == (*p.fov.shape, 3)
        union = _union(p)
        if p.grade == 0:
            assert np.array_equal(p.image, p.healthy)
            continue
        near = ndimage.distance_transform_edt(~union) <= p.info["mask_halo_px"]
        assert np.array_equal(p.image[~near], p.healthy[~near])
        changed = np.any(p.image != p.healthy, axis=-1)
        for name, m in p.masks.items():
            if m.any():
                assert changed[m].mean() > 0.9, name
        if p.nv_mask.any():
            assert changed[p.nv_mask].mean() > 0.2


# ------------------------------------------------------------------ colours


def test_outside_fov_is_black_and_background_is_fundus_coloured():
    for p in _graded():
        assert not p.image[~p.fov].any() and not p.healthy[~p.fov].any()
        mean = p.healthy[p.fov].astype(float).mean(axis=0)
        assert mean[0] > mean[1] > mean[2], mean  # orange-red
        assert 80 < mean[0] < 250
        # the optic disc is the brightest structure
        disc = _disc_mask(p)
        assert p.healthy[disc].astype(float).sum(axis=1).mean() > 1.3 * p.healthy[p.fov].astype(float).sum(axis=1).mean()


def test_lesion_colours():
    for grade in (2, 3, 4):
        for seed in SEEDS:
            p = _phantom(seed, grade)
            union = _union(p)
            for name, m in p.masks.items():
                if not m.any():
                    continue
                inside = p.image[m].astype(float).mean(axis=0)
                ring = _ring(m, union, 2, 6)
                around = p.image[ring].astype(float).mean(axis=0)
                under = p.healthy[m].astype(float).mean(axis=0)
                if name in ("MA", "HE"):  # dark red
                    assert inside.sum() < around.sum() and inside.sum() < under.sum(), (name, inside, around)
                    assert _chroma_r(inside) > _chroma_r(around), (name, inside, around)
                    assert inside[0] > inside[1] and inside[0] > inside[2]
                else:  # EX yellow-white, SE pale white
                    assert inside.sum() > around.sum() + 60 and inside.sum() > under.sum() + 60, (name, inside, around)
                    assert inside[1] > around[1] and inside[2] > around[2]
                if name == "EX":  # yellow: more green than blue
                    assert inside[1] > inside[2]


def test_disc_and_fovea_placement():
    for p in _graded():
        cx, _ = p.info["fov_center"]
        dx, dy = p.info["disc_center"]
        fx, fy = p.info["fovea_center"]
        R = p.info["fov_radius"]
        nasal = 1 if p.info["laterality"] == "right" else -1  # right eye: disc on the image's right
        assert p.info["laterality"] in ("left", "right")
        assert 0.25 * R < (dx - cx) * nasal < 0.5 * R
        assert (fx - cx) * nasal < 0 and abs(fy - dy) < 0.3 * R
        assert 2.0 < np.hypot(fx - dx, fy - dy) / p.info["disc_diameter"] < 3.0
        assert 0.13 < p.info["disc_diameter"] / (2 * R) < 0.2
    lat = {make_phantom(s, size=(120, 160), grade=0).info["laterality"] for s in range(10)}
    assert lat == {"left", "right"}


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize("size", [(300, 400), (960, 1280), (400, 300), (256, 256)])
def test_sizes(size):
    p = make_phantom(4, size=size, grade=3)
    h, w = size
    assert p.image.shape == p.healthy.shape == (h, w, 3)
    assert p.fov.shape == (h, w) and all(m.shape == (h, w) for m in p.masks.values())
    assert p.grade == 3 == grade_from_findings(p.findings)
    # circular FOV with a black border on the left and right
    assert not p.fov[:, 0].any() and not p.fov[:, -1].any()
    assert not p.image[:, 0].any() and not p.image[:, -1].any()
    assert p.fov.mean() > 0.5 * np.pi * 0.4**2 * min(h, w) ** 2 / (h * w)
    assert all(not (m & ~p.fov).any() for m in p.masks.values())
    assert p.masks["HE"].any() and p.masks["MA"].any()


def test_scale_invariance():
    small = make_phantom(8, size=(300, 400), grade=3)
    big = make_phantom(8, size=(960, 1280), grade=3)
    assert small.findings == big.findings
    # lesion areas scale with the FOV area
    ratio = (big.info["fov_radius"] / small.info["fov_radius"]) ** 2
    for name in ("HE", "EX"):
        a, b = small.masks[name].sum(), big.masks[name].sum()
        if a:
            assert 0.6 < b / (a * ratio) < 1.6, name
