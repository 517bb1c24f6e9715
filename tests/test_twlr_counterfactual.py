"""Lesion-removed counterfactuals (fundus/counterfactual.py) and training TWLR's grader from a lesion dataset."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import torch

from monailabel_dr.fundus.counterfactual import CounterfactualSettings, RandLesionRemovald, grade_proxy
from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.fundus.phantoms import make_phantom


def test_grade_proxy_follows_the_icdr_lesion_rules():
    assert grade_proxy({}) == 0
    assert grade_proxy({"MA": True}) == 1
    assert grade_proxy({"MA": True, "HE": True}) == 2
    assert grade_proxy({"MA": False, "SE": True}) == 2
    assert grade_proxy({"EX": True}) == 2


def _sample(seed=5, grade=3):
    ph = make_phantom(seed, size=(240, 320), grade=grade)
    img = torch.from_numpy(ph.image.transpose(2, 0, 1).astype(np.float32) / 255)
    les = np.stack([ph.masks[k].astype(np.float32) for k in LESIONS] + [ph.fov.astype(np.float32)])
    return ph, {"image": img, "lesions": torch.from_numpy(les)}


def _run(settings, data, seed=0):
    t = RandLesionRemovald(settings=settings)
    t.set_random_state(seed)
    return t(dict(data))


NOTHING = {"clear_prob": 0, "remove_prob": 0, "partial_prob": 0, "decoy_prob": 0}


def test_nothing_removed_keeps_the_image_and_the_true_presence():
    ph, data = _sample()
    out = _run(NOTHING, data)
    assert "lesions" not in out
    assert torch.allclose(out["image"], data["image"], atol=1 / 255)
    present = [1.0 if ph.masks[k].any() else 0.0 for k in LESIONS]
    assert out["label"].tolist()[2:] == present
    assert out["label"][0] == grade_proxy({k: bool(ph.masks[k].any()) for k in LESIONS})


def test_clearing_every_lesion_gives_a_grade_0_target_and_changes_only_lesion_pixels():
    ph, data = _sample()
    out = _run({**NOTHING, "clear_prob": 1.0, "dilation": 2}, data)
    assert out["label"].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    changed = (out["image"] - data["image"]).abs().amax(0).numpy() > 1.5 / 255
    lesion = np.any([ph.masks[k] for k in LESIONS], axis=0).astype(np.uint8)
    near = cv2.dilate(lesion, np.ones((7, 7), np.uint8)) > 0
    assert changed.any() and not (changed & ~near).any()
    # the lesions are gone: inside them the image moved towards the lesion-free twin
    healthy = torch.from_numpy(ph.healthy.transpose(2, 0, 1).astype(np.float32) / 255)
    m = torch.from_numpy(lesion > 0)
    before = (data["image"] - healthy).abs()[:, m].mean()
    after = (out["image"] - healthy).abs()[:, m].mean()
    assert after < 0.6 * before


def test_removing_one_type_updates_its_presence_and_the_grade():
    _, data = _sample()
    cov = data["lesions"][:-1]
    present = [i for i in range(len(LESIONS)) if cov[i].sum() >= 1]
    seen = set()
    for seed in range(12):
        out = _run({**NOTHING, "remove_prob": 0.5}, data, seed=seed)
        lab = out["label"].tolist()
        flags = {k: bool(lab[2 + i]) for i, k in enumerate(LESIONS)}
        assert lab[0] == grade_proxy(flags)
        assert all(not lab[2 + i] for i in range(len(LESIONS)) if i not in present)   # nothing appears
        seen.add(tuple(lab[2:]))
    assert len(seen) > 2      # different types are removed on different draws


def test_decoys_inpaint_healthy_retina_only_and_keep_the_target():
    ph, data = _sample()
    base = _run(NOTHING, data)["label"]
    out = _run({**NOTHING, "decoy_prob": 1.0, "decoy_area": [0.01, 0.02]}, data)
    assert torch.equal(out["label"], base)
    changed = (out["image"] - data["image"]).abs().amax(0).numpy() > 1.5 / 255
    lesion = np.any([ph.masks[k] for k in LESIONS], axis=0)
    assert changed.sum() > 50 and not (changed & lesion).any() and not (changed & ~ph.fov).any()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown"):
        CounterfactualSettings.from_dict({"clear": 1})
    with pytest.raises(ValueError, match="remove_prob"):
        CounterfactualSettings.from_dict({"remove_prob": 2})


def test_twlr_trains_from_an_idrid_layout_folder(tmp_path, caplog):
    """`monailabel-dr train twlr --dataset idrid:<folder>`: counterfactual training, the folder's split."""
    from monailabel_dr import cli

    from conftest import write_idrid_phantoms

    # PH_05 and PH_10 validate
    folder = write_idrid_phantoms(tmp_path / "idrid", [make_phantom(100 + i, size=(240, 320), grade=2 + i % 2)
                                                       for i in range(1, 11)])
    model_dir = tmp_path / "model"
    conf = ["--conf", "models", "twlr", "--conf", "profile", "tiny", "--conf", "model_dir", str(model_dir)]
    import contextlib
    import io
    import logging

    caplog.set_level(logging.INFO)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["train", "twlr", "--dataset", f"idrid:{folder}", "--epochs", "2",
                         "--params", json.dumps({"val_variants": 3}), *conf]) == 0
    text = buf.getvalue()   # (log lines, depending on logging set-up), then the stats as indented JSON
    stats = json.loads(text[re.search(r"^\{$", text, re.M).start():])
    assert "Records for Training: 8" in caplog.text and "Records for Validation: 6" in caplog.text   # 2 images x 3 counterfactuals
    assert "val_grade_lesion" in stats["eval"]["metrics"]
    assert (model_dir / "twlr.pt").is_file()

    with pytest.raises(Exception, match="idrid:<folder>"):
        cli.main(["train", "twlr", "--dataset", f"kaggle:{folder}", *conf])
