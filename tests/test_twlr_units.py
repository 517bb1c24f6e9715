"""TWLR pieces on their own: inpainting backends, the learned inpainter's loss, the regression loop's rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monailabel_dr.fundus.inpainting import make_inpainter
from monailabel_dr.fundus.phantoms import make_phantom
from monailabel_dr.networks.inpainter import HoleLoss, build_inpainter
from monailabel_dr.fundus.severity_regression import RegressionSettings, Step, severity_regression
from monailabel_dr.networks.twlr import grading_probe


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
    return severity_regression(grading_probe(_ScriptedGrader(grades)), img, fov, fill, RegressionSettings.from_dict(kw))


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
    with pytest.raises(ValueError, match="saliency"):
        RegressionSettings.from_dict({"saliency": "guess"}, ("patch_text", "gradcam"))
    with pytest.raises(ValueError, match="saliency"):
        grading_probe(_ScriptedGrader([1]), "guess")
    assert isinstance(_run([3, 1]).steps[0], Step)


class _MovingGrader(_ScriptedGrader):
    """Saliency of MA on square A first, then on square B: the loop removes A at step 1, B at step 2."""

    def saliency(self, x, method):
        sal, logits = super().saliency(x, method)
        sal.zero_()
        if self.calls == 1:
            sal[0, 0, 1:3, 1:3] = 1.0
        else:
            sal[0, 0, 5:7, 5:7] = 1.0
        return sal, logits


def test_regression_score_ranks_earlier_removal_higher_and_thresholds_to_the_weak_mask():
    img = np.full((64, 64, 3), 120, np.uint8)
    fill = lambda im, m: np.where(m[..., None], 0, im).astype(np.uint8)   # noqa: E731
    r = severity_regression(grading_probe(_MovingGrader([4, 3, 2, 2, 2])), img, np.ones((64, 64), bool), fill,
                            RegressionSettings.from_dict({"dilation": 0, "t_max": 4}))
    assert r.score is not None and r.score.shape == r.weak.shape
    np.testing.assert_array_equal(r.score > 0.5, r.weak)
    assert r.weak[0][12, 12] and r.weak[0][44, 44]
    a, b = r.score[0][12, 12], r.score[0][44, 44]
    assert 1.0 >= a > b > 0.5, (a, b)       # removed at step 1 ranks above step 2
    assert r.score[0][30, 30] == 0 and (r.score[1:] == 0).all()


def test_weak_mask_metrics_against_hand_counts():
    from monailabel_dr.metrics.regression import WeakMaskAccumulator, masked_psnr, masked_ssim, random_mask_expectation

    fov = np.zeros((10, 10), bool)
    fov[:, :5] = True                                        # 50 px
    truth = {"MA": np.zeros((10, 10), bool), "HE": np.zeros((10, 10), bool)}
    truth["MA"][0:2, 0:5] = True                             # 10 px
    weak = {"MA": np.zeros((10, 10), bool), "HE": np.zeros((10, 10), bool)}
    weak["MA"][1:3, 0:5] = True                              # 10 px, 5 of them true
    weak["HE"][9, 9] = True                                  # outside the FOV: ignored
    acc = WeakMaskAccumulator(("MA", "HE"))
    per = acc.update(weak, truth, fov)
    assert per["MA"]["dice"] == pytest.approx(0.5)
    assert per["MA"]["random_dice"] == pytest.approx(2 * 2 / 20)   # E[TP] = 10 * 10 / 50 = 2
    out = acc.compute()
    assert out["MA"]["precision"] == pytest.approx(0.5) and out["HE"]["dice"] is None
    assert out["any"]["weak_area_px"] == 10 and out["any"]["truth_area_px"] == 10
    assert random_mask_expectation(10, 10, 50) == pytest.approx(2.0)
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[:2] = 110                                              # MSE 100 inside the top rows
    top = np.zeros((8, 8), bool)
    top[:2] = True
    assert masked_psnr(b, a, top) == pytest.approx(10 * np.log10(255 ** 2 / 100))
    assert masked_psnr(b, a, ~top) == float("inf") and masked_psnr(b, a, np.zeros((8, 8), bool)) is None
    assert masked_ssim(a, a, top) == pytest.approx(1.0)


def test_conv_tower_patch_tokens_average_to_the_image_embedding():
    """The from-scratch profiles' conv image tower: the saliency's location embeddings are exactly what
    the image embedding averages, on the profile's grid; the paper profile keeps open_clip's ViT."""
    import yaml

    from monailabel_dr.config import CONFIG_DIR
    from monailabel_dr.networks.twlr import ConvImageTower, build_twlr_grader

    with open(CONFIG_DIR / "twlr.yaml") as f:
        profiles = yaml.safe_load(f)["profiles"]
    tiny = profiles["tiny"]
    g = build_twlr_grader(tiny["network"], image_size=tiny["image_size"]).eval()
    assert isinstance(g.clip.visual, ConvImageTower) and g.clip.visual.grid_size == (16, 16)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        pooled, patch = g.encode_image(x)
        np.testing.assert_allclose(pooled.numpy(), patch.mean(dim=(1, 2)).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g.clip.encode_image((x - g.clip_mean) / g.clip_std).numpy(), pooled.numpy(),
                                   rtol=1e-4, atol=1e-5)
    sal, logits = g.saliency(x)
    assert sal.shape == (2, 4, 16, 16) and logits.shape == (2, 10)
    assert "conv_tower" not in profiles["paper"]["network"]


def test_conv_tower_attention_pooling_and_training_crops():
    """``pool: attention`` weights the patch tokens by a softmax over locations (a convex combination: a
    location given all the weight is the image embedding); in training a crop smaller than image_size
    is taken as it is, at inference every input is resized to image_size."""
    import yaml

    from monailabel_dr.config import CONFIG_DIR
    from monailabel_dr.networks.twlr import build_twlr_grader

    with open(CONFIG_DIR / "twlr.yaml") as f:
        profiles = yaml.safe_load(f)["profiles"]
    assert profiles["real"]["network"]["conv_tower"]["pool"] == "attention"
    net = dict(profiles["tiny"]["network"])
    net["conv_tower"] = {**net["conv_tower"], "pool": "attention"}
    g = build_twlr_grader(net, image_size=128).eval()
    tower = g.clip.visual
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        pooled, patch = g.encode_image(x)
        z = patch.flatten(1, 2)
        w = torch.softmax(tower.attention(z), dim=1)
        np.testing.assert_allclose(pooled.numpy(), (w * z).sum(1).numpy(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(pooled, patch.mean(dim=(1, 2)), atol=1e-6)   # not the plain mean
        last = tower.attention[-1]
        last.weight.zero_()
        last.bias.zero_()
        mean_pooled, _ = g.encode_image(x)     # uniform scores: the mean
        np.testing.assert_allclose(mean_pooled.numpy(), patch.mean(dim=(1, 2)).numpy(), rtol=1e-5, atol=1e-6)
    crop = torch.rand(1, 3, 64, 64)
    g.train()
    assert g.encode_image(crop)[1].shape[1:3] == (8, 8)      # a training crop at the working resolution
    g.eval()
    assert g.encode_image(crop)[1].shape[1:3] == (16, 16)    # inference: resized like CLIP
    with pytest.raises(ValueError, match="pool"):
        build_twlr_grader({**net, "conv_tower": {**net["conv_tower"], "pool": "max"}}, image_size=128)
