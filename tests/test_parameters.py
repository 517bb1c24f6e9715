"""Every request parameter of every infer task and trainer is checked: a bad value is a 4xx that names the
parameter, never a 5xx, and changes nothing (issue 17). One table drives it; the infer tasks' own
declarations (/info ``parameters``) are the source of the cases, so a parameter added to a task is tested."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import serve_in_process, tiny_conf

BAD_NUMBERS = ["abc", "nan", "inf", "-inf", 1e12, -1e12, [1], {"x": 1}, True]
BAD_CHOICES = ["no_such_value", 12345, ["label"]]
BAD_BOOLEANS = ["maybe", 7, [True]]


def _snapshot(store: Path) -> dict:
    return {str(p.relative_to(store)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file() and p.name != ".lock"}


def _write_checkpoints(app) -> None:
    """Untrained weights of every served model saved as its checkpoint, only so that requests reach the
    checks that run after the model is loaded (points, boxes, prompts)."""
    from monailabel_dr.networks.tp_drseg import build_tp_drseg
    from monailabel_dr.networks.twlr import build_twlr_grader

    torch.manual_seed(0)
    for name, task in app._infers.items():
        m = task.model
        if Path(m.published_path).is_file():
            continue
        if name == "lesion_sam":
            net = build_tp_drseg(m.network, image_size=m.image_size)
            torch.save({"model": net.trainable_state_dict(), "weights_source": net.weights_source()}, m.published_path)
        elif m.name == "twlr":
            torch.save({"model": build_twlr_grader(m.network, image_size=m.image_size).state_dict()}, m.published_path)
        else:
            torch.save({"model": task.network.state_dict()}, m.published_path)


def _cases(info: dict) -> list[tuple[str, dict, str]]:
    """(model, params, the parameter the answer must name) for every declared parameter of every task."""
    cases = []
    for model, meta in info["models"].items():
        declared = meta.get("parameters") or {}
        for name, accepted in declared.items():
            if accepted.startswith(("a finite number", "an integer")):
                bad = BAD_NUMBERS + (["1.5"] if accepted.startswith("an integer") else [])
            elif accepted.startswith("one of"):
                bad = BAD_CHOICES
            elif accepted.startswith("true or false"):
                bad = BAD_BOOLEANS
            else:
                continue   # parsed against the image by the task: see SPECIAL below
            cases += [(model, {name: v}, name) for v in bad]
        cases += [
            (model, {"result_extension": ".jpg"}, "result_extension"),
            (model, {"device": "tpu:7"}, "device"),
            (model, {"result_dtype": "complex128"}, "result_dtype"),
            (model, {"save_label": "perhaps"}, "save_label"),
        ]
        typo = next(iter(declared), None)
        if typo:   # a near miss of a declared parameter would silently run with the default
            cases.append((model, {typo[:-1] + ("x" if typo[-1] != "x" else "y"): 1}, "did you mean"))
    return cases


SPECIAL = [   # the task-parsed parameters (lib/infers/lesion_sam.py)
    ("lesion_sam", {"lesion": "drusen"}, "lesion"),
    ("lesion_sam", {"lesion": 5}, "lesion"),
    ("lesion_sam", {"text": 42}, "text"),
    ("lesion_sam", {"text": ["x" * 5000]}, "text prompt"),
    ("lesion_sam", {"foreground": "here"}, "foreground"),
    ("lesion_sam", {"foreground": [[1e9, 1e9]]}, "foreground"),
    ("lesion_sam", {"foreground": [["nan", 2]]}, "foreground"),
    ("lesion_sam", {"background": [[1, 2, 3, 4]]}, "background"),
    ("lesion_sam", {"roi": [10, 10, 5, 5]}, "roi"),
    ("lesion_sam", {"roi": "box"}, "roi"),
    ("lesion_sam", {"roi": [0, 0, "inf", 9]}, "roi"),
    ("cam", {"target": "MAX"}, "target"),
    ("twlr_inpaint", {"tau": 0}, "tau"),
    ("twlr_inpaint", {"dilation": "inf"}, "dilation"),
]

TRAIN_CASES = [
    ({"max_epochs": -1}, "max_epochs"), ({"max_epochs": 0}, "max_epochs"), ({"max_epochs": 10**9}, "max_epochs"),
    ({"max_epochs": "ten"}, "max_epochs"), ({"max_epochs": 2.5}, "max_epochs"), ({"max_epochs": "nan"}, "max_epochs"),
    ({"learning_rate": 0}, "learning_rate"), ({"learning_rate": "inf"}, "learning_rate"),
    ({"train_batch_size": 0}, "train_batch_size"), ({"val_split": 1.0}, "val_split"), ({"seed": "x"}, "seed"),
    ({"pretrained": "perhaps"}, "pretrained"), ({"name": "../../etc"}, "name"), ({"max_epoch": 3}, "did you mean"),
    ({"learning_rat": 0.1}, "did you mean"), ({"dataset": "NoSuchDataset"}, "dataset"), ({"device": "tpu"}, "device"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from conftest import write_phantom_store
    from monailabel.interfaces.utils.app import app_instance

    base = tmp_path_factory.mktemp("params")
    store = write_phantom_store(base / "store", n=6, labelled=4, seed=3)
    with serve_in_process(store, tiny_conf(base / "model")) as client:
        _write_checkpoints(app_instance())
        yield client, store


def _check(r, name: str, what: str):
    assert r.status_code < 500, f"{what}: HTTP {r.status_code}: {r.text[:300]}"
    assert 400 <= r.status_code < 500, f"{what}: accepted ({r.status_code})"
    assert name in r.json()["detail"], f"{what}: answer does not name {name!r}: {r.json()['detail']}"


def test_every_infer_parameter_is_checked(served):
    client, store = served
    info = client.get("/info/").json()
    image = sorted(client.get("/datastore/?output=all").json()["objects"])[0]
    cases = _cases(info) + [c for c in SPECIAL if c[0] in info["models"]]
    assert {c[0] for c in cases} == set(info["models"]), "a served infer task has no parameter case"
    assert len(cases) > 100
    before = _snapshot(store)
    for model, params, name in cases:
        r = client.post(f"/infer/{model}", params={"image": image}, data={"params": json.dumps(params)})
        _check(r, name, f"{model} {params}")
    assert _snapshot(store) == before


def test_twlr_inpaint_declares_every_loop_setting():
    from monailabel_dr.lib.infers.twlr_inpaint import _LOOP_KEYS, TWLRInpaintInfer

    assert set(_LOOP_KEYS) <= set(TWLRInpaintInfer.params)


def test_malformed_requests(served):
    client, store = served
    image = sorted(client.get("/datastore/?output=all").json()["objects"])[0]
    before = _snapshot(store)
    for params, name in [("{not json", "params"), ("[1, 2]", "params"), ('"text"', "params")]:
        _check(client.post("/infer/lesion_seg", params={"image": image}, data={"params": params}), name, params)
        _check(client.put("/datastore/label", params={"image": image}, data={"params": params},
                          files={"label": ("x.json", b'{"grade": 1}')}), name, f"label {params}")
        _check(client.put("/datastore/image/info", params={"image": image}, data={"info": params.replace("params", "info")}),
               "info", f"info {params}")
    _check(client.post("/infer/lesion_seg"), "image", "no image")
    r = client.post("/infer/lesion_seg", params={"image": image, "output": "nonsense"})
    assert 400 <= r.status_code < 500
    assert client.post("/infer/no_such_model", params={"image": image}).status_code == 404
    assert client.post("/activelearning/no_such_strategy").status_code == 404
    assert client.post("/scoring/no_such_method?run_sync=true").status_code == 404
    assert _snapshot(store) == before


@pytest.mark.parametrize("model", ["grading", "lesion_seg"])
def test_every_train_setting_is_checked(served, model):
    client, store = served
    before = _snapshot(store)
    for params, name in TRAIN_CASES:
        for sync in ("true", "false"):   # the background path is checked before a job is started
            r = client.post(f"/train/{model}?run_sync={sync}", json=params)
            _check(r, name, f"train {model} {params} run_sync={sync}")
    assert client.get("/train/").json().get("status") not in ("RUNNING", "SUBMITTED")
    assert _snapshot(store) == before
