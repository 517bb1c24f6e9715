"""TWLR pieces on their own: inpainting backends, the learned inpainter's loss, the regression loop's rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monailabel_dr.fundus.inpainting import make_inpainter
from monailabel_dr.fundus.phantoms import make_phantom
from monailabel_dr.networks.inpainter import HoleLoss, build_inpainter
from monailabel_dr.networks.twlr import RegressionSettings, Step, severity_regression


@pytest.mark.parametrize("backend", ["ns", "telea", "unet"])
def test_backends_change_only_the_masked_pixels(backend):
    ph = make_phantom(3, size=(96, 96), grade=2)
    mask = np.zeros((96, 96), bool)
    mask[40:50, 30:60] = True
    net = build_inpainter({"features": [4, 4, 8, 8, 16, 4]}).eval() if backend == "unet" else None
    out = make_inpainter(backend, 3, net)(ph.image, mask)
    assert out.shape == ph.image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], ph.image[~mask])
    assert not np.array_equal(out[mask], ph.image[mask])


def test_hole_loss_is_l1_inside_the_hole():
    rgb = torch.zeros(1, 3, 8, 8)
    hole = torch.zeros(1, 1, 8, 8)
    hole[..., :2, :] = 1
    pred = torch.full((1, 3, 8, 8), 0.5)
    pred[..., 4:, :] = 9.0        # outside the hole: ignored
    assert float(HoleLoss()(pred, torch.cat([rgb, hole], 1))) == pytest.approx(0.5)
    assert float(HoleLoss(ssim_weight=0.5)(pred.clamp(0, 1), torch.cat([rgb, hole], 1))) > 0.5


class _ScriptedGrader:
    """Stands in for TWLRGrader: grades fall as pixels are painted grey; saliency marks a fixed square."""

    def __init__(self, grades):
        self.grades = list(grades)
        self.calls = 0

    def saliency(self, x, method):
        g = self.grades[min(self.calls, len(self.grades) - 1)]
        self.calls += 1
        logits = torch.full((1, 10), -5.0)
        logits[0, g] = 5.0
        logits[0, 6:] = 5.0                    # every lesion present
        sal = torch.zeros(1, 4, 8, 8)
        sal[0, :, 2:4, 2:4] = 1.0
        sal[0, 1, 5:7, 5:7] = 1.0              # HE also elsewhere
        return sal, logits


def _run(grades, **kw):
    img = np.full((64, 64, 3), 120, np.uint8)
    fov = np.ones((64, 64), bool)
    fill = lambda im, m: np.where(m[..., None], 0, im).astype(np.uint8)   # noqa: E731
    return severity_regression(_ScriptedGrader(grades), img, fov, fill, RegressionSettings.from_dict(kw))


def test_regression_stopping_rules_and_weak_masks():
    r = _run([3, 1, 0])
    assert [s.grade for s in r.steps] == [3, 1] and r.stop_reason == "tiny_region"   # 2nd step: nothing new
    assert r.weak[1].sum() > 0 and r.weak[1][44, 44] and not r.weak[0][44, 44]       # HE owns its own square
    assert _run([2, 0]).stop_reason == "healthy"
    assert _run([0]).stop_reason == "healthy" and len(_run([0]).steps) == 1
    up = _run([2, 4])
    assert up.stop_reason == "grade_increased" and [s.grade for s in up.steps] == [2]  # the step was undone
    assert _run([2, 2, 2], dilation=0, min_new_fraction=0.0).stop_reason in ("no_grade_drop", "tiny_region")
    with pytest.raises(ValueError):
        RegressionSettings.from_dict({"tau": 1.5})
    with pytest.raises(ValueError):
        RegressionSettings.from_dict({"colour": "red"})
    assert isinstance(_run([3, 1]).steps[0], Step)
