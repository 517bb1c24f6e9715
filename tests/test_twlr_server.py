"""TWLR (stage 1 grader, stage 2 severity regression) through the in-process server on phantoms."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from requests_toolbelt.multipart.decoder import MultipartDecoder

from conftest import serve_in_process, tiny_conf
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.fundus.phantoms import make_phantom


def _parts(r):
    parts = {p.headers[b"Content-Disposition"].decode(): p.content
             for p in MultipartDecoder(r.content, r.headers["content-type"]).parts}
    params = json.loads(next(v for k, v in parts.items() if 'name="params"' in k))
    body = next((v for k, v in parts.items() if 'name="image"' in k), None)
    return body, params


@pytest.fixture(scope="module")
def twlr_server(tmp_path_factory):
    from conftest import write_phantom_store

    base = tmp_path_factory.mktemp("twlr")
    store = write_phantom_store(base / "store", n=40, labelled=36, seed=3)
    with serve_in_process(store, tiny_conf(base / "model", models="twlr")) as c:
        assert c.post("/infer/twlr_inpaint?image=fundus_0000").status_code == 409   # untrained: never random weights
        r = c.post("/train/twlr?run_sync=true", json={"max_epochs": 30})
        assert r.status_code == 200, r.text
        yield c, store, r.json(), base / "model"


def test_vlm_grades_and_saliency_maps(twlr_server, tmp_path):
    client, _, stats, _ = twlr_server
    assert "val_kappa" in stats["eval"]["metrics"]
    r = client.post("/infer/twlr_vlm?image=fundus_0001&output=all",
                    data={"params": json.dumps({"saliency": "patch_text", "result_extension": ".nrrd"})})
    assert r.status_code == 200, r.text
    body, params = _parts(r)
    assert len(params["grade_probabilities"]) == 5 and set(params["lesion_presence"]) == set(LESIONS)
    assert params["saliency"]["channels"] == list(LESIONS)
    import nrrd

    out = tmp_path / "sal.nrrd"
    out.write_bytes(body)
    maps, _ = nrrd.read(str(out))
    assert maps.size == 4 * 240 * 320 and maps.min() >= 0 and maps.max() <= 1 + 1e-5
    r = client.post("/infer/twlr_vlm?image=fundus_0001", data={"params": json.dumps({"saliency": "gradcam"})})
    assert r.status_code == 200, r.text
    r = client.post("/infer/twlr_vlm?image=fundus_0001", data={"params": json.dumps({"saliency": "lime"})})
    assert r.status_code == 422, r.text   # BadInput


def _phantom_image(tmp_path, seed: int, grade: int):
    ph = make_phantom(seed, size=(240, 320), grade=grade)
    path = tmp_path / f"ph_{seed}.png"
    fio.write_image(path, ph.image)
    return ph, path


def test_inpaint_sequence_grade_never_rises_stops_by_a_rule_and_beats_random_masks(twlr_server, tmp_path):
    """The loop's contract through /infer on grade-3 phantoms, and the weak masks' overlap with the true
    lesions against a random mask of the same area in the field of view (pooled over the phantoms)."""
    client, *_ = twlr_server
    tp = area = 0
    expected_random_tp = 0.0
    for seed in (7001, 7002, 7003):
        ph, path = _phantom_image(tmp_path, seed, grade=3)
        with open(path, "rb") as f:
            r = client.post("/infer/twlr_inpaint?output=all", files={"file": ("ph.png", f, "image/png")},
                            data={"params": json.dumps({"t_max": 4, "result_extension": ".png"})})
        assert r.status_code == 200, r.text
        body, res = _parts(r)
        grades = res["grades"]
        assert all(b <= a for a, b in zip(grades, grades[1:])), grades
        assert res["stop_reason"] in ("healthy", "no_lesion_above_tau", "tiny_region", "no_grade_drop", "t_max",
                                      "grade_increased")
        assert len(res["trajectory"]) == res["steps"] + 1
        assert res["settings"]["threshold"] == 0.9 and res["settings"]["backend"] == "ns"   # the tiny profile's
        weak = fio.read_label(_save(tmp_path / f"weak_{seed}.png", body))
        assert weak.shape == (240, 320)
        assert {les: int((weak == v).sum()) for les, v in res["label_values"].items()} == res["weak_mask_area_px"]
        lesion = np.any([ph.masks[les] for les in LESIONS], axis=0) & ph.fov
        removed = (weak > 0) & ph.fov
        tp += int((removed & lesion).sum())
        area += int(removed.sum())
        expected_random_tp += removed.sum() * lesion.sum() / ph.fov.sum()
    assert area > 0
    # 1.94x measured here (752 true-lesion pixels of 11988 removed, 387 expected at random); 1.3x leaves
    # room for platform differences in the seeded training while still failing for a random mask
    assert tp > 1.3 * expected_random_tp, (tp, expected_random_tp, area)


def _save(path, body):
    path.write_bytes(body)
    return path


def test_inpaint_outputs_and_bad_settings(twlr_server, tmp_path):
    client, *_ = twlr_server
    base = {"tau": 0.05, "t_max": 2}
    r = client.post("/infer/twlr_inpaint?image=fundus_0002&output=all",
                    data={"params": json.dumps({**base, "output": "image", "backend": "telea"})})
    assert r.status_code == 200, r.text
    body, res = _parts(r)
    img = fio.read_image(_save(tmp_path / "final.png", body))
    assert img.shape == (240, 320, 3)
    r = client.post("/infer/twlr_inpaint?image=fundus_0002&output=all",
                    data={"params": json.dumps({**base, "output": "sequence", "result_extension": ".tif"})})
    assert r.status_code == 200, r.text
    body, res = _parts(r)
    ok, frames = cv2.imreadmulti(str(_save(tmp_path / "seq.tif", body)))
    assert ok and len(frames) == res["steps"] + 1
    for bad in ({"tau": 2}, {"backend": "lama"}, {"output": "movie"}, {"t_max": 0}, {"dilation": -1},
                {"output": "sequence", "result_extension": ".png"}, {"backend": "unet"}):
        r = client.post("/infer/twlr_inpaint?image=fundus_0002", data={"params": json.dumps({**base, **bad})})
        assert r.status_code in (400, 409, 422), (bad, r.status_code, r.text)


def test_evaluate_twlr_inpaint_on_phantoms_and_on_an_idrid_layout_folder(twlr_server, tmp_path):
    """`monailabel-dr evaluate twlr_inpaint`: against the lesion-free twins of phantoms, and as a lesion
    model (weak masks ranked by removal step) on a folder in the IDRiD layout."""
    from monailabel_dr import cli

    *_, model_dir = twlr_server
    conf = ["--conf", "profile", "tiny", "--conf", "model_dir", str(model_dir)]
    params = ["--params", json.dumps({"tau": 0.05, "t_max": 2})]
    out = tmp_path / "phantoms.json"
    assert cli.main(["evaluate", "twlr_inpaint", "--phantoms", "4", "--size", "240x320", "--min-grade", "1",
                     "--json", str(out), *conf, *params]) == 0
    rep = json.loads(out.read_text())
    rows = rep["per_image"]
    assert rep["summary"]["n"] == len(rows) == rep["summary"]["n_lesioned"] >= 1
    for r in rows:
        assert r["true_grade"] >= 1 and r["grade_drop"] == r["grades"][0] - r["grades"][-1] >= 0
        assert all(b <= a for a, b in zip(r["grades"], r["grades"][1:]))
        assert r["psnr_fov_input"] > 0 and 0 < r["ssim_fov_input"] <= 1
        if r["removed_fraction_of_fov"] > 0:     # the input differs from its twin inside what was removed
            assert r["psnr_removed_input"] is not None and r["psnr_removed_final"] is not None
    wm = rep["weak_masks"]
    assert set(wm) == {*LESIONS, "any"} and wm["any"]["truth_area_px"] > 0
    assert wm["any"]["random_dice"] is not None
    assert rep["params"] == {"tau": 0.05, "t_max": 2}

    from conftest import write_idrid_phantoms

    folder = write_idrid_phantoms(tmp_path / "idrid", [make_phantom(seed, size=(240, 320), grade=3) for seed in (11, 12)])
    out = tmp_path / "idrid.json"
    assert cli.main(["evaluate", "twlr_inpaint", "--dataset", f"idrid:{folder}", "--n-boot", "20", "--json", str(out),
                     *conf, *params]) == 0
    rep = json.loads(out.read_text())
    assert rep["images"] == ["PH_01", "PH_02"] and rep["model"]["name"] == "twlr"
    seg = rep["segmentation"]
    assert seg["n_images"] == 2 and seg["threshold"] == 0.5
    ex = seg["EX"]     # grade-3 phantoms have exudates; pooled counts: weak-mask pixels are score > 0.5
    assert ex["n_pos_pixels"] > 0 and ex["tp"] + ex["fn"] == ex["n_pos_pixels"]
    assert 0 <= ex["dice_pooled"] <= 1 and 0 <= ex["auc_pr"] <= 1
