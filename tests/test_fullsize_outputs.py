"""The fast full-size restore (issue 17) gives the same outputs as the straightforward path, pixel for pixel,
on a real 4288x2848 IDRiD photograph: the label map, the probability maps and the lesion statistics."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from conftest import IDRID


def _reference_probs(data):
    """The path served before: per-channel restore, np.stack, boolean FOV masking."""
    from monailabel_dr.fundus import geometry

    geom = geometry.FundusGeometry.from_dict(data["fundus_geometry"])
    work = torch.sigmoid(torch.as_tensor(data["pred"]).float()).numpy()
    fov_w = np.asarray(data["fov"])[0] > 0.5
    work = work * fov_w[None]
    probs = np.stack([geometry.to_original(c, geom, interpolation="linear") for c in work]).astype(np.float32)
    fov = data["fundus_source_fov"]
    probs[:, ~fov] = 0.0
    return probs, fov


def _reference_label(probs, threshold):
    above = probs >= threshold
    best = np.argmax(np.where(above, probs, -1.0), axis=0)
    lab = (best + 1).astype(np.uint8)
    lab[~above.any(axis=0)] = 0
    return lab


def test_label_map_rule_matches_argmax_with_ties():
    from monailabel_dr.lib.infers.lesion_seg import label_map_from_probs

    rng = np.random.default_rng(0)
    probs = rng.choice(np.array([0.0, 0.3, 0.5, 0.7, 0.9], np.float32), size=(4, 64, 64))   # many exact ties
    for t in (0.0, 0.5, 0.6, 1.0):
        assert np.array_equal(label_map_from_probs(probs, t), _reference_label(probs, t)), t


@pytest.mark.skipif(not (IDRID / "images" / "IDRiD_05.jpg").is_file(),
                    reason="needs ../shared/data/idrid_train (the real 4288x2848 IDRiD photographs)")
def test_fast_restore_is_identical_on_a_real_photograph(tmp_path):
    from monailabel_dr.cli import make_app
    from monailabel_dr.fundus import io
    from monailabel_dr.lib.infers.lesion_seg import fov_radius, lesion_stats
    from monailabel_dr.fundus.landmarks import quadrant_frame
    from monailabel_dr.networks.lesion_net import build_lesion_net
    from monailabel_dr.transforms import landmarks_of

    (tmp_path / "store").mkdir()
    app = make_app(str(tmp_path / "store"), {"models": "lesion_seg", "lesion_seg_profile": "cpu",
                                             "model_dir": str(tmp_path / "model"), "device": "cpu"})
    task = app._infers["lesion_seg"]
    torch.manual_seed(0)   # untrained weights only to drive the pipeline: outputs near 0.5 stress the ties
    torch.save({"model": build_lesion_net(task.model.network).state_dict()}, task.model.published_path)
    image = str(IDRID / "images" / "IDRiD_05.jpg")
    _, data = task({"image": image, "skip_writer": True})
    probs, fov, geom = task.full_resolution(data)
    ref_probs, ref_fov = _reference_probs(data)
    assert probs.shape == (4, 2848, 4288)
    assert np.array_equal(fov, ref_fov)
    assert np.array_equal(probs, ref_probs)
    frame = quadrant_frame(landmarks_of(data), (0.5 * (geom.bbox[2] + geom.bbox[3] - 1), 0.5 * (geom.bbox[0] + geom.bbox[1] - 1)))
    for threshold in (0.5, 0.45):
        path, answer = task({"image": image, "threshold": threshold})
        try:
            served = io.read_label(path)
        finally:
            os.remove(path)
        ref = _reference_label(ref_probs, threshold)
        assert ref.any()
        assert np.array_equal(served, ref), f"threshold {threshold}: {(served != ref).sum()} pixels differ"
        # the statistics from the reference masks ((p >= t) & fov, OpenCV 8-connected components)
        for i, les in enumerate(("MA", "HE", "EX", "SE")):
            mask = ((ref_probs[i] >= threshold) & ref_fov).astype(np.uint8)
            n, _, st, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            assert answer["lesions"][les]["components"] == n - 1
            assert answer["lesions"][les]["area_px"] == int(st[1:, cv2.CC_STAT_AREA].sum())
        # everything else the answer says per lesion (quadrant counts, the nearest component's distance) as the
        # full-image statistics of the reference maps give it: the served ones label only the FOV's box
        assert answer["lesions"] == lesion_stats(ref_probs, ref_fov, threshold, frame, fov_radius(geom))
    assert lesion_stats(probs, fov, 0.5, frame, fov_radius(geom)) == lesion_stats(ref_probs, ref_fov, 0.5, frame, fov_radius(geom))


@pytest.mark.skipif(not (IDRID / "images" / "IDRiD_05.jpg").is_file(),
                    reason="needs ../shared/data/idrid_train (the real 4288x2848 IDRiD photographs)")
def test_fast_preprocessing_is_identical_on_a_real_photograph(monkeypatch):
    """The served pre-processing (OpenCV JPEG decode, table 8-bit -> float, OpenCV brightness, no re-checks) gives
    the working image, FOV masks, geometry and landmarks of the straightforward path bit for bit: PIL's decode,
    astype / 255, (R + G) * 0.5 for the FOV's brightness."""
    from PIL import Image

    from monailabel_dr.fundus import geometry
    from monailabel_dr.fundus.landmarks import detect_landmarks
    from monailabel_dr.transforms import LoadFundusd, landmarks_of

    image = IDRID / "images" / "IDRiD_05.jpg"
    served = LoadFundusd(keys="image", size=1024, keep_source_fov=True, landmarks=True)({"image": str(image)})

    with Image.open(image) as im:
        rgb = np.asarray(im.convert("RGB")).astype(np.float32) / 255.0
    with monkeypatch.context() as m:
        m.setattr(geometry, "_brightness", lambda f, unit_rgb=False: (f[..., 0] + f[..., 1]) * np.float32(0.5))
        fov = geometry.detect_fov(rgb)
    work, geom, work_fov = geometry.prepare(rgb, 1024, fov=fov)
    assert np.array_equal(served["fundus_source_fov"], fov)
    assert served["fundus_geometry"] == geom.to_dict()
    assert np.array_equal(served["image"].numpy(), work.transpose(2, 0, 1))
    assert np.array_equal(served["fov"].numpy()[0], work_fov.astype(np.float32))
    assert landmarks_of(served).to_dict() == detect_landmarks(rgb, fov).to_dict()


def test_channel_map_keeps_order_and_runs_inline_inside_the_pool():
    """Per-channel steps run in a bounded pool; one that splits its own work again (the label map's bands inside
    a channel step) must not wait on that pool from one of its threads. With every pool thread busy in such a
    step this would hang; channel_map runs the inner work inline instead."""
    import threading

    from monailabel_dr.lib.infers import base
    from monailabel_dr.lib.infers.base import channel_map, channel_pool

    n = channel_pool()._max_workers
    started = threading.Barrier(n, timeout=10)

    def outer(i):
        started.wait()          # every pool thread is inside an outer step at once
        inner = channel_map(lambda j: (threading.current_thread().name, i * 10 + j), range(3))
        return [v for _, v in inner], {name for name, _ in inner}

    futures = [channel_pool().submit(outer, i) for i in range(n)]
    try:
        results = [f.result(timeout=60) for f in futures]
    except Exception:
        base._CHANNEL_POOL = None   # a deadlocked pool would hang every later test: give them a fresh one
        raise
    assert [r[0] for r in results] == [[i * 10, i * 10 + 1, i * 10 + 2] for i in range(n)]
    assert all(len(names) == 1 for _, names in results)        # inline: the outer step's own thread
    assert channel_map(lambda x: x * x, range(7)) == [0, 1, 4, 9, 16, 25, 36]
