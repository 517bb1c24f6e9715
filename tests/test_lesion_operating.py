"""What `lesion_seg` adds at inference (issue 18): per-lesion operating thresholds chosen on validation and
stored in the checkpoint, and test-time flips; one implementation used by the trainer, the server and
`evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import serve_in_process, tiny_conf
from monailabel_dr.fundus.lesions import LESIONS


# ---------------------------------------------------------------- thresholds from histograms (metrics)
def _hists(p, t, n=1000):
    bins = np.minimum((p * n).astype(int), n - 1)
    return np.bincount(bins[t], minlength=n), np.bincount(bins[~t], minlength=n)


def test_dice_by_threshold_matches_counting():
    from monailabel_dr.metrics.lesions import dice_by_threshold

    rng = np.random.default_rng(0)
    t = rng.random(5000) < 0.1
    p = np.clip(rng.normal(0.3 + 0.4 * t, 0.2), 0, 1)
    pos, neg = _hists(p, t)
    dice = dice_by_threshold(pos, neg)
    for b in (0, 137, 500, 811, 999):
        pred = np.minimum((p * 1000).astype(int), 999) >= b
        tp = np.sum(pred & t)
        assert dice[b] == pytest.approx(2 * tp / (2 * tp + np.sum(pred & ~t) + np.sum(~pred & t)))


def test_best_threshold_is_the_argmax_within_bounds():
    from monailabel_dr.metrics.lesions import best_dice_threshold, dice_by_threshold

    rng = np.random.default_rng(1)
    t = rng.random(20000) < 0.05
    p = np.clip(rng.normal(0.15 + 0.3 * t, 0.08), 0, 1)   # best threshold well below 0.5
    pos, neg = _hists(p, t)
    thr, d = best_dice_threshold(pos, neg)
    dice = dice_by_threshold(pos, neg)
    assert 0.05 <= thr < 0.5 and d == pytest.approx(np.nanmax(dice[50:951]))
    assert d > dice[500]                                   # better than 0.5 on these data
    thr_b, _ = best_dice_threshold(pos, neg, bounds=(0.4, 0.6))
    assert 0.4 <= thr_b <= 0.6
    assert best_dice_threshold(np.zeros(1000), neg)[0] == 0.5   # no positive pixel: the default


def test_accumulator_reports_dice_at_operating_thresholds():
    """dice_pooled_operating at 0.5 equals the counted dice_pooled at 0.5; other thresholds as counted."""
    from monailabel_dr.metrics.lesions import LesionSegAccumulator

    rng = np.random.default_rng(2)
    acc = LesionSegAccumulator(threshold=0.5)
    truths, probs = [], []
    for i in range(3):
        truth = {les: rng.random((40, 50)) < 0.1 for les in LESIONS}
        prob = {les: np.clip(rng.normal(0.3 + 0.4 * truth[les], 0.2), 0, 1) for les in LESIONS}
        acc.update(f"im{i}", prob, truth)
        truths.append(truth)
        probs.append(prob)
    out = acc.compute(n_boot=0, operating={"MA": 0.5, "HE": 0.25, "EX": 0.7, "SE": 0.5})
    assert out["MA"]["dice_pooled_operating"] == pytest.approx(out["MA"]["dice_pooled"])
    for les, t in (("HE", 0.25), ("EX", 0.7)):
        tp = sum(np.sum((p[les] >= t) & m[les]) for p, m in zip(probs, truths))
        pp = sum(np.sum(p[les] >= t) for p in probs)
        pt = sum(np.sum(m[les]) for m in truths)
        assert out[les]["dice_pooled_operating"] == pytest.approx(2 * tp / (pp + pt), abs=2e-3)
        assert out[les]["dice_pooled_best"] >= out[les]["dice_pooled_operating"] - 1e-12
    assert "dice_pooled_operating" in out["mean"]


# ---------------------------------------------------------------- label map with per-lesion thresholds
def test_label_map_with_per_lesion_thresholds():
    from monailabel_dr.lib.infers.lesion_seg import label_map_from_probs, per_lesion

    rng = np.random.default_rng(3)
    probs = rng.random((4, 30, 40)).astype(np.float32)
    thr = [0.2, 0.9, 0.5, 0.7]
    above = probs >= np.asarray(thr)[:, None, None]
    ref = np.argmax(np.where(above, probs, -1.0), axis=0).astype(np.uint8) + 1
    ref[~above.any(axis=0)] = 0
    assert np.array_equal(label_map_from_probs(probs, thr), ref)
    assert np.array_equal(label_map_from_probs(probs, thr, bbox=(0, 30, 0, 40)), ref)
    assert np.array_equal(label_map_from_probs(probs, 0.5), label_map_from_probs(probs, [0.5] * 4))
    with pytest.raises(ValueError):
        per_lesion([0.5, 0.5], 4)


# ---------------------------------------------------------------- minimum component peak (hysteresis)
def _blobs():
    """Lesion 0 (MA): a faint speck (peak 0.55) and a confident blob (peak 0.95), both above 0.5."""
    probs = np.zeros((4, 40, 60), np.float32)
    probs[0, 5:8, 5:8] = 0.55
    probs[0, 20:30, 30:45] = 0.6
    probs[0, 24:26, 36:38] = 0.95
    probs[2, 10:14, 50:55] = 0.7            # EX: one component, peak 0.7
    return probs


def test_kept_components_keep_only_components_with_a_confident_core():
    from skimage.filters import apply_hysteresis_threshold

    from monailabel_dr.fundus.components import kept_components

    p = _blobs()[0]
    kept = kept_components(p, 0.5, 0.9).astype(bool)
    assert not kept[5:8, 5:8].any() and kept[20:30, 30:45].all()        # the faint speck goes, the whole blob stays
    assert np.array_equal(kept, apply_hysteresis_threshold(p, 0.5 - 1e-6, 0.9 - 1e-6))   # the library's rule
    assert np.array_equal(kept_components(p, 0.5, 0.4), (p >= 0.5).astype(np.uint8))   # peak <= threshold: plain
    rng = np.random.default_rng(0)   # 8-connected, unlike skimage's default: a diagonal neighbour is one component
    q = np.zeros((5, 5), np.float32)
    q[1, 1], q[2, 2] = 0.6, 0.95
    assert kept_components(q, 0.5, 0.9)[1, 1] == 1
    r = rng.random((50, 70)).astype(np.float32)
    assert np.array_equal(kept_components(r, 0.3, 0.99).astype(bool) <= (r >= 0.3), np.ones_like(r, bool))
    # a minimum area: the 9-pixel speck goes, the 150-pixel blob stays; with skimage's rule for the same thing
    from skimage.morphology import remove_small_objects

    by_area = kept_components(p, 0.5, 0, min_area=10).astype(bool)
    assert not by_area[5:8, 5:8].any() and by_area[20:30, 30:45].all()
    assert np.array_equal(by_area, remove_small_objects(p >= 0.5, min_size=10, connectivity=2))
    assert kept_components(p, 0.5, 0, min_area=151).sum() == 0 and kept_components(p, 0.5, 0, min_area=150).sum() == 150


def test_min_peak_drops_faint_components_from_the_label_map_and_the_statistics():
    from monailabel_dr.fundus.landmarks import quadrant_frame
    from monailabel_dr.lib.infers.lesion_seg import label_map_from_probs, lesion_stats, served_masks

    probs = _blobs()
    fov = np.ones(probs.shape[1:], bool)
    frame = quadrant_frame(None, (30.0, 20.0))
    assert served_masks(probs, 0.5, None) is None
    plain = lesion_stats(probs, fov, 0.5, frame)
    masks = served_masks(probs, 0.5, 0.9)
    peak = lesion_stats(probs, fov, 0.5, frame, masks=masks)
    assert plain["MA"]["components"] == 2 and peak["MA"]["components"] == 1
    assert peak["MA"]["area_px"] == 150 and plain["MA"]["area_px"] == 159
    assert plain["EX"]["components"] == 1 and peak["EX"]["components"] == 0     # EX's peak 0.7 < 0.9
    lab = label_map_from_probs(probs, 0.5, bbox=(0, 40, 0, 60), masks=masks)
    assert (lab == 1).sum() == 150 and not (lab == 3).any()
    assert np.array_equal(label_map_from_probs(probs, 0.5, masks=served_masks(probs, 0.5, 0.3)),
                          label_map_from_probs(probs, 0.5))                       # below every threshold: no change
    # a minimum area instead: MA's 9-pixel speck goes, EX's 20-pixel component stays
    by_area = lesion_stats(probs, fov, 0.5, frame, masks=served_masks(probs, 0.5, None, 10))
    assert by_area["MA"]["components"] == 1 and by_area["EX"]["components"] == 1
    # labelled inside a box that holds every non-zero probability: the same statistics, centroids included
    ys, xs = np.nonzero(probs.max(axis=0))
    box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    assert box != (0, probs.shape[1], 0, probs.shape[2])
    for m in (None, masks):
        assert lesion_stats(probs, fov, 0.5, frame, 10.0, masks=m, bbox=box) == lesion_stats(probs, fov, 0.5, frame, 10.0, masks=m)


def test_min_area_is_parts_per_million_of_the_field_of_view():
    from monailabel_dr.lib.infers.lesion_seg import min_area_px

    assert min_area_px(3, 8_450_000) == 26          # an IDRiD field of view (IDRiD_05: 8.46 M px)
    assert min_area_px(3, 8_450_000 // 4) == 7      # the same photograph at half the size: the same rule
    assert min_area_px(None, 8_450_000) == 1 and min_area_px(0, 100) == 1


# ---------------------------------------------------------------- test-time flips
class _Asymmetric(torch.nn.Module):
    """A per-pixel logit that is not flip-equivariant (depends on the column and row)."""

    def forward(self, x):
        h, w = x.shape[-2:]
        ramp = torch.linspace(-2, 2, w)[None, None, None, :] + torch.linspace(0, 1, h)[None, None, :, None]
        return x[:, :1] + ramp


def test_flip_tta_averages_probabilities_over_flips():
    from monailabel_dr.networks.lesion_net import FlipTTAInferer

    net = _Asymmetric()
    x = torch.randn(2, 3, 6, 8)
    assert torch.equal(FlipTTAInferer("none")(x, net), net(x))
    for mode, flips in (("hflip", [(), (-1,)]), ("flips", [(), (-1,), (-2,), (-2, -1)])):
        want = sum(torch.sigmoid(torch.flip(net(torch.flip(x, d)), d) if d else net(x)) for d in flips) / len(flips)
        got = torch.sigmoid(FlipTTAInferer(mode)(x, net))
        assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="rot90"):
        FlipTTAInferer("rot90")


def test_inference_block_is_checked():
    from monailabel_dr.config import ConfError
    from monailabel_dr.lib.infers.lesion_seg import InferenceSettings

    assert InferenceSettings.parse({"tta": "hflip", "thresholds": "validation"}, "x") == \
        InferenceSettings(tta="hflip", thresholds="validation")
    assert InferenceSettings.parse(None, "x") == InferenceSettings()
    assert InferenceSettings.parse({"min_peak": 0.8}, "x").min_peak == 0.8
    assert InferenceSettings.parse({"min_peak": 0}, "x").min_peak is None
    assert InferenceSettings.parse({"min_area_ppm": 3}, "x").min_area_ppm == 3.0
    for bad, word in (({"tta": "rot"}, "tta"), ({"thresholds": 1.5}, "thresholds"), ({"thresholds": "val"}, "thresholds"),
                      ({"treshold": 0.5}, "unknown"), ({"min_peak": 1.0}, "min_peak"), ({"min_peak": "high"}, "min_peak"),
                      ({"min_area_ppm": -1}, "min_area_ppm"), ({"min_area_ppm": 5000}, "min_area_ppm")):
        with pytest.raises(ConfError, match=word):
            InferenceSettings.parse(bad, "lesion_seg profile 'x'")


# ---------------------------------------------------------------- stored by the trainer, served, evaluated
def test_trained_checkpoint_stores_thresholds_and_the_server_uses_them(phantom_store, tmp_path):
    """A tiny lesion_seg trained on Slicer-style label maps with validation images stores per-lesion
    thresholds in its record; /infer/lesion_seg with thresholds 'validation' serves them (the label
    map is the one those thresholds give), a request's number overrides them, and tta is accepted."""
    from monailabel.interfaces.utils.app import app_instance

    from monailabel_dr.lib.checkpoints import operating_thresholds, read_record
    from test_lesion_seg_server import _save, phantom_label_map

    conf = tiny_conf(tmp_path / "model", lesion_seg_set="inference.thresholds=validation")
    with serve_in_process(phantom_store, conf) as client:
        images = sorted(json.loads(client.get("/datastore/?output=all").content)["objects"])[:6]
        for k, image_id in enumerate(images):
            _save(client, image_id, phantom_label_map(k))
        r = client.post("/train/lesion_seg?run_sync=true", json={"max_epochs": 2, "val_split": 0.34})
        assert r.status_code == 200, r.text
        ckpt = tmp_path / "model" / "lesion_seg.pt"
        stored = operating_thresholds(read_record(str(ckpt)), LESIONS)
        assert stored is not None and all(0.05 <= stored[les] <= 0.95 for les in LESIONS)

        r = client.post(f"/infer/lesion_seg?image={images[0]}&output=json")
        assert r.status_code == 200, r.text
        ans = r.json()
        assert ans["threshold_source"].startswith("validation")
        served = [stored[les] for les in LESIONS]
        assert (ans["threshold"] == dict(zip(LESIONS, served))) or (len(set(served)) == 1 and ans["threshold"] == served[0])

        app = app_instance()
        probs, fov = app._infers["lesion_seg"].predict(app.datastore().get_image_uri(images[0]))
        for les, p in zip(LESIONS, probs):
            want = int(np.count_nonzero((p >= stored[les]) & fov))
            assert ans["lesions"][les]["area_px"] == want

        r = client.post(f"/infer/lesion_seg?image={images[0]}&output=json", data={"params": json.dumps({"threshold": 0.5, "tta": "flips"})})
        assert r.status_code == 200, r.text
        assert r.json()["threshold"] == 0.5 and r.json()["threshold_source"] == "request" and r.json()["tta"] == "flips"
        # a minimum component peak: only components whose peak reaches it are counted, and it says so
        r = client.post(f"/infer/lesion_seg?image={images[0]}&output=json",
                        data={"params": json.dumps({"threshold": 0.5, "min_peak": 0.75})})
        assert r.status_code == 200, r.text
        assert r.json()["min_peak"] == 0.75
        from monailabel_dr.fundus.components import kept_components

        for les, p in zip(LESIONS, probs):
            want = int(np.count_nonzero(kept_components(p * fov, 0.5, 0.75)))
            assert r.json()["lesions"][les]["area_px"] == want
        # and a minimum area, in ppm of the field of view: the answer gives it in pixels too
        r = client.post(f"/infer/lesion_seg?image={images[0]}&output=json",
                        data={"params": json.dumps({"threshold": 0.5, "min_area_ppm": 2000 / 3})})
        assert r.status_code == 200, r.text
        area = r.json()["min_area_px"]
        assert area == int(np.ceil(2000 / 3 * 1e-6 * fov.sum()))
        for les, p in zip(LESIONS, probs):
            want = int(np.count_nonzero(kept_components(p * fov, 0.5, 0, area)))
            assert r.json()["lesions"][les]["area_px"] == want
        for bad in ({"threshold": "val"}, {"tta": "rot90"}, {"min_peak": 1.5}, {"min_peak": "x"}, {"min_area_ppm": 1e9}):
            r = client.post(f"/infer/lesion_seg?image={images[0]}&output=json", data={"params": json.dumps(bad)})
            assert r.status_code == 422 and next(iter(bad)) in r.text


def test_a_profile_with_negatives_needs_their_source():
    """cpu_negatives trains with real negatives: without negatives_source it refuses rather than silently
    training the plain recipe; with one it reads it (here a folder that is not there: a clear 4xx)."""
    from types import SimpleNamespace

    from monailabel_dr.lib.errors import BadInput
    from monailabel_dr.lib.trainers.lesion_data import LesionLabelSource
    from monailabel_dr.lib.trainers.settings import LesionSamTrain, LesionSegTrain

    src = LesionLabelSource()
    src.model = SimpleNamespace(train=LesionSegTrain.from_dict({"negatives_max": 22}))
    with pytest.raises(BadInput, match="negatives_source"):
        src._negatives({})
    with pytest.raises(BadInput, match="grades.csv"):
        src._negatives({"negatives_source": "grades:/no/such/folder"})
    src.model = SimpleNamespace(train=LesionSegTrain.from_dict({}))
    assert src._negatives({}) == []
    src.model = SimpleNamespace(train=LesionSamTrain.from_dict({}))   # settings without negatives
    assert src._negatives({}) == []


def test_map_components_inside_the_box_are_the_full_image_components():
    """map_components (lesion_seg's statistics and lesion_sam's prompts) labels only the FOV's box when the
    threshold is > 0: the same components, areas and centroids (in input pixels) as labelling everything."""
    import cv2

    from monailabel_dr.lib.infers.lesion_seg import map_components

    rng = np.random.default_rng(3)
    p = np.zeros((90, 140), np.float32)
    p[12:80, 25:120] = rng.random((68, 95)).astype(np.float32) ** 4
    fov = np.zeros(p.shape, bool)
    fov[10:82, 20:125] = True
    box = (10, 82, 20, 125)
    mask = (p >= 0.3).astype(np.uint8)
    mask[40:60] = 0
    for t, m in ((0.5, None), (0.3, None), (0.3, mask), (0.0, None)):
        ref = (p >= t) & fov if m is None else m.astype(bool) & fov
        n, _, st, cents = cv2.connectedComponentsWithStats(ref.astype(np.uint8), connectivity=8)
        got = map_components(p, t, fov, box, m)
        assert got.n == n - 1 > 0, t
        order = np.lexsort(cents[1:].T)
        got_order = np.lexsort(got.centroids.T)
        np.testing.assert_allclose(got.centroids[got_order], cents[1:][order])
        assert np.array_equal(got.areas[got_order], st[1:, cv2.CC_STAT_AREA][order])
