"""Lesion segmentation / detection metrics and the IDRiD folder layout (no MONAI Label, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from monailabel_dr.fundus.idrid import idrid_image_path, idrid_masks, idrid_split, list_idrid
from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.metrics.lesions import (
    FROCAccumulator,
    LesionSegAccumulator,
    pr_roc_from_histograms,
    proposals_from_map,
)

IDRID = Path(__file__).resolve().parents[2] / "shared" / "data" / "idrid_train"
needs_idrid = pytest.mark.skipif(
    not (IDRID / "images").is_dir(), reason="IDRiD training folder not available"
)


def _one(acc: LesionSegAccumulator, image_id, prob, truth, fov=None):
    acc.update(image_id, {"EX": np.asarray(prob, float)}, {"EX": np.asarray(truth, bool)}, fov=fov)


# --------------------------------------------------------------------------- Dice / IoU


def _dice_case(acc: LesionSegAccumulator) -> None:
    # image A: truth at (0,0),(0,1); prediction (p >= 0.5) at (0,0),(0,2) -> TP 1, FP 1, FN 1
    #          Dice_A = 2*1 / (2*1 + 1 + 1) = 0.5
    _one(acc, "A", [[0.9, 0.2, 0.8, 0.0], [0.0, 0.0, 0.0, 0.0]], [[1, 1, 0, 0], [0, 0, 0, 0]])
    # image B: 4 truth pixels, all predicted, nothing else -> TP 4, FP 0, FN 0, Dice_B = 1
    _one(acc, "B", [[0.6, 0.7, 0.0, 0.0], [0.5, 0.99, 0.1, 0.0]], [[1, 1, 0, 0], [1, 1, 0, 0]])
    # image C: truth and prediction both empty -> skipped by the per-image mean, adds nothing pooled
    _one(acc, "C", np.full((2, 4), 0.1), np.zeros((2, 4)))


def test_dice_iou_pooled_vs_per_image():
    acc = LesionSegAccumulator(lesions=("EX",), n_bins=100)
    _dice_case(acc)
    r = acc.compute(n_boot=0)["EX"]
    assert (r["tp"], r["fp"], r["fn"]) == (5, 1, 1)
    # pooled: TP 5, FP 1, FN 1 -> Dice = 10 / (10 + 1 + 1) = 0.8333..., IoU = 5 / 7
    assert r["dice_pooled"] == pytest.approx(10 / 12)
    assert r["iou_pooled"] == pytest.approx(5 / 7)
    # per-image mean over A and B only (C skipped): (0.5 + 1) / 2 = 0.75
    assert r["dice_per_image_mean"] == pytest.approx(0.75)
    assert r["n_images_dice_per_image"] == 2
    assert r["n_images"] == 3


def test_prediction_threshold_is_inclusive_and_configurable():
    acc = LesionSegAccumulator(lesions=("EX",), n_bins=10, threshold=0.7)
    # p >= 0.7 -> predicted: 0.7 and 0.9; truth at 0.9 and 0.5 -> TP 1, FP 1, FN 1 -> Dice 0.5
    _one(acc, "a", [[0.7, 0.9, 0.5]], [[0, 1, 1]])
    assert acc.compute(n_boot=0)["EX"]["dice_pooled"] == pytest.approx(0.5)


def test_fov_excludes_outside_pixels():
    prob = np.array([[0.9, 0.9, 0.9, 0.1]])
    truth = np.array([[1, 0, 0, 1]], bool)
    fov = np.array([[1, 1, 0, 0]], bool)
    acc = LesionSegAccumulator(lesions=("EX",), n_bins=10)
    _one(acc, "a", prob, truth, fov=fov)
    r = acc.compute(n_boot=0)["EX"]
    # inside the FOV (columns 0, 1): TP at col 0, FP at col 1; the FP at col 2 and the
    # missed truth at col 3 lie outside -> TP 1, FP 1, FN 0 -> Dice 2/3
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)
    assert r["dice_pooled"] == pytest.approx(2 / 3)
    assert r["n_pos_pixels"] + r["n_neg_pixels"] == 2
    assert r["n_truth_outside_fov"] == 1
    # without the FOV: TP 1, FP 2, FN 1 -> 2 / (2 + 2 + 1) = 0.4
    acc2 = LesionSegAccumulator(lesions=("EX",), n_bins=10)
    _one(acc2, "a", prob, truth)
    assert acc2.compute(n_boot=0)["EX"]["dice_pooled"] == pytest.approx(0.4)


def test_update_rejects_bad_input():
    acc = LesionSegAccumulator(lesions=("EX",), n_bins=10)
    with pytest.raises(ValueError):
        _one(acc, "a", [[1.5, 0.0]], [[1, 0]])  # outside [0, 1]
    with pytest.raises(ValueError):
        _one(acc, "a", [[np.nan, 0.0]], [[1, 0]])
    with pytest.raises(ValueError):
        _one(acc, "a", [[0.5, 0.0]], [[1, 0, 0]])  # shape mismatch
    with pytest.raises(ValueError):
        acc.update("a", {"EX": np.zeros((1, 2))}, {})  # truth lacks EX
    _one(acc, "a", [[0.5, 0.0]], [[1, 0]])
    with pytest.raises(ValueError):
        _one(acc, "a", [[0.5, 0.0]], [[1, 0]])  # same id twice


# --------------------------------------------------------------------------- AUC-PR / AUC-ROC


def test_histogram_auc_perfect_separation():
    pos = np.zeros(10)
    neg = np.zeros(10)
    pos[[7, 9]] = [3, 5]
    neg[[0, 2, 6]] = [4, 1, 2]
    r = pr_roc_from_histograms(pos, neg)
    assert r["auc_pr"] == pytest.approx(1.0)
    assert r["auc_roc"] == pytest.approx(1.0)


def test_histogram_auc_hand_computed_matches_sklearn():
    n_bins = 10
    pos_bins, neg_bins = [9, 7, 5, 2], [8, 6, 3, 1]
    pos = np.bincount(pos_bins, minlength=n_bins)
    neg = np.bincount(neg_bins, minlength=n_bins)
    r = pr_roc_from_histograms(pos, neg)
    # scores (bin centres) from high to low: P .95, N .85, P .75, N .65, P .55, N .35, P .25, N .15
    # AP = 1/4 * (1/1 + 2/3 + 3/5 + 4/7) = 0.709523...
    assert r["auc_pr"] == pytest.approx(0.25 * (1 + 2 / 3 + 3 / 5 + 4 / 7), abs=1e-12)
    # ROC AUC = (pos > neg pairs) / 16 = (4 + 3 + 2 + 1) / 16 = 0.625
    assert r["auc_roc"] == pytest.approx(10 / 16, abs=1e-12)
    y = np.r_[np.ones(4), np.zeros(4)]
    s = (np.r_[pos_bins, neg_bins] + 0.5) / n_bins
    assert r["auc_pr"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert r["auc_roc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert r["recall"][-1] == pytest.approx(1.0) and r["fpr"][-1] == pytest.approx(1.0)


def test_histogram_auc_with_ties_matches_sklearn_on_binned_scores():
    rng = np.random.default_rng(3)
    n_bins = 20
    pos = rng.integers(0, 6, n_bins) * (np.arange(n_bins) > 5)  # many ties per bin
    neg = rng.integers(0, 9, n_bins) * (np.arange(n_bins) < 15)
    r = pr_roc_from_histograms(pos, neg)
    s = np.r_[np.repeat(np.arange(n_bins), pos), np.repeat(np.arange(n_bins), neg)] / n_bins
    y = np.r_[np.ones(pos.sum()), np.zeros(neg.sum())]
    assert r["auc_pr"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert r["auc_roc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)


def test_accumulator_auc_matches_sklearn_on_pixels_inside_fov():
    rng = np.random.default_rng(0)
    n_bins = 50
    acc = LesionSegAccumulator(lesions=("HE",), n_bins=n_bins)
    ys, ss = [], []
    for k in range(3):
        truth = rng.random((12, 16)) < 0.2
        # bin centres, positives shifted up: distinct bins per score value, ties inside bins
        b = np.clip(rng.integers(0, n_bins, truth.shape) + 15 * truth, 0, n_bins - 1)
        prob = (b + 0.5) / n_bins
        fov = np.ones(truth.shape, bool)
        fov[:, :3] = False
        acc.update(f"im{k}", {"HE": prob}, {"HE": truth}, fov=fov)
        ys.append(truth[fov])
        ss.append(prob[fov])
    r = acc.compute(n_boot=0)["HE"]
    y, s = np.concatenate(ys), np.concatenate(ss)
    assert r["auc_pr"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert r["auc_roc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)


# --------------------------------------------------------------------------- image level


def test_image_level_auc_sensitivity_specificity():
    acc = LesionSegAccumulator(lesions=("EX",), n_bins=100)
    truths = [True, True, True, False, False, False]
    scores = [0.9, 0.6, 0.3, 0.7, 0.2, 0.1]
    for k, (t, s) in enumerate(zip(truths, scores)):
        prob = np.zeros((4, 4))
        prob[1, 1] = s  # the image score = max probability
        truth = np.zeros((4, 4), bool)
        truth[2, 2] = t
        _one(acc, f"i{k}", prob, truth)
    r = acc.compute(n_boot=0)["EX"]
    # positives with max >= 0.5: 0.9, 0.6 -> 2/3; negatives with max < 0.5: 0.2, 0.1 -> 2/3
    assert r["image_sensitivity"] == pytest.approx(2 / 3)
    assert r["image_specificity"] == pytest.approx(2 / 3)
    # AUC: pairs pos > neg: 0.9 > all 3, 0.6 > 0.2, 0.1, 0.3 > 0.2, 0.1 -> 7 / 9
    assert r["image_auc"] == pytest.approx(7 / 9)
    assert r["image_auc"] == pytest.approx(roc_auc_score(truths, scores))


def test_image_auc_nan_with_one_class_and_mean_lists_lesions():
    acc = LesionSegAccumulator(lesions=("MA", "SE"), n_bins=10)
    for k in range(3):
        prob = np.full((3, 3), 0.1 * (k + 1))
        ma = np.zeros((3, 3), bool)
        ma[0, 0] = True  # MA in every image, SE in none
        acc.update(f"i{k}", {"MA": prob, "SE": prob}, {"MA": ma, "SE": np.zeros((3, 3), bool)})
    out = acc.compute(n_boot=50)
    assert np.isnan(out["MA"]["image_auc"])
    assert out["MA"]["ci"]["image_auc"] == [pytest.approx(np.nan, nan_ok=True)] * 2
    assert out["mean"]["lesions"] == ["MA"]
    assert out["mean"]["dice_pooled"] == pytest.approx(out["MA"]["dice_pooled"])
    assert np.isnan(out["SE"]["auc_pr"])
    assert out["n_images"] == 3 and out["n_bins"] == 10 and out["threshold"] == 0.5
    assert "dice_pooled" in out["variant"] and "auc_pr" in out["variant"]


# --------------------------------------------------------------------------- bootstrap


def _noisy_images(acc: LesionSegAccumulator, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for k in range(n):
        truth = np.zeros((16, 16), bool)
        r, c = rng.integers(2, 12, 2)
        truth[r : r + rng.integers(1, 5), c : c + rng.integers(1, 5)] = True
        prob = np.clip(0.55 * truth + rng.normal(0.2, 0.18, truth.shape), 0, 1)
        acc.update(f"im{k:03d}", {"EX": prob}, {"EX": truth})


def test_bootstrap_ci_contains_estimate_narrows_and_is_deterministic():
    small = LesionSegAccumulator(lesions=("EX",), n_bins=100)
    _noisy_images(small, 8, seed=1)
    large = LesionSegAccumulator(lesions=("EX",), n_bins=100)
    _noisy_images(large, 128, seed=1)
    r_small = small.compute(n_boot=400, seed=0)
    r_large = large.compute(n_boot=400, seed=0)
    for key in ("dice_pooled", "auc_pr", "auc_roc"):
        for r in (r_small, r_large):
            lo, hi = r["EX"]["ci"][key]
            assert lo <= r["EX"][key] <= hi, key
        width_small = np.diff(r_small["EX"]["ci"][key])[0]
        width_large = np.diff(r_large["EX"]["ci"][key])[0]
        assert width_large < width_small, key
    assert r_large["mean"]["ci"]["dice_pooled"] == pytest.approx(r_large["EX"]["ci"]["dice_pooled"])
    again = large.compute(n_boot=400, seed=0)
    np.testing.assert_array_equal(
        [again["EX"]["ci"][k] for k in ("dice_pooled", "auc_pr", "auc_roc")],
        [r_large["EX"]["ci"][k] for k in ("dice_pooled", "auc_pr", "auc_roc")],
    )
    other = large.compute(n_boot=400, seed=1)
    assert other["EX"]["ci"]["dice_pooled"] != r_large["EX"]["ci"]["dice_pooled"]


def test_bootstrap_image_auc_ci_matches_sklearn_per_resample():
    from monailabel_dr.metrics.lesions import _resample_weights, _weighted_auc

    rng = np.random.default_rng(5)
    y = rng.random(20) < 0.4
    s = np.round(rng.random(20) + 0.3 * y, 1)  # with ties
    w = _resample_weights(20, 30, seed=2)
    fast = _weighted_auc(s, y, w)
    for b in range(30):
        if w[b, y].sum() and w[b, ~y].sum():
            assert fast[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]), abs=1e-12)
    assert np.all(w.sum(axis=1) == 20)


# --------------------------------------------------------------------------- FROC


def _froc_scene():
    truth = np.zeros((20, 20), bool)
    truth[1:3, 1:3] = True  # L1: area 4
    truth[8:12, 8:12] = True  # L2: area 16
    truth[15:17, 15:17] = True  # L3: area 4

    def box(r0, r1, c0, c1):
        m = np.zeros((20, 20), bool)
        m[r0:r1, c0:c1] = True
        return m

    proposals = [
        {"score": 0.9, "mask": box(1, 3, 1, 3)},  # exactly L1: TP in every mode
        {"score": 0.8, "mask": box(1, 4, 12, 18)},  # touches nothing: FP
        {"score": 0.7, "mask": box(8, 10, 8, 10)},  # 4 of L2's 16 pixels (25 %): FP in 'gt', TP in 'pixel'
        {"score": 0.6, "mask": box(15, 17, 15, 17)},  # exactly L3: TP
    ]
    return truth, proposals


@pytest.mark.parametrize(
    "mode, expected",
    [
        # 2 images (the second has no lesion and no proposal), 3 lesions.
        # 'gt':    thr .9 -> FP/img 0,   sens 1/3; .8 -> 0.5, 1/3; .7 -> 1.0, 1/3; .6 -> 1.0, 2/3
        ("gt", [1 / 3, 1 / 3, 2 / 3, 2 / 3]),
        # 'pixel': thr .9 -> FP/img 0,   sens 1/3; .8 -> 0.5, 1/3; .7 -> 0.5, 2/3; .6 -> 0.5, 3/3
        ("pixel", [1 / 3, 1.0, 1.0, 1.0]),
    ],
)
def test_froc_modes(mode, expected):
    truth, proposals = _froc_scene()
    acc = FROCAccumulator(mode=mode, fp_rates=(0.25, 0.5, 1, 2))
    acc.update("a", proposals, truth)
    acc.update("b", [], np.zeros((20, 20), bool))
    r = acc.compute()
    assert r["n_lesions"] == 3 and r["n_images"] == 2 and r["n_proposals"] == 4
    assert r["sensitivity"] == pytest.approx(expected)
    assert r["froc_score"] == pytest.approx(np.mean(expected))  # gt: 0.5, pixel: 0.8333
    assert r["n_false_positive_proposals"] == (2 if mode == "gt" else 1)


def test_froc_iou_mode_and_overlap_threshold():
    truth = np.zeros((10, 10), bool)
    truth[2:4, 2:4] = True  # one lesion, area 4
    big = np.zeros((10, 10), bool)
    big[0:6, 0:6] = True  # covers the lesion fully, IoU = 4 / 36
    for mode, overlap, hit in [("gt", 0.5, True), ("iou", 0.5, False), ("iou", 0.1, True)]:
        acc = FROCAccumulator(mode=mode, overlap=overlap, fp_rates=(0,))
        acc.update("a", [{"score": 0.9, "mask": big}], truth)
        assert acc.compute()["sensitivity"] == [1.0 if hit else 0.0], (mode, overlap)


def test_froc_from_map_matches_mask_proposals_and_uses_8_connectivity():
    truth, proposals = _froc_scene()
    score_map = np.zeros((20, 20))
    for prop in proposals:
        score_map[prop["mask"]] = prop["score"]
    score_map[1, 1] = 0.95  # region score = max inside the component
    labels, scores = proposals_from_map(score_map, threshold=0.5)
    assert labels.max() == 4 and sorted(scores) == pytest.approx([0.6, 0.7, 0.8, 0.95])
    a = FROCAccumulator(mode="pixel")
    a.update_from_map("a", score_map, truth, threshold=0.5)
    b = FROCAccumulator(mode="pixel")
    b.update("a", [dict(p, score=0.95 if i == 0 else p["score"]) for i, p in enumerate(proposals)], truth)
    assert a.compute()["curve"] == b.compute()["curve"]
    # diagonal neighbours form one lesion (8-connectivity) and one proposal
    t = np.zeros((5, 5), bool)
    t[1, 1] = t[2, 2] = True
    m = np.zeros((5, 5))
    m[1, 1], m[2, 2] = 0.9, 0.7
    acc = FROCAccumulator(mode="gt", fp_rates=(0,))
    acc.update_from_map("d", m, t)
    r = acc.compute()
    assert r["n_lesions"] == 1 and r["n_proposals"] == 1 and r["sensitivity"] == [1.0]


# --------------------------------------------------------------------------- IDRiD layout


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_idrid_layout_on_a_small_folder(tmp_path):
    img = np.zeros((70, 80, 3), np.uint8)
    _write_png(tmp_path / "images" / "IDRiD_02.png", img)
    (tmp_path / "images" / "IDRiD_01.jpg").write_bytes(b"")  # listed by name only
    (tmp_path / "images" / "notes.txt").write_text("x")
    assert list_idrid(tmp_path) == ["IDRiD_01", "IDRiD_02"]
    assert idrid_image_path(tmp_path, "IDRiD_02").endswith("IDRiD_02.png")
    ex = np.zeros((70, 80), np.uint8)
    ex[5:9, 10:20] = 255
    _write_png(tmp_path / "masks" / "EX" / "IDRiD_02_EX.png", ex)
    se = np.zeros((70, 80), np.uint8)
    se[30, 30] = 1
    (tmp_path / "masks" / "SE").mkdir(parents=True)
    # the original IDRiD masks are 1-bit TIFFs
    Image.fromarray(se * 255).convert("1").save(tmp_path / "masks" / "SE" / "IDRiD_02_SE.tif")
    masks = idrid_masks(tmp_path, "IDRiD_02")
    assert list(masks) == list(LESIONS)
    assert all(m.dtype == bool and m.shape == (70, 80) for m in masks.values())
    assert masks["EX"].sum() == 40 and masks["SE"].sum() == 1 and masks["SE"][30, 30]
    assert not masks["MA"].any() and not masks["HE"].any()
    with pytest.raises(ValueError):
        idrid_masks(tmp_path, "IDRiD_02", shape=(80, 70))
    # no mask at all: shape from the photograph's header
    _write_png(tmp_path / "images" / "IDRiD_03.png", np.zeros((64, 96, 3), np.uint8))
    assert idrid_masks(tmp_path, "IDRiD_03")["HE"].shape == (64, 96)


def test_idrid_split_rule():
    ids = [f"IDRiD_{i:02d}" for i in range(1, 55)]
    train, val = idrid_split(ids)
    assert val == [f"IDRiD_{i:02d}" for i in range(5, 51, 5)]
    assert len(train) == 44 and not set(train) & set(val)
    assert idrid_split(["a", "x_3", "x_6"], val_every=3) == (["a"], ["x_3", "x_6"])
    with pytest.raises(ValueError):
        idrid_split(ids, val_every=0)


@needs_idrid
def test_idrid_real_folder_split_and_masks():
    ids = list_idrid(IDRID)
    assert len(ids) == 54 and ids[0] == "IDRiD_01"
    _, val = idrid_split(ids)
    assert val == [f"IDRiD_{i:02d}" for i in range(5, 51, 5)]
    masks = idrid_masks(IDRID, "IDRiD_01", shape=(2848, 4288))
    assert masks["EX"].shape == (2848, 4288) and masks["EX"].any()
    he = idrid_masks(IDRID, "IDRiD_43", shape=(2848, 4288))["HE"]  # IDRiD_43 has no HE mask file
    assert he.shape == (2848, 4288) and he.dtype == bool and not he.any()


# --------------------------------------------------------------------------- memory


def test_full_size_update_keeps_little():
    shape = (2848, 4288)
    rng = np.random.default_rng(0)
    prob = rng.random(shape, dtype=np.float32)
    truth = prob > 0.999
    fov = np.ones(shape, bool)
    fov[:, :200] = False
    acc = LesionSegAccumulator()
    acc.update("big", dict.fromkeys(LESIONS, prob), dict.fromkeys(LESIONS, truth), fov=fov)
    assert acc.nbytes < 100_000  # 4 lesions x (2 x 1000 bins + a few counts), not 12 M pixels
    r = acc.compute(n_boot=20)
    assert r["EX"]["n_pos_pixels"] + r["EX"]["n_neg_pixels"] == int(fov.sum())
    assert r["EX"]["auc_roc"] == pytest.approx(1.0, abs=1e-3)


def test_one_overlap_rule_and_each_callers_conversion():
    """metrics/overlap.py: Dice/IoU are NaN when truth and prediction are both empty; a false positive on an
    empty truth is 0. The callers convert the undefined case at their boundary, each as documented."""
    import math

    import torch

    from monailabel_dr.lib.trainers.lesion_data import PooledLesionDice
    from monailabel_dr.metrics import regression, uncertainty
    from monailabel_dr.metrics.overlap import dice_from_counts, iou_from_counts, mask_dice

    assert math.isnan(float(dice_from_counts(0, 0, 0))) and math.isnan(float(iou_from_counts(0, 0, 0)))
    assert float(dice_from_counts(0, 5, 0)) == 0.0 and float(dice_from_counts(2, 1, 1)) == pytest.approx(2 / 3)
    assert np.allclose(dice_from_counts([1, 0], [1, 0], [0, 0]), [2 / 3, np.nan], equal_nan=True)
    empty, one = np.zeros((4, 4), bool), np.eye(4, dtype=bool)
    assert math.isnan(mask_dice(empty, empty)) and mask_dice(one, empty) == 0.0
    assert regression._dice(0, 0, 0) is None and regression._dice(1, 0, 1) == pytest.approx(2 / 3)
    assert uncertainty.dice(empty, empty) == 1.0 and uncertainty.dice(one, one) == 1.0
    m = PooledLesionDice(lesion=0)
    m.reset()
    target = torch.zeros(1, 5, 4, 4)
    target[:, -1] = 1                                       # field of view only: no lesion anywhere
    m.update((torch.full((1, 4, 4, 4), -10.0), target))     # and nothing predicted
    assert m.compute() == 0.0                               # the key metric's number for "undefined"


def test_connected_components_one_rule_raster_order_matches_scipy():
    """fundus/components.py: 8-connected; raster_order numbers components as scipy.ndimage.label does (the
    CAM region ids a client sees), with areas and centroids to match."""
    from scipy import ndimage

    from monailabel_dr.fundus.components import connected_components
    from monailabel_dr.metrics.lesions import proposals_from_map

    rng = np.random.default_rng(0)
    for _ in range(50):
        m = ndimage.gaussian_filter(rng.random((int(rng.integers(2, 120)), int(rng.integers(2, 120)))), 2) > 0.52
        ref, k = ndimage.label(m, structure=np.ones((3, 3)))
        c = connected_components(m, raster_order=True)
        assert c.n == k and np.array_equal(c.labels, ref)
        assert np.array_equal(c.areas, np.bincount(ref.ravel(), minlength=k + 1)[1:])
        assert connected_components(m).n == k               # OpenCV's own numbering: same components
    diag = np.zeros((5, 5))
    diag[0, 0] = diag[1, 1] = 1.0                           # diagonal neighbours: one 8-connected region
    labels, scores = proposals_from_map(diag, threshold=0.5)
    assert labels.max() == 1 and scores.tolist() == [1.0]
