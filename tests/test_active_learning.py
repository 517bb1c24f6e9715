"""Active learning: scoring methods and strategies through the in-process server, and the numbers behind them.

One module-scoped server (12 phantoms, 6 with grade labels, 4 of those with lesion maps) on which the
tiny grading, lesion_seg and lesion_sam models are trained for one epoch each; the 409 answers are
taken before and between those trainings.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from conftest import serve_in_process, tiny_conf, write_phantom_store
from monailabel_dr.metrics.uncertainty import (
    binary_entropy,
    categorical_entropy,
    dice,
    grade_uncertainty,
    k_center_greedy,
    l2_normalise,
    lesion_map_uncertainty,
    mc_mutual_information,
    mc_total_variance,
    pairwise_disagreement,
)

SCORE_METHODS = ("grade_uncertainty", "lesion_uncertainty", "disagreement")


# ----------------------------------------------------------------------------- pure functions
def test_entropies_by_hand():
    assert categorical_entropy([0.2] * 5) == pytest.approx(math.log2(5))
    assert categorical_entropy([1, 0, 0, 0, 0]) == pytest.approx(0.0, abs=1e-5)
    assert categorical_entropy([0.5, 0.5, 0, 0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert binary_entropy(0.5) == pytest.approx(1.0)
    # H(1/4) = 1/4 log2 4 + 3/4 log2 4/3 = 0.5 + 0.311278
    assert binary_entropy(0.25) == pytest.approx(0.811278, abs=1e-6)
    assert binary_entropy(np.array([0.0, 1.0])) == pytest.approx([0.0, 0.0], abs=1e-5)


def test_mc_statistics_by_hand():
    two = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert mc_total_variance(two) == pytest.approx(0.5)          # var 0.25 per class, summed
    assert mc_mutual_information(two) == pytest.approx(1.0, abs=1e-5)   # H(mean) = 1 bit, each pass 0
    same = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert mc_total_variance(same) == 0 and mc_mutual_information(same) == pytest.approx(0.0, abs=1e-9)
    g = grade_uncertainty([0.2] * 5, [[0.6, 0.1, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert g["grade_entropy"] == pytest.approx(math.log2(5))
    assert g["grade_mc_variance"] == pytest.approx(0.04 + 4 * 0.0025)   # (0.4/2)^2 + 4 * (0.1/2)^2
    assert grade_uncertainty([1, 0, 0, 0, 0], None) == {"grade_entropy": pytest.approx(0.0, abs=1e-5)}
    with pytest.raises(ValueError):
        mc_total_variance([[0.5, 0.5]])


def test_lesion_map_uncertainty_by_hand():
    # 2 passes, 1 lesion, 2x2 pixels; the FOV is the left column
    p = np.zeros((2, 1, 2, 2))
    p[:, 0, 0, 0] = [0.5, 0.5]       # mean 0.5: entropy 1, every pass also 1 -> MI 0
    p[:, 0, 1, 0] = [0.0, 1.0]       # mean 0.5: entropy 1, each pass 0 -> MI 1
    p[:, 0, :, 1] = 0.5              # outside the FOV: ignored
    fov = np.array([[True, False], [True, False]])
    u = lesion_map_uncertainty(p, fov, threshold=0.5)
    assert u["mean_entropy"] == pytest.approx(1.0, abs=1e-5)
    assert u["uncertain_fraction"] == 1.0
    assert u["mutual_information"] == pytest.approx(0.5, abs=1e-5)
    assert u["fov_pixels"] == 2
    # a confident map: entropy ~0, no uncertain pixel; a pixel at p = 0.25 has entropy 0.811
    q = np.zeros((3, 2, 1, 2))
    q[:, 0, 0, 0] = 0.25
    u = lesion_map_uncertainty(q, np.ones((1, 2), bool), threshold=0.9)
    assert u["mean_entropy"] == pytest.approx(0.811278 / 4, abs=1e-5)     # 1 of 4 (lesion, pixel) values
    assert u["uncertain_fraction"] == 0.0
    assert u["per_lesion_entropy"] == pytest.approx([0.811278 / 2, 0.0], abs=1e-5)
    assert lesion_map_uncertainty(q, np.zeros((1, 2), bool))["mean_entropy"] == 0.0


def test_dice_and_pairwise_disagreement_by_hand():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    empty = np.zeros(4, bool)
    assert dice(a, b) == pytest.approx(0.5)             # 2*1 / (2+2)
    assert dice(a, a) == 1.0 and dice(empty, empty) == 1.0 and dice(a, empty) == 0.0
    value, pairs = pairwise_disagreement({"x": a, "y": b, "z": empty})
    assert pairs == {"x|y": pytest.approx(0.5), "x|z": 0.0, "y|z": 0.0}
    assert value == pytest.approx((0.5 + 1 + 1) / 3)
    with pytest.raises(ValueError):
        pairwise_disagreement({"x": a})


def test_k_center_greedy_by_hand():
    pts = np.array([[0.0], [1.0], [10.0], [4.0]])
    picked, gaps = k_center_greedy(pts, None, k=3)
    assert picked == [0, 2, 3] and gaps[0] == math.inf and gaps[1:] == [10.0, 4.0]
    picked, gaps = k_center_greedy(pts, np.array([[9.0]]), k=2)   # 10 is covered by 9: 0 first, then 4
    assert picked == [0, 3] and gaps == [9.0, 4.0]
    picked, _ = k_center_greedy(np.array([[1.0], [-1.0]]), np.array([[0.0]]), k=1)
    assert picked == [0]                                            # tie: the lower index
    n = l2_normalise([[3.0, 4.0], [0.0, 0.0]])
    assert n[0] == pytest.approx([0.6, 0.8]) and np.all(n[1] == 0)


def test_lesion_net_dropout_is_optional_and_parameter_free():
    from monailabel_dr.networks.lesion_net import build_lesion_net

    cfg = {"widths": [8, 16, 16, 32], "depths": [1, 1, 1, 1], "cut": 8}
    plain, dropped = build_lesion_net(cfg), build_lesion_net({**cfg, "dropout": 0.3})
    assert isinstance(plain.dropout, torch.nn.Identity) and isinstance(dropped.dropout, torch.nn.Dropout2d)
    dropped.load_state_dict(plain.state_dict(), strict=True)            # old checkpoints load
    plain.eval(), dropped.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        y = plain(x)
        assert torch.allclose(y, dropped(x)) and torch.allclose(y, plain.head_output(plain.head_input(x), (64, 64)))
    with pytest.raises(ValueError):
        build_lesion_net({**cfg, "dropout": 1.0})


def test_mc_passes_match_the_networks_own_forward():
    """The scoring methods' MC passes reuse the network's layers: without dropout they give its eval output."""
    from monailabel_dr.lib.activelearning.common import dropout_keep
    from monailabel_dr.lib.activelearning.grade_uncertainty import grader_mc, grader_parts
    from monailabel_dr.lib.activelearning.lesion_uncertainty import lesion_mc_probs
    from monailabel_dr.networks.attention_grader import build_grader
    from monailabel_dr.networks.lesion_net import build_lesion_net

    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    grader = build_grader({"channels": [8, 16], "strides": [2, 1], "cam_channels": 16, "dropout": 0.3}).eval()
    assert grader_parts(grader)[1] == 0.3
    eval_p, mc_p, emb = grader_mc(grader, x, n=4, p=0.0)
    with torch.no_grad():
        assert eval_p == pytest.approx(torch.softmax(grader(x)[0, :5], -1).numpy(), abs=1e-6)
        assert emb == pytest.approx(grader.feature_maps(x).mean(dim=(2, 3))[0].numpy(), abs=1e-6)
    assert mc_p == pytest.approx(np.repeat(eval_p[None], 4, 0), abs=1e-6)
    _, mc_p, _ = grader_mc(grader, x, n=4, p=0.5)
    assert mc_p.shape == (4, 5) and mc_total_variance(mc_p) > 0
    lesion = build_lesion_net({"widths": [8, 16, 16, 32], "depths": [1, 1, 1, 1], "cut": 8}).eval()
    probs = lesion_mc_probs(lesion, x, n=5, p=0.0)          # 5 passes: two chunks
    with torch.no_grad():
        assert probs.shape == (5, 4, 64, 64) and torch.allclose(probs[3], torch.sigmoid(lesion(x))[0], atol=1e-6)
    # an ensemble shares the passes among its members in turn: pass i is member i mod K's
    ens = build_lesion_net({"widths": [8, 16, 16, 32], "depths": [1, 1, 1, 1], "cut": 8, "members": 2}).eval()
    probs = lesion_mc_probs(ens, x, n=5, p=0.0)             # members 0, 1, 0, 1, 0: 3 passes of member 0, then 2
    with torch.no_grad():
        p0, p1 = (torch.sigmoid(m(x))[0] for m in ens.members)
    assert probs.shape == (5, 4, 64, 64)
    assert all(torch.allclose(probs[i], p0, atol=1e-6) for i in range(3))
    assert all(torch.allclose(probs[i], p1, atol=1e-6) for i in (3, 4)) and not torch.allclose(p0, p1, atol=1e-3)
    keep = dropout_keep((1000, 50), 0.2, seed=1, device="cpu")
    assert set(torch.unique(keep).tolist()) == {0.0, 1.25} and abs(float(keep.mean()) - 1) < 0.02
    assert torch.equal(keep, dropout_keep((1000, 50), 0.2, seed=1, device="cpu"))     # reproducible


# ----------------------------------------------------------------------------- the server
def _save_lesion_map(client, image_id: str) -> None:
    from test_lesion_seg_server import phantom_label_map, slicer_nrrd

    r = client.put(f"/datastore/label?image={image_id}&tag=final",
                   files={"label": (f"{image_id}.nrrd", slicer_nrrd(phantom_label_map(int(image_id.split("_")[1]))))})
    assert r.status_code == 200, r.text


def _datastore():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance().datastore()


def _train(client, model: str) -> None:
    r = client.post(f"/train/{model}?run_sync=true", json={"max_epochs": 1})
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def al_server(tmp_path_factory):
    from monailabel_dr.demo import read_truth

    base = tmp_path_factory.mktemp("al")
    store = write_phantom_store(base / "store", n=12, labelled=6, seed=0)
    labelled = sorted(k for k, v in read_truth(str(store)).items() if v["labelled"])
    with serve_in_process(store, tiny_conf(base / "model", models="grading,lesion_seg,lesion_sam")) as c:
        untrained = {m: c.post(f"/scoring/{m}?run_sync=true") for m in SCORE_METHODS}
        untrained.update({f"al/{s}": c.post(f"/activelearning/{s}")
                          for s in ("grade_uncertainty", "lesion_uncertainty", "disagreement", "diverse_uncertainty")})
        for image_id in labelled[:4]:
            _save_lesion_map(c, image_id)
        _train(c, "grading")
        untrained["disagreement_with_cam_only"] = c.post("/scoring/disagreement?run_sync=true")
        _train(c, "lesion_seg")
        _train(c, "lesion_sam")
        yield {"client": c, "store": store, "model_dir": base / "model", "labelled": labelled, "untrained": untrained}


def _unlabelled(ds) -> list[str]:
    return sorted(ds.get_unlabeled_images())


def _stored(ds, image_id: str, method: str):
    return ds.get_image_info(image_id).get(f"score_{method}")


def _named(res: dict, strategy: str) -> bool:
    """The strategy's name in its answer: MONAI Label's endpoint replaces ``strategy`` by the image's
    ``strategy`` info ({name: {"ts", "client_id"}}) once the image has been handed out before."""
    return res["strategy"] == strategy or strategy in res["strategy"]


def _identity(path) -> dict:
    st = os.stat(path)
    return {"checkpoint": os.path.realpath(path), "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def test_untrained_models_answer_409(al_server):
    u = al_server["untrained"]
    for key in (*SCORE_METHODS, "al/grade_uncertainty", "al/lesion_uncertainty", "al/disagreement", "al/diverse_uncertainty"):
        assert u[key].status_code == 409, (key, u[key].text)
    assert "lesion_seg" in u["lesion_uncertainty"].json()["detail"] and "/train/lesion_seg" in u["lesion_uncertainty"].json()["detail"]
    assert "random weights" in u["grade_uncertainty"].json()["detail"]
    # one trained localiser (the grader's CAM) is not enough to disagree
    detail = u["disagreement_with_cam_only"].json()["detail"]
    assert u["disagreement_with_cam_only"].status_code == 409 and "at least two" in detail and "trained: ['cam']" in detail


def test_info_lists_strategies_and_scoring_methods(al_server):
    info = al_server["client"].get("/info/").json()
    assert {"random", "first", "grade_uncertainty", "lesion_uncertainty", "disagreement", "diverse_uncertainty"} <= set(info["strategies"])
    assert set(SCORE_METHODS) <= set(info["scoring"])


def test_random_and_first_return_an_unlabelled_id(al_server):
    c, ds = al_server["client"], _datastore()
    for s in ("random", "first"):
        r = c.post(f"/activelearning/{s}")
        assert r.status_code == 200, r.text
        assert r.json()["id"] in _unlabelled(ds)
    assert c.post("/activelearning/first").json()["id"] == _unlabelled(ds)[0]


def test_lesion_uncertainty_scores_then_strategy_picks_the_maximum(al_server):
    c, ds = al_server["client"], _datastore()
    unl = _unlabelled(ds)
    r = c.post("/scoring/lesion_uncertainty?run_sync=true")
    assert r.status_code == 200, r.text
    summary = r.json()
    assert summary["total"] == len(unl) and summary["executed"] + summary["skipped"] == len(unl)
    current = {"lesion_seg": _identity(al_server["model_dir"] / "lesion_seg.pt")}
    assert summary["models"] == current
    scores = {}
    for i in unl:
        s = _stored(ds, i, "lesion_uncertainty")
        assert s["models"] == current and s["rank_key"] == "lesion_mean_entropy"
        assert s["score"] == s["lesion_mean_entropy"] and 0 <= s["score"] <= 1
        assert 0 <= s["lesion_uncertain_fraction"] <= 1 and s["mc_samples"] == 8
        assert s["mc_dropout_source"] == "default" and s["mc_dropout_p"] == 0.1   # tiny Lesion-Net has no dropout
        assert 0 <= s["lesion_mutual_information"] <= s["lesion_mean_entropy"] + 1e-6
        scores[i] = s["score"]
    for i in al_server["labelled"]:
        assert _stored(ds, i, "lesion_uncertainty") is None          # unlabelled images only, by default
    # nothing changed: everything is skipped
    again = c.post("/scoring/lesion_uncertainty?run_sync=true").json()
    assert again["skipped"] == len(unl) and again["executed"] == 0

    r = c.post("/activelearning/lesion_uncertainty")
    assert r.status_code == 200, r.text
    res = r.json()
    best = max(scores.values())
    assert res["id"] in unl and res["score"] == best and scores[res["id"]] == best

    # a labelled image with a (planted) higher score is never returned; a planted unlabelled maximum is
    labelled = al_server["labelled"][0]
    planted = dict(_stored(ds, unl[0], "lesion_uncertainty"), score=5.0, lesion_mean_entropy=5.0)
    ds.update_image_info(labelled, {"score_lesion_uncertainty": dict(planted, score=9.0)})
    target = unl[-1]
    ds.update_image_info(target, {"score_lesion_uncertainty": planted})
    res = c.post("/activelearning/lesion_uncertainty").json()
    assert res["id"] == target and res["score"] == 5.0
    ds.update_image_info(target, {"score_lesion_uncertainty": None})          # back to "missing": computed inline
    res = c.post("/activelearning/lesion_uncertainty").json()
    assert res["id"] in unl and res["id"] != labelled and _stored(ds, target, "lesion_uncertainty")["score"] < 1


def _republish(path) -> None:
    """Publish a different model file (as training does): the head's biases shifted."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    key = next(k for k in state if k.startswith("head.") and k.endswith("bias"))
    state[key] = state[key] + 0.7
    tmp = str(path) + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def test_scores_are_recomputed_when_a_new_model_is_published(al_server):
    c, ds = al_server["client"], _datastore()
    unl = _unlabelled(ds)
    path = al_server["model_dir"] / "lesion_seg.pt"
    assert c.post("/scoring/lesion_uncertainty?run_sync=true").status_code == 200
    before = {i: _stored(ds, i, "lesion_uncertainty") for i in unl}
    old = _identity(path)
    _republish(path)
    new = _identity(path)
    assert new != old
    # stale scores, not computed inline: the strategy still answers, by the previous model's scores, and says so ...
    r = c.post("/activelearning/lesion_uncertainty", json={"max_inline_scoring": 0})
    assert r.status_code == 200, r.text
    assert r.json()["rule"] == "best_previous_model_score" and r.json()["id"] in unl
    assert r.json()["score"] == max(before[i]["score"] for i in unl)
    # ... and the scoring method recomputes exactly the stale ones
    summary = c.post("/scoring/lesion_uncertainty?run_sync=true").json()
    assert summary["executed"] == len(unl) and summary["skipped"] == 0
    after = {i: _stored(ds, i, "lesion_uncertainty") for i in unl}
    for i in unl:
        assert before[i]["models"] == {"lesion_seg": old} and after[i]["models"] == {"lesion_seg": new}
        assert after[i]["score"] != before[i]["score"]
    # published again: the strategy computes the stale scores itself (few images) and answers
    _republish(path)
    r = c.post("/activelearning/lesion_uncertainty")
    assert r.status_code == 200, r.text
    assert all(_stored(ds, i, "lesion_uncertainty")["models"] == {"lesion_seg": _identity(path)} for i in unl)
    assert r.json()["score"] == max(_stored(ds, i, "lesion_uncertainty")["score"] for i in unl)


def test_grade_uncertainty_through_the_server(al_server):
    c, ds = al_server["client"], _datastore()
    # force: every image rescored with these settings, whatever an earlier test or a strategy scored before
    r = c.post("/scoring/grade_uncertainty?run_sync=true", json={"mc_samples": 6, "force": True})
    assert r.status_code == 200, r.text
    everyone = sorted(ds.list_images())
    assert r.json()["total"] == len(everyone)                     # labelled too: their embeddings keep diversity
    for i in everyone:
        s = _stored(ds, i, "grade_uncertainty")
        assert s["rank_key"] == "grade_entropy" and s["score"] == s["grade_entropy"]
        assert s["grade_entropy"] == pytest.approx(categorical_entropy(s["grade_probabilities"]), abs=2e-3)
        assert 0 <= s["grade_entropy"] <= math.log2(5) + 1e-6
        assert s["grade_mc_variance"] >= 0 and s["mc_samples"] == 6
        assert s["mc_dropout_source"] == "default" and s["mc_dropout_p"] == 0.2   # tiny grader: dropout 0.0
    assert any(_stored(ds, i, "grade_uncertainty")["grade_mc_variance"] > 0 for i in everyone)
    # the eval-mode probabilities are /infer/grading's
    probe = everyone[0]
    inf = c.post(f"/infer/grading?image={probe}").json()
    assert _stored(ds, probe, "grade_uncertainty")["grade_probabilities"] == pytest.approx(inf["grade_probabilities"], abs=2e-4)
    assert (al_server["model_dir"] / "active_learning" / "grading_embeddings.npz").is_file()

    res = c.post("/activelearning/grade_uncertainty").json()
    unl = _unlabelled(ds)
    assert res["id"] in unl and _named(res, "grade_uncertainty")
    assert res["score"] == max(_stored(ds, i, "grade_uncertainty")["score"] for i in unl)
    # bad parameters are the client's error
    assert c.post("/scoring/grade_uncertainty?run_sync=true", json={"mc_samples": 1}).status_code == 422
    assert c.post("/scoring/grade_uncertainty?run_sync=true", json={"images": "some"}).status_code == 422


def test_disagreement_through_the_server(al_server):
    c, ds = al_server["client"], _datastore()
    r = c.post("/scoring/disagreement?run_sync=true")
    assert r.status_code == 200, r.text
    assert set(r.json()["models"]) == {"grading", "lesion_seg", "lesion_sam"}
    unl = _unlabelled(ds)
    for i in unl:
        s = _stored(ds, i, "disagreement")
        assert s["members"] == ["cam", "lesion_sam", "lesion_seg"]
        assert set(s["pair_dice"]) == {"cam|lesion_sam", "cam|lesion_seg", "lesion_sam|lesion_seg"}
        assert s["score"] == s["disagreement"] == pytest.approx(np.mean([1 - d for d in s["pair_dice"].values()]), abs=1e-5)
        if s["cam"]["gated"]:
            assert s["mask_pixels"]["cam"] == 0
    res = c.post("/activelearning/disagreement").json()
    assert res["id"] in unl and res["score"] == max(_stored(ds, i, "disagreement")["score"] for i in unl)


def test_diverse_uncertainty_never_returns_the_same_image_twice_in_a_row(al_server):
    c, ds = al_server["client"], _datastore()
    unl = _unlabelled(ds)
    ids = []
    for _ in range(4):
        r = c.post("/activelearning/diverse_uncertainty", json={"client_id": "session-a"})
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["id"] in unl and res["score"] == _stored(ds, res["id"], "grade_uncertainty")["score"]
        ids.append(res["id"])
    assert all(a != b for a, b in zip(ids, ids[1:])) and len(set(ids)) == 4   # 6 candidates, last 8 remembered
    # a pool of two alternates instead of repeating; another session has its own memory
    two = [c.post("/activelearning/diverse_uncertainty", json={"client_id": "session-b", "pool": 2}).json()["id"]
           for _ in range(3)]
    assert two[0] != two[1] and two[2] == two[0]
    top2 = sorted(unl, key=lambda i: (-_stored(ds, i, "grade_uncertainty")["score"], i))[:2]
    assert set(two) == set(top2)


def test_an_image_the_models_cannot_read_is_recorded_and_never_picked(al_server):
    """A grey (red-free) photograph: the colour models refuse it (422 at /infer); scoring records the error once."""
    import io as _io

    import cv2
    from PIL import Image

    from monailabel_dr.fundus.phantoms import make_phantom

    c, ds = al_server["client"], _datastore()
    assert c.post("/scoring/lesion_uncertainty?run_sync=true").status_code == 200   # the others current, whatever ran before
    grey = cv2.cvtColor(make_phantom(77, size=(240, 320)).image, cv2.COLOR_RGB2GRAY)
    buf = _io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    assert c.put("/datastore/image?image=redfree", files={"file": ("redfree.png", buf.getvalue())}).status_code == 200
    try:
        summary = c.post("/scoring/lesion_uncertainty?run_sync=true").json()
        assert summary["executed"] == 1 and summary["failed"] == 1
        s = _stored(ds, "redfree", "lesion_uncertainty")
        assert s["status"] == 422 and "colour" in s["error"] and "score" not in s
        assert c.post("/scoring/lesion_uncertainty?run_sync=true").json()["executed"] == 0   # not retried
        res = c.post("/activelearning/lesion_uncertainty").json()
        assert res["id"] != "redfree" and res["id"] in _unlabelled(ds)
    finally:
        assert c.delete("/datastore/image?id=redfree").status_code == 200
