"""The app behind a real `monailabel start_server` process on a loopback port.

Exercises what the demo and a REST client do: upload an image, save a grade
label, train (in MONAI Label's background subprocess, as the demo does, and
synchronously), then grade and CAM over HTTP, and check the grader beats chance
on held-out phantoms.
"""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest
import requests

from conftest import write_phantom_store
from monailabel_dr.demo import read_truth
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.phantoms import make_phantom
from monailabel_dr.metrics.grading import quadratic_weighted_kappa
from monailabel_dr.serving import running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("http")
    store = write_phantom_store(base / "store", n=100, labelled=80, seed=500, size=(240, 320))
    with running_server(store, base / "model", conf={"image_size": 128}, log_path=base / "server.log") as url:
        yield url, store, base


def _jpg(arr) -> bytes:
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return enc.tobytes()


def test_http_end_to_end(server, tmp_path):
    url, store, base = server
    info = requests.get(f"{url}/info/").json()
    assert info["model_state"]["grading"]["trained"] is False
    assert requests.post(f"{url}/infer/grading?image=fundus_0001").status_code == 409

    # upload + grade label over HTTP
    ph = make_phantom(90001, size=(300, 380), grade=4)
    r = requests.put(f"{url}/datastore/image?image=uploaded_eye", files={"file": ("uploaded_eye.jpg", _jpg(ph.image))})
    assert r.status_code == 200, r.text
    r = requests.put(f"{url}/datastore/label?image=uploaded_eye&tag=final",
                     files={"label": ("g.json", json.dumps({"grade": 4}).encode())})
    assert r.status_code == 200, r.text

    # background training, as the demo starts it: MONAI Label's subprocess rebuilds the app from env
    r = requests.post(f"{url}/train/grading", json={"max_epochs": 25})
    assert r.status_code == 200, r.text
    deadline = time.time() + 420
    status = {}
    while time.time() < deadline:
        status = requests.get(f"{url}/train/").json()
        if status.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2)
    assert status.get("status") == "DONE", status
    info = requests.get(f"{url}/info/").json()
    assert info["model_state"]["grading"]["trained"] is True
    assert info["train_stats"]["grading"]["epoch"] == 25

    # grading of the uploaded image
    r = requests.post(f"{url}/infer/grading?image=uploaded_eye")
    assert r.status_code == 200, r.text
    assert len(r.json()["grade_probabilities"]) == 5
    assert r.json()["image_size"] == [300, 380]

    # CAM as Slicer asks for it: .nrrd at the input geometry, names in /info
    r = requests.post(f"{url}/infer/cam?image=uploaded_eye&output=image",
                      data={"params": json.dumps({"result_extension": ".nrrd"})})
    assert r.status_code == 200, r.text
    out = tmp_path / "cam.nrrd"
    out.write_bytes(r.content)
    lab = fio.read_label(out)
    assert lab.shape == (300, 380)
    import nrrd

    header = nrrd.read_header(str(out))
    assert list(header["sizes"]) == [380, 300, 1]
    names = {header[f"Segment{k}_Name"] for k in range(4)}
    assert names == set(info["models"]["cam"]["labels"])

    # beat chance on held-out images: the 20 unlabelled demo images + 20 fresh phantoms
    truth = read_truth(str(store))
    y_true, y_pred = [], []
    for image_id, t in sorted(truth.items()):
        if t["labelled"]:
            continue
        res = requests.post(f"{url}/infer/grading?image={image_id}").json()
        y_true.append(t["grade"])
        y_pred.append(res["grade"])
    for i in range(20):
        ph = make_phantom(700_000 + i, size=(240, 320))
        res = requests.post(f"{url}/infer/grading", files={"file": ("p.jpg", _jpg(ph.image))}).json()
        y_true.append(ph.grade)
        y_pred.append(res["grade"])
    kappa = quadratic_weighted_kappa(np.array(y_true), np.array(y_pred))
    acc = float(np.mean(np.array(y_true) == np.array(y_pred)))
    # chance: kappa ~ 0, accuracy ~ 0.2 for the uniform phantom grades
    assert kappa > 0.3, (kappa, acc, y_true, y_pred)

    # the server survived everything above
    assert requests.get(f"{url}/info/").status_code == 200
