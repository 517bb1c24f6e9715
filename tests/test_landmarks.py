"""Optic disc / fovea detection and the retinal quadrants reported by lesion_seg."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from monailabel_dr.fundus import geometry, idrid, io
from monailabel_dr.fundus.landmarks import (
    ANATOMICAL_QUADRANTS,
    IMAGE_QUADRANTS,
    Landmarks,
    detect_landmarks,
    quadrant_frame,
)
from monailabel_dr.fundus.phantoms import make_phantom
from monailabel_dr.lib.infers.lesion_seg import lesion_stats

from conftest import IDRID


@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15, 16])
def test_phantom_disc_and_fovea(seed):
    ph = make_phantom(seed)
    lm = detect_landmarks(ph.image, ph.fov)
    dd = ph.info["disc_diameter"]
    assert lm.disc is not None
    assert np.hypot(*(np.subtract(lm.disc, ph.info["disc_center"]))) < 0.5 * dd


def test_fovea_found_and_placed_on_most_phantoms():
    errors = []  # in disc diameters; inf when not found
    for seed in range(20, 30):
        ph = make_phantom(seed)
        lm = detect_landmarks(ph.image, ph.fov)
        err = np.inf if lm.fovea is None else np.hypot(*(np.subtract(lm.fovea, ph.info["fovea_center"])))
        errors.append(err / ph.info["disc_diameter"])
    errors = np.array(errors)
    assert (errors < 1.0).sum() >= 7, errors
    assert np.median(errors) < 0.5, errors


@pytest.mark.parametrize("sigma", [2.0, 6.0, 12.0])
def test_no_disc_in_a_textured_field_without_one(sigma):
    rng = np.random.default_rng(int(sigma) + 100)
    h, w = 480, 640
    yy, xx = np.mgrid[0:h, 0:w]
    fov = (yy - 240) ** 2 + (xx - 320) ** 2 < 230**2
    tex = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), sigma)
    img = np.array([0.6, 0.3, 0.1], np.float32) * (1 + 0.1 * tex / tex.std())[..., None]
    img[~fov] = 0
    lm = detect_landmarks(np.clip(img, 0, 1), fov)
    assert lm.disc is None and lm.fovea is None
    frame = quadrant_frame(lm, (320.0, 240.0))
    assert not frame.anatomical and frame.names == IMAGE_QUADRANTS


@pytest.mark.skipif(not IDRID.is_dir(), reason="../shared/data/idrid_train not present")
@pytest.mark.parametrize("image_id", ["IDRiD_02", "IDRiD_11", "IDRiD_40"])
def test_idrid_disc_inside_the_optic_disc_mask(image_id):
    img = io.read_image(idrid.idrid_image_path(IDRID, image_id))
    od = io.read_label(idrid.idrid_mask_path(IDRID, image_id, "OD")) > 0
    lm = detect_landmarks(img, geometry.detect_fov(img))
    assert lm.disc is not None
    assert od[int(round(lm.disc[1])), int(round(lm.disc[0]))]
    assert lm.fovea is not None
    # The fovea is 1.8-3.2 DD from the disc, on the image-centre side.
    dd = 2 * np.sqrt(od.sum() / np.pi)
    assert 1.5 * dd < np.hypot(*(np.subtract(lm.fovea, lm.disc))) < 3.6 * dd
    assert (lm.fovea[0] - lm.disc[0]) * (img.shape[1] / 2 - lm.disc[0]) > 0


def test_anatomical_quadrants_right_and_left_eye():
    # Right eye as photographed: disc to the right of the fovea -> nasal = image right.
    right = quadrant_frame(Landmarks(disc=(300.0, 100.0), fovea=(100.0, 100.0), disc_diameter=80,
                                     disc_score=3, fovea_contrast=2), (0, 0))
    assert right.anatomical and right.names == ANATOMICAL_QUADRANTS
    assert right.classify([150, 50, 150, 50], [50, 50, 150, 150]) == [
        "superior_nasal", "superior_temporal", "inferior_nasal", "inferior_temporal"]
    # Left eye: disc to the left -> nasal = image left; superior stays at the top.
    left = quadrant_frame(Landmarks(disc=(-100.0, 100.0), fovea=(100.0, 100.0), disc_diameter=80,
                                    disc_score=3, fovea_contrast=2), (0, 0))
    assert left.classify([150, 50, 150, 50], [50, 50, 150, 150]) == [
        "superior_temporal", "superior_nasal", "inferior_temporal", "inferior_nasal"]
    # A tilted axis: the disc 45 degrees up-right of the fovea. 50 px up-left along the
    # perpendicular and 10 px away from the disc is superior temporal; its mirror image
    # through the fovea is inferior nasal.
    tilt = quadrant_frame(Landmarks(disc=(200.0, 0.0), fovea=(100.0, 100.0), disc_diameter=80,
                                    disc_score=3, fovea_contrast=2), (0, 0))
    r = np.sqrt(0.5)
    px, py = 100 - 50 * r - 10 * r, 100 - 50 * r + 10 * r
    assert tilt.classify([px], [py]) == ["superior_temporal"]
    assert tilt.classify([200 - px], [200 - py]) == ["inferior_nasal"]


def test_fallback_quadrants_without_fovea():
    frame = quadrant_frame(Landmarks(disc=(300.0, 100.0), fovea=None, disc_diameter=80,
                                     disc_score=3, fovea_contrast=0), (200.0, 150.0))
    assert not frame.anatomical
    assert frame.classify([10, 390, 10, 390], [10, 10, 290, 290]) == list(IMAGE_QUADRANTS)
    assert "field-of-view centre" in frame.to_dict()["reference"]


def test_lesion_stats_counts_components_per_quadrant():
    probs = np.zeros((4, 200, 400), np.float32)
    fov = np.ones((200, 400), bool)
    probs[0, 20:25, 300:305] = 0.9  # MA superior nasal (right eye: disc at image right)
    probs[0, 150:155, 300:305] = 0.9  # MA inferior nasal
    probs[0, 150:155, 30:35] = 0.9  # MA inferior temporal
    probs[1, 20:40, 20:40] = 0.8  # HE superior temporal
    probs[2, 100:101, 100:101] = 0.4  # EX under the threshold
    frame = quadrant_frame(Landmarks(disc=(350.0, 90.0), fovea=(200.0, 100.0), disc_diameter=60,
                                     disc_score=3, fovea_contrast=2), (200.0, 100.0))
    st = lesion_stats(probs, fov, 0.5, frame)
    assert st["MA"]["components"] == 3 and st["MA"]["area_px"] == 75
    assert st["MA"]["components_per_quadrant"] == {
        "superior_nasal": 1, "superior_temporal": 0, "inferior_nasal": 1, "inferior_temporal": 1}
    assert st["HE"]["components_per_quadrant"]["superior_temporal"] == 1
    assert st["EX"]["components"] == 0 and not st["EX"]["present"]
    assert st["EX"]["presence_probability"] == pytest.approx(0.4)
    assert st["SE"]["components_per_quadrant"] == dict.fromkeys(ANATOMICAL_QUADRANTS, 0)
