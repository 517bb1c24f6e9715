"""The app through MONAI Label's real FastAPI server, in-process (TestClient)."""

from __future__ import annotations

import io as _io
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from monailabel_dr.demo import read_truth
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.lesions import GRADES, LESIONS
from monailabel_dr.fundus.phantoms import make_phantom


def _png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpg_bytes(arr: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR))
    assert ok
    return enc.tobytes()


def _snapshot(store) -> dict:
    """Every file under the datastore with its size and mtime (to prove nothing changed)."""
    out = {}
    for root, _, files in os.walk(store):
        for f in files:
            if f == ".lock":
                continue
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, store)] = (st.st_size, st.st_mtime_ns)
    return out


def _train(client, epochs=2):
    r = client.post("/train/grading?run_sync=true", json={"max_epochs": epochs})
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------- info / untrained
def test_info_lists_models_and_untrained_state(client):
    info = client.get("/info/").json()
    assert {"grading", "cam"} <= set(info["models"])
    assert info["models"]["grading"]["type"] == "classification"
    assert info["models"]["cam"]["type"] == "segmentation"
    # CAM levels are label names Slicer shows
    assert set(info["models"]["cam"]["labels"].values()) == {1, 2, 3, 4}
    assert "grading" in info["trainers"]
    for m in ("grading", "cam"):
        state = info["model_state"][m]
        assert state["trained"] is False
        assert "train" in state["how_to_train"]


@pytest.mark.parametrize("model", ["grading", "cam"])
def test_untrained_model_answers_409_with_instructions(client, model):
    r = client.post(f"/infer/{model}?image=fundus_0001")
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert "no trained weights" in detail and "/train/grading" in detail and "grading_checkpoint" in detail


# ----------------------------------------------------------------------------- bad input
def test_bad_uploads_are_refused_and_change_nothing(client, phantom_store, tmp_path):
    before = _snapshot(phantom_store)
    n_before = len(client.get("/datastore/?output=all").json()["objects"])
    flat = np.full((300, 400, 3), 128, np.uint8)
    huge = Image.new("1", (8000, 6000))  # 1-bit png: a small file with a 48 MP header
    buf = _io.BytesIO()
    huge.save(buf, format="PNG")
    cases = {
        "corrupt.jpg": (b"\xff\xd8\xff\xe0" + os.urandom(2000), {415, 422}),
        "notes.txt": (b"hello, not an image", {415}),
        "fake.png": (b"this is text pretending to be a png", {422}),
        "tiny.png": (_png_bytes(np.zeros((1, 1, 3), np.uint8)), {422}),
        "huge.png": (buf.getvalue(), {422}),
        "flatgrey.png": (_png_bytes(flat), {422}),
    }
    for name, (data, codes) in cases.items():
        r = client.put("/datastore/image", files={"file": (name, data)})
        assert r.status_code in codes, (name, r.status_code, r.text)
        assert r.json()["detail"], name
    # path traversal in the id
    good = _jpg_bytes(make_phantom(5, size=(240, 320)).image)
    for bad_id in ("../evil", "..", "a/b", "/etc/passwd", ".hidden"):
        r = client.put(f"/datastore/image?image={bad_id}", files={"file": ("x.jpg", good)})
        assert r.status_code == 400, (bad_id, r.text)
    # an existing id is not overwritten
    r = client.put("/datastore/image?image=fundus_0001", files={"file": ("x.jpg", good)})
    assert r.status_code == 409
    assert _snapshot(phantom_store) == before
    assert len(client.get("/datastore/?output=all").json()["objects"]) == n_before
    assert not (phantom_store.parent / "evil.jpg").exists()
    assert client.get("/info/").status_code == 200  # still serving


def test_bad_labels_are_refused_and_change_nothing(client, phantom_store):
    before = _snapshot(phantom_store)
    img = fio.read_image(phantom_store / "fundus_0002.jpg")
    wrong_size = np.zeros((img.shape[0] // 2, img.shape[1]), np.uint8)
    bad_values = np.full(img.shape[:2], 9, np.uint8)
    cases = [
        ("fundus_0002", "g.json", b"{not json", 422),
        ("fundus_0002", "g.json", json.dumps({"grade": 7}).encode(), 422),
        ("fundus_0002", "g.json", json.dumps({"grade": 1, "lesions": {"XX": True}}).encode(), 422),
        ("fundus_0002", "l.png", _png_bytes(wrong_size), 422),
        ("fundus_0002", "l.png", _png_bytes(bad_values), 422),
        ("fundus_0002", "l.jpg", _jpg_bytes(np.zeros((*img.shape[:2], 3), np.uint8)), 415),
        ("no_such_image", "g.json", json.dumps({"grade": 1}).encode(), 404),
        ("../fundus_0002", "g.json", json.dumps({"grade": 1}).encode(), 400),
    ]
    for image, fname, data, code in cases:
        r = client.put(f"/datastore/label?image={image}&tag=final", files={"label": (fname, data)})
        assert r.status_code == code, (image, fname, r.status_code, r.text)
    assert _snapshot(phantom_store) == before


def test_bad_requests_to_infer_and_train(client):
    assert client.post("/infer/no_such_model?image=fundus_0001").status_code == 404
    assert client.post("/infer/grading?image=../../etc/passwd").status_code == 400
    assert client.post("/infer/grading?image=/etc/passwd").status_code == 400
    assert client.post("/infer/grading?image=not_there").status_code == 404
    assert client.post("/train/no_such_model?run_sync=true").status_code == 404
    assert client.post("/train/no_such_model").status_code == 404
    assert client.post("/activelearning/no_such_strategy").status_code == 404
    assert client.get("/info/").status_code == 200


# ----------------------------------------------------------------------------- train + infer
def test_save_grade_label_train_and_infer(client, phantom_store):
    # a new image uploaded and graded through the API
    ph = make_phantom(4242, size=(260, 350), grade=3)
    r = client.put("/datastore/image?image=new_eye", files={"file": ("new_eye.png", _png_bytes(ph.image))})
    assert r.status_code == 200, r.text
    label = {"grade": 3, "lesions": ph.lesion_presence()}
    r = client.put("/datastore/label?image=new_eye&tag=final",
                   files={"label": ("new_eye.json", json.dumps(label).encode())})
    assert r.status_code == 200, r.text
    assert (phantom_store / "labels" / "final" / "new_eye.grade.json").exists()

    stats = _train(client, epochs=2)
    assert stats["epoch"] == 2
    assert "train_kappa" in stats["train"]["metrics"] and "train_acc" in stats["train"]["metrics"]
    assert "val_kappa" in stats["eval"]["metrics"] and "val_acc" in stats["eval"]["metrics"]

    info = client.get("/info/").json()
    assert info["model_state"]["grading"]["trained"] is True
    assert info["train_stats"]["grading"]["train"]["metrics"]["train_kappa"] is not None

    r = client.post("/infer/grading?image=new_eye")
    assert r.status_code == 200, r.text
    res = r.json()
    assert len(res["grade_probabilities"]) == len(GRADES)
    assert abs(sum(res["grade_probabilities"]) - 1) < 1e-3
    assert res["grade"] == int(np.argmax(res["grade_probabilities"]))
    assert 0 <= res["referable_probability"] <= 1
    assert set(res["lesion_presence"]) == set(LESIONS)
    assert res["image_size"] == [260, 350]
    assert [p["idx"] for p in res["prediction"]] == list(range(5))

    # an uploaded file (not in the datastore) is graded too
    r = client.post("/infer/grading", files={"file": ("x.jpg", _jpg_bytes(ph.image))})
    assert r.status_code == 200, r.text
    assert len(r.json()["grade_probabilities"]) == 5


@pytest.mark.parametrize("ext", [".png", ".nrrd", ".nii.gz"])
def test_cam_label_geometry_and_proposals(client, phantom_store, ext, tmp_path):
    _train(client, epochs=1)
    r = client.post("/infer/cam?image=fundus_0003&output=all", data={"params": json.dumps({"result_extension": ext})})
    assert r.status_code == 200, r.text
    # multipart: params JSON + label file
    ctype = r.headers["content-type"]
    assert ctype.startswith("multipart/")
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    parts = {p.headers[b"Content-Disposition"].decode(): p.content for p in MultipartDecoder(r.content, ctype).parts}
    params = json.loads(next(v for k, v in parts.items() if 'name="params"' in k))
    label_bytes = next(v for k, v in parts.items() if 'name="image"' in k)
    out = tmp_path / f"cam{ext}"
    out.write_bytes(label_bytes)
    lab = fio.read_label(out)
    img = fio.read_image(phantom_store / "fundus_0003.jpg")
    assert lab.shape == img.shape[:2]  # input geometry
    assert set(np.unique(lab)) <= {0, 1, 2, 3, 4}
    assert params["threshold"] == 0.65
    assert params["image_size"] == list(img.shape[:2])
    from scipy import ndimage

    from monailabel_dr.fundus.geometry import detect_fov

    outside = ~ndimage.binary_dilation(detect_fov(fio.to_rgb_float(img)), iterations=2)  # 2 px for interpolation
    assert lab[outside].max() == 0  # nothing outside the field of view
    for reg in params["regions"]:
        x0, y0, x1, y1 = reg["bbox"]
        assert 0 <= x0 < x1 <= img.shape[1] and 0 <= y0 < y1 <= img.shape[0]
        assert 0.65 <= reg["score"] <= 1.0
        assert (lab[y0:y1, x0:x1] >= 3).any()  # regions are where the map is >= 0.65
    scores = [reg["score"] for reg in params["regions"]]
    assert scores == sorted(scores, reverse=True)


def test_cam_targets_and_gradcam(client):
    _train(client, epochs=1)
    for target in ("referable", "predicted", "2", "MA"):
        r = client.post("/infer/cam?image=fundus_0004&output=json", data={"params": json.dumps({"target": target})})
        assert r.status_code == 200, (target, r.text)
    r = client.post("/infer/cam?image=fundus_0004&output=json", data={"params": json.dumps({"method": "gradcam"})})
    assert r.status_code == 200, r.text
    assert r.json()["method"] == "gradcam"
    r = client.post("/infer/cam?image=fundus_0004&output=json", data={"params": json.dumps({"target": "nonsense"})})
    assert r.status_code == 422
    r = client.post("/infer/cam?image=fundus_0004&output=json", data={"params": json.dumps({"result_extension": ".jpg"})})
    assert r.status_code == 422


def test_grey_images_are_accepted_but_not_graded(client):
    ph = make_phantom(77, size=(240, 320))
    grey = cv2.cvtColor(ph.image, cv2.COLOR_RGB2GRAY)
    r = client.put("/datastore/image?image=redfree", files={"file": ("redfree.png", _png_bytes(grey))})
    assert r.status_code == 200, r.text
    _train(client, epochs=1)
    r = client.post("/infer/grading?image=redfree")
    assert r.status_code == 422
    assert "colour" in r.json()["detail"]
    # file names as reading centres have them (spaces, parentheses) are valid ids
    r = client.put("/datastore/image", files={"file": ("left eye (2).jpg", _jpg_bytes(ph.image))})
    assert r.status_code == 200, r.text
    assert r.json()["image"] == "left eye (2)"
    r = client.post("/infer/grading", params={"image": "left eye (2)"})
    assert r.status_code == 200, r.text
    # unusable files sent straight to /infer are 422 too, and the server keeps serving
    r = client.post("/infer/grading", files={"file": ("bad.jpg", b"\xff\xd8garbage")})
    assert r.status_code == 422, r.text
    assert client.get("/info/").status_code == 200


def test_demo_truth_matches_labels(phantom_store):
    truth = read_truth(str(phantom_store))
    labelled = [k for k, v in truth.items() if v["labelled"]]
    assert len(labelled) == 40
    for k in labelled[:5]:
        g = json.loads((phantom_store / "labels" / "final" / f"{k}.grade.json").read_text())
        assert g["grade"] == truth[k]["grade"]


def _published_weights(client, tmp_path, name):
    import torch

    src = tmp_path / "model" / "grading.pt"
    dst = tmp_path / f"{name}.pt"
    dst.write_bytes(src.read_bytes())
    state = torch.load(dst, map_location="cpu", weights_only=True)
    return state.get("model", state)


def test_training_is_reproducible_with_a_seed(client, tmp_path):
    """Same seed, from scratch, twice: identical published weights; another seed: different."""
    def run(seed):
        r = client.post("/train/grading?run_sync=true",
                        json={"max_epochs": 1, "seed": seed, "pretrained": False, "name": f"seed_{seed}_{run.n}"})
        assert r.status_code == 200, r.text
        run.n += 1
        return _published_weights(client, tmp_path, f"s{seed}_{run.n}")
    run.n = 0

    a, b, c = run(11), run(11), run(12)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert any(not np.array_equal(a[k].numpy(), c[k].numpy()) for k in a if a[k].is_floating_point())
