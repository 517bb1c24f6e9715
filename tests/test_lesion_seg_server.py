"""lesion_seg through the in-process server: Slicer-style label maps in, Lesion-Net out."""

from __future__ import annotations

import io as _io
import json

import nrrd
import numpy as np
import pytest

from conftest import serve_in_process, tiny_conf
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.landmarks import ANATOMICAL_QUADRANTS
from monailabel_dr.fundus.lesions import LESION_VALUES, LESIONS, label_map_from_masks
from monailabel_dr.fundus.phantoms import make_phantom


def slicer_nrrd(label: np.ndarray) -> bytes:
    """A label map as 3D Slicer saves one: 3-D single slice (W, H, 1), LPS, identity directions."""
    buf = _io.BytesIO()
    header = {"type": "unsigned char", "dimension": 3, "space": "left-posterior-superior",
              "space directions": np.eye(3), "space origin": np.zeros(3), "kinds": ["domain"] * 3, "encoding": "gzip"}
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".nrrd") as f:
        nrrd.write(f.name, label.T[:, :, None].astype(np.uint8), header, index_order="F")
        buf.write(open(f.name, "rb").read())
    return buf.getvalue()


def phantom_label_map(seed: int, size=(240, 320)) -> np.ndarray:
    return label_map_from_masks(make_phantom(seed, size=size).masks)


@pytest.fixture()
def seg_client(phantom_store, tmp_path):
    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", lesion_seg_image_size=128)) as c:
        yield c


def _save(client, image_id, label):
    r = client.put(f"/datastore/label?image={image_id}&tag=final",
                   files={"label": (f"{image_id}.nrrd", slicer_nrrd(label))})
    assert r.status_code == 200, r.text


def _infer_label(client, image_id, tmp_path):
    r = client.post(f"/infer/lesion_seg?image={image_id}&output=all", data={"params": json.dumps({"result_extension": ".nrrd"})})
    assert r.status_code == 200, r.text
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    parts = {p.headers[b"Content-Disposition"].decode(): p.content
             for p in MultipartDecoder(r.content, r.headers["content-type"]).parts}
    params = json.loads(next(v for k, v in parts.items() if 'name="params"' in k))
    out = tmp_path / f"{image_id}_pred.nrrd"
    out.write_bytes(next(v for k, v in parts.items() if 'name="image"' in k))
    return fio.read_label(out), params


def test_lesion_seg_untrained_then_trained_from_slicer_labels(seg_client, phantom_store, tmp_path):
    assert seg_client.post("/infer/lesion_seg?image=fundus_0001").status_code == 409
    info = seg_client.get("/info/").json()
    assert info["models"]["lesion_seg"]["type"] == "segmentation"
    assert info["models"]["lesion_seg"]["labels"] == {les: LESION_VALUES[les] for les in LESIONS}
    for i in range(6):
        _save(seg_client, f"fundus_{i:04d}", phantom_label_map(i))
    stored = fio.read_label(phantom_store / "labels" / "final" / "fundus_0000.nrrd")
    assert np.array_equal(stored, phantom_label_map(0))  # the Slicer nrrd is stored in image orientation
    r = seg_client.post("/train/lesion_seg?run_sync=true", json={"max_epochs": 2})
    assert r.status_code == 200, r.text
    stats = r.json()
    assert "train_mean_dice" in stats["train"]["metrics"]
    assert {f"val_dice_{les}" for les in LESIONS} <= set(stats["eval"]["metrics"])
    lab, params = _infer_label(seg_client, "fundus_0001", tmp_path)
    assert lab.shape == (240, 320) and set(np.unique(lab)) <= {0, 1, 2, 3, 4}
    assert set(params["lesions"]) == set(LESIONS)
    for les in LESIONS:
        s = params["lesions"][les]
        assert 0 <= s["presence_probability"] <= 1
        assert sum(s["components_per_quadrant"].values()) == s["components"]
    assert params["image_size"] == [240, 320]
    # Quadrants around the detected fovea on the disc-fovea axis (phantom 1: right eye layout).
    truth = make_phantom(1, size=(240, 320)).info
    assert params["quadrants"]["names"] == list(ANATOMICAL_QUADRANTS)
    disc, fovea = params["landmarks"]["optic_disc"], params["landmarks"]["fovea"]
    assert np.hypot(*np.subtract(disc, truth["disc_center"])) < 0.5 * truth["disc_diameter"]
    assert np.hypot(*np.subtract(fovea, truth["fovea_center"])) < 0.5 * truth["disc_diameter"]
    assert params["quadrants"]["centre"] == fovea
    # probability maps on request, as a 4-channel nrrd
    r = seg_client.post("/infer/lesion_seg?image=fundus_0001&output=image",
                        data={"params": json.dumps({"output": "probabilities", "result_extension": ".nrrd"})})
    assert r.status_code == 200, r.text
    p = tmp_path / "probs.nrrd"
    p.write_bytes(r.content)
    maps, names = fio.read_multichannel(p)
    assert maps.shape == (4, 240, 320) and names == list(LESIONS)
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1


def test_correction_is_learned(seg_client, tmp_path):
    """Model sees no lesion -> annotator paints one and saves -> retrain (resuming) -> /infer shows it."""
    image_id = "fundus_0005"
    region = np.zeros((240, 320), bool)
    region[60:180, 100:220] = True
    _save(seg_client, image_id, np.zeros((240, 320), np.uint8))
    _save(seg_client, "fundus_0006", np.zeros((240, 320), np.uint8))
    r = seg_client.post("/train/lesion_seg?run_sync=true", json={"max_epochs": 40, "val_split": 0.0, "learning_rate": 0.01,
                                                                          "samples_per_image": 4, "patch_size": 128})
    assert r.status_code == 200, r.text
    before, params_before = _infer_label(seg_client, image_id, tmp_path)
    se_before = float(np.mean(before[region] == LESION_VALUES["SE"]))

    corrected = np.zeros((240, 320), np.uint8)
    corrected[region] = LESION_VALUES["SE"]  # the annotator paints a large cotton-wool region
    _save(seg_client, image_id, corrected)
    r = seg_client.post("/train/lesion_seg?run_sync=true", json={"max_epochs": 80, "val_split": 0.0, "learning_rate": 0.01,
                                                                 "samples_per_image": 4, "patch_size": 128})
    assert r.status_code == 200, r.text
    after, params = _infer_label(seg_client, image_id, tmp_path)
    se = after == LESION_VALUES["SE"]
    se_after = float(np.mean(se[region]))
    # before: the model had learned "no SE on this image"
    assert se_before < 0.1, (params_before["lesions"]["SE"], se_before)
    # after: SE is found, covers a real part of the painted region, and lies mostly inside it
    assert params["lesions"]["SE"]["present"] is True and params["lesions"]["SE"]["presence_probability"] > 0.8
    assert se_after > se_before + 0.15, (se_before, se_after)
    assert se[region].sum() / max(1, se.sum()) > 0.8, (se[region].sum(), se.sum())


def test_lesion_attention_grading_on_a_trained_lesion_seg(phantom_store, tmp_path):
    conf = tiny_conf(tmp_path / "model", grading_profile="tiny_attention")
    with serve_in_process(phantom_store, conf) as c:
        r = c.post("/train/grading?run_sync=true", json={"max_epochs": 1})
        assert r.status_code == 409 and "lesion_seg" in r.json()["detail"]  # needs a trained Lesion-Net first
        for i in range(4):
            _save(c, f"fundus_{i:04d}", phantom_label_map(i))
        assert c.post("/train/lesion_seg?run_sync=true", json={"max_epochs": 1}).status_code == 200
        lesion_before = (tmp_path / "model" / "lesion_seg.pt").read_bytes()
        r = c.post("/train/grading?run_sync=true", json={"max_epochs": 2})
        assert r.status_code == 200, r.text
        # the lesion branch inside the published grader equals the published Lesion-Net (frozen)
        import torch

        def state(path):  # ignite saves a lone object unwrapped; our latest-publisher wraps it in {"model": ...}
            s = torch.load(path, weights_only=True)
            return s.get("model", s)

        grader = state(tmp_path / "model" / "grading.pt")
        lesion = state(tmp_path / "model" / "lesion_seg.pt")
        assert (tmp_path / "model" / "lesion_seg.pt").read_bytes() == lesion_before
        for k, v in lesion.items():
            assert torch.equal(grader[f"lesion_net.{k}"], v), k
        r = c.post("/infer/grading?image=fundus_0010")
        assert r.status_code == 200 and len(r.json()["grade_probabilities"]) == 5
        r = c.post("/infer/cam?image=fundus_0010&output=json")
        assert r.status_code == 200, r.text

        # the grade rationale: lesion_seg's statistics of the same photograph read by the ICDR rule ...
        r = c.post("/infer/grading?image=fundus_0010", data={"params": json.dumps({"rationale": True})})
        assert r.status_code == 200, r.text
        rat = r.json()["rationale"]
        seg = c.post("/infer/lesion_seg?image=fundus_0010&output=json").json()
        from monailabel_dr.networks.lesion_rationale import icdr_rule, rationale_text

        assert rat["icdr_rule_grade"] == icdr_rule(seg["lesions"])[0] and rat["text"] == rationale_text(
            seg["lesions"], seg["quadrants"]["reference"].startswith("fovea"))
        assert "learned_grade" not in rat and rat["learned_model"] is None
        # ... and the learned lesion-statistics model once grade_rationale.json sits beside the grading checkpoint
        from monailabel_dr.networks.lesion_rationale import FEATURE_NAMES, LesionGradeModel

        rng = np.random.default_rng(0)
        LesionGradeModel.fit(rng.normal(size=(40, len(FEATURE_NAMES))), np.arange(40) % 5).save(
            str(tmp_path / "model" / "grade_rationale.json"))
        r = c.post("/infer/grading?image=fundus_0010", data={"params": json.dumps({"rationale": True})})
        assert r.status_code == 200, r.text
        rat = r.json()["rationale"]
        assert 0 <= rat["learned_grade"] <= 4 and abs(sum(rat["learned_grade_probabilities"]) - 1) < 1e-3
        cnn = r.json()["grade_probabilities"]
        assert np.allclose(rat["combined_grade_probabilities"],
                           (np.array(cnn) + np.array(rat["learned_grade_probabilities"])) / 2, atol=2e-4)


@pytest.mark.parametrize("preprocess", ["none", "local_contrast"])
def test_trainer_sees_the_image_the_infer_task_serves(tmp_path, preprocess):
    """The lesion trainer's validation chain and the served pre-transforms give the network the same image,
    with a profile's `preprocess` (local contrast) applied in both: trained on what is served."""
    from monai.transforms import Compose
    from PIL import Image
    from monailabel.tasks.train.basic_train import Context

    from monailabel_dr.config import parse_conf
    from monailabel_dr.lib.infers.lesion_seg import LesionSegInfer
    from monailabel_dr.lib.trainers.lesion_seg import LesionSegTrainer

    ph = make_phantom(7, size=(240, 320))
    img_path, lab_path = tmp_path / "eye.png", tmp_path / "eye_label.png"
    fio.write_image(str(img_path), ph.image)
    Image.fromarray(label_map_from_masks(ph.masks).astype(np.uint8)).save(lab_path)
    conf = tiny_conf(tmp_path / "model", models="lesion_seg", lesion_seg_image_size=96,
                     lesion_seg_set=f"preprocess.method={preprocess}")
    app = parse_conf(conf, str(tmp_path))
    model = app.models["lesion_seg"]
    assert model.options["preprocess"]["method"] == preprocess
    trainer = LesionSegTrainer(model, app)
    ctx = Context()
    ctx.request = {}
    trained = Compose(trainer.val_pre_transforms(ctx))({"image": str(img_path), "label": str(lab_path)})["image"]
    task = LesionSegInfer("lesion_seg", model, app)
    served = Compose(task.pre_transforms({"device": "cpu"}))({"image": str(img_path)})["image"]
    trained, served = np.asarray(trained, np.float32), np.asarray(served, np.float32)
    assert trained.shape == served.shape == (3, 96, 96)
    np.testing.assert_allclose(trained, served, atol=1e-6)
    plain = Compose(LesionSegTrainer(parse_conf(tiny_conf(tmp_path / "m2", models="lesion_seg", lesion_seg_image_size=96),
                                                str(tmp_path)).models["lesion_seg"], app).val_pre_transforms(ctx))(
        {"image": str(img_path), "label": str(lab_path)})["image"]
    # local contrast changes what the network sees (so the equality above is not of two unprocessed images)
    assert (np.abs(np.asarray(plain, np.float32) - trained).max() > 0.1) == (preprocess == "local_contrast")


def test_attention_branch_sees_its_lesion_profiles_preprocessing(tmp_path, monkeypatch):
    """A lesion-attention grader's frozen lesion branch gets the lesion profile's preprocessing (here local
    contrast): its maps equal the served lesion_seg's sigmoid maps of the same photograph, max-pooled."""
    import torch
    import torch.nn.functional as F
    from monai.transforms import Compose

    from monailabel_dr import config
    from monailabel_dr.lib.infers.lesion_seg import LesionSegInfer
    from monailabel_dr.networks.lesion_net import build_lesion_net
    from monailabel_dr.transforms import LESION_MAPS_KEY, lesion_map_transforms

    real = config.ModelSpec.network_profiles

    def with_local_contrast(spec):   # the tiny lesion_seg profile, as if its YAML had `preprocess: local_contrast`
        profiles = real(spec)
        if spec.name == "lesion_seg":
            profiles["profiles"]["tiny"]["preprocess"] = "local_contrast"
        return profiles

    monkeypatch.setattr(config.ModelSpec, "network_profiles", with_local_contrast)
    app = config.parse_conf(tiny_conf(tmp_path / "model", models="grading,lesion_seg", grading_profile="tiny_attention",
                                      grading_image_size=48), str(tmp_path))
    att = app.models["grading"].network["attention"]
    assert att["lesion_preprocess"]["method"] == "local_contrast" and att["lesion_size"] == 96
    lesion = app.models["lesion_seg"]
    assert lesion.options["preprocess"]["method"] == "local_contrast"

    img_path = tmp_path / "eye.png"
    fio.write_image(str(img_path), make_phantom(3, size=(240, 320)).image)
    torch.manual_seed(0)
    net = build_lesion_net(att["lesion"]).eval()
    before, _ = lesion_map_transforms(app.models["grading"].network, lambda: net, 48, app.max_image_pixels,
                                      app.min_image_side)
    maps = Compose(before)({"image": str(img_path)})[LESION_MAPS_KEY]
    served = Compose(LesionSegInfer("lesion_seg", lesion, app).pre_transforms({"device": "cpu"}))({"image": str(img_path)})
    with torch.no_grad():
        p = torch.sigmoid(net(torch.as_tensor(np.asarray(served["image"]))[None])) * torch.as_tensor(
            np.asarray(served["fov"]))[None]
    torch.testing.assert_close(maps, F.adaptive_max_pool2d(p, (48, 48))[0], atol=1e-5, rtol=1e-5)

    # the grader's trainer refuses a lesion checkpoint trained without that preprocessing (409), takes a matching one
    import os

    from monailabel_dr.lib.errors import Conflict
    from monailabel_dr.lib.trainers.grading import GradingTrainer

    trainer = GradingTrainer(app.models["grading"], app)
    os.makedirs(os.path.dirname(att["lesion_checkpoint"]), exist_ok=True)
    torch.save({"model": net.state_dict()}, att["lesion_checkpoint"])
    with pytest.raises(Conflict, match="preprocess"):
        trainer.network(None)
    torch.save({"model": net.state_dict(), "preprocess": {"method": "local_contrast"}}, att["lesion_checkpoint"])
    assert trainer.network(None).lesion_net is not None


def test_bf16_training_through_the_server(phantom_store, tmp_path, monkeypatch):
    """`train.cpu_precision=bf16`: a /train run's forward passes go through the bf16 autocast inferer on a CPU
    with native bf16 (float32 elsewhere), and the published checkpoint is float32 and served."""
    import torch

    from monailabel_dr.lib.trainers import common

    calls = []
    real = common.CPUAutocastInferer.__call__

    def spy(self, inputs, network, *args, **kwargs):
        out = real(self, inputs, network, *args, **kwargs)
        calls.append(out.dtype)
        return out

    monkeypatch.setattr(common.CPUAutocastInferer, "__call__", spy)
    conf = tiny_conf(tmp_path / "model", lesion_seg_image_size=96, lesion_seg_set="train.cpu_precision=bf16")
    with serve_in_process(phantom_store, conf) as c:
        for i in range(3):
            _save(c, f"fundus_{i:04d}", phantom_label_map(i))
        r = c.post("/train/lesion_seg?run_sync=true", json={"max_epochs": 1})
        assert r.status_code == 200, r.text
        assert (len(calls) > 0) == common.native_cpu_bf16() and set(calls) <= {torch.float32}
        ckpt = torch.load(tmp_path / "model" / "lesion_seg.pt", weights_only=True)
        assert ckpt["preprocess"] == {"method": "none"}   # what the weights were trained with
        state = ckpt["model"]
        assert all(v.dtype != torch.bfloat16 for v in state.values())
        assert c.post("/infer/lesion_seg?image=fundus_0005").status_code == 200



@pytest.mark.parametrize("trained_with, served_with, ok", [
    (None, "none", True),                       # a checkpoint from before the record: trained without
    (None, "local_contrast", False),
    ({"method": "none"}, "local_contrast", False),
    ({"method": "local_contrast"}, "none", False),
    ({"method": "local_contrast"}, "local_contrast", True),
])
def test_checkpoint_of_another_preprocessing_is_refused(phantom_store, tmp_path, trained_with, served_with, ok):
    """A lesion checkpoint served under a profile whose preprocessing differs from what it was trained with
    answers 409 naming both (its maps would be meaningless), and nothing else changes; a match is served."""
    import torch

    from monailabel_dr.config import parse_conf
    from monailabel_dr.networks.lesion_net import build_lesion_net

    net_conf = parse_conf(tiny_conf(tmp_path / "x", models="lesion_seg"), str(tmp_path)).models["lesion_seg"].network
    payload = {"model": build_lesion_net(net_conf).state_dict()}
    if trained_with is not None:
        payload["preprocess"] = trained_with
    ckpt = tmp_path / "given.pt"
    torch.save(payload, ckpt)
    before = ckpt.read_bytes()
    conf = tiny_conf(tmp_path / "model", lesion_seg_image_size=96, lesion_seg_checkpoint=str(ckpt),
                     lesion_seg_set=f"preprocess.method={served_with}")
    with serve_in_process(phantom_store, conf) as c:
        r = c.post("/infer/lesion_seg?image=fundus_0001")
        if ok:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 409, r.text
            detail = r.json()["detail"]
            assert "preprocess" in detail and served_with in detail and str(ckpt) in detail
        assert c.get("/info/").status_code == 200
    assert ckpt.read_bytes() == before


def test_ensemble_profile_trains_its_members_and_serves_their_mean(phantom_store, tmp_path):
    """`network.members=2`: /train trains two members one after the other (seeds s and s + 1, each published
    beside the served file), then validates the ensemble on the same validation images and publishes it with
    its own record (per-lesion thresholds, the members); /infer serves it, /info says what it is."""
    import torch

    conf = tiny_conf(tmp_path / "model", lesion_seg_image_size=96, lesion_seg_set="network.members=2")
    with serve_in_process(phantom_store, conf) as c:
        for i in range(4):
            _save(c, f"fundus_{i:04d}", phantom_label_map(i))
        assert c.post("/infer/lesion_seg?image=fundus_0005").status_code == 409   # untrained: no random weights
        r = c.post("/train/lesion_seg?run_sync=true", json={"max_epochs": 1, "seed": 3})
        assert r.status_code == 200, r.text
        members = [torch.load(tmp_path / "model" / f"lesion_seg.member{k}.pt", weights_only=True) for k in (0, 1)]
        served = torch.load(tmp_path / "model" / "lesion_seg.pt", weights_only=True)
        rec = served["validation"]
        assert [m["run"] for m in rec["members"]] == [m["validation"]["run"] for m in members]
        assert rec["n_val"] >= 1 and rec["metric"] == "val_mean_dice" and rec["complete"]
        assert all(0 < rec["metrics"][f"val_threshold_{les}"] < 1 for les in LESIONS)
        # the served weights are the members' (member k under members.k), and the members differ (their seeds)
        for k, m in enumerate(members):
            assert all(torch.equal(served["model"][f"members.{k}.{key}"], v) for key, v in m["model"].items())
        key = next(iter(members[0]["model"]))
        assert not torch.equal(members[0]["model"][key], members[1]["model"][key])
        info = c.get("/info/").json()["models"]["lesion_seg"]["state"]
        assert "ensemble of 2" in info["quality"]
        r = c.post("/infer/lesion_seg?image=fundus_0005&output=json", data={"params": json.dumps({"threshold": "validation"})})
        assert r.status_code == 200, r.text
        thr = r.json()["threshold"]   # one number when every lesion has the same
        thr = thr if isinstance(thr, dict) else dict.fromkeys(LESIONS, thr)
        assert thr == {les: rec["metrics"][f"val_threshold_{les}"] for les in LESIONS}

    # `train --members-from`: the combining step alone, through the CLI. Member 0 twice is an ensemble whose
    # probabilities are member 0's, so its validation (the same code as a run's evaluator, on the same images)
    # must give the figures member 0's own run recorded for its weights
    from monailabel_dr import cli

    m0 = str(tmp_path / "model" / "lesion_seg.member0.pt")
    argv = ["train", "lesion_seg", "--studies", str(phantom_store), *sum((["--conf", k, v] for k, v in conf.items()), [])]
    given = tmp_path / "elsewhere.pt"
    given.write_bytes(open(m0, "rb").read())
    (tmp_path / "model" / "lesion_seg.member1.pt").unlink()
    assert cli.main([*argv, "--members-from", m0, str(given)]) == 0
    # the given members are kept beside the served file, where retraining fine-tunes them
    assert (tmp_path / "model" / "lesion_seg.member1.pt").read_bytes() == given.read_bytes()
    again = torch.load(tmp_path / "model" / "lesion_seg.pt", weights_only=True)["validation"]
    recorded = members[0]["validation"]["metrics"]
    for k in ("val_mean_dice", *(f"val_dice_{les}" for les in LESIONS), *(f"val_threshold_{les}" for les in LESIONS)):
        assert again["metrics"][k] == pytest.approx(recorded[k], abs=2e-3), k
    # a wrong number of members, or a checkpoint that is not one of the profile's single network: refused
    before = (tmp_path / "model" / "lesion_seg.pt").read_bytes()
    for bad in ([m0], [m0, str(tmp_path / "model" / "lesion_seg.pt")], [m0, str(tmp_path / "nothing.pt")]):
        with pytest.raises(SystemExit, match="member|ensemble of 2"):
            cli.main([*argv, "--members-from", *bad])
    assert (tmp_path / "model" / "lesion_seg.pt").read_bytes() == before


@pytest.mark.parametrize("saved_members, served_members", [(1, 2), (2, 1), (2, 3)])
def test_checkpoint_with_another_number_of_networks_is_refused(phantom_store, tmp_path, saved_members, served_members):
    """A single network's checkpoint under an ensemble profile (or an ensemble's under a single-network or other
    ensemble profile) answers 409 saying what the file holds and what the profile serves; the file is unchanged."""
    import torch

    from monailabel_dr.config import parse_conf
    from monailabel_dr.networks.lesion_net import build_lesion_net

    net_conf = parse_conf(tiny_conf(tmp_path / "x", models="lesion_seg"), str(tmp_path)).models["lesion_seg"].network
    ckpt = tmp_path / "given.pt"
    torch.save({"model": build_lesion_net({**net_conf, "members": saved_members}).state_dict()}, ckpt)
    before = ckpt.read_bytes()
    conf = tiny_conf(tmp_path / "model", lesion_seg_image_size=96, lesion_seg_checkpoint=str(ckpt),
                     lesion_seg_set=f"network.members={served_members}")
    with serve_in_process(phantom_store, conf) as c:
        r = c.post("/infer/lesion_seg?image=fundus_0001")
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        said = {1: "one network", 2: "an ensemble of 2 networks", 3: "an ensemble of 3 networks"}
        assert f"holds {said[saved_members]}" in detail and f"serves {said[served_members]}" in detail
        assert c.get("/info/").status_code == 200
    assert ckpt.read_bytes() == before


def test_ensemble_trains_and_serves_over_http(phantom_store, tmp_path):
    """Through a real `monailabel start_server` on a loopback port (training runs in MONAI Label's train
    subprocess there): an ensemble profile's /train publishes both members and the ensemble, /info says so,
    /infer answers with it."""
    import requests

    from monailabel_dr.serving import running_server

    conf = {"models": "lesion_seg", "lesion_seg_image_size": "96", "lesion_seg_set": "network.members=2",
            "rescore_interval": "0"}
    with running_server(phantom_store, tmp_path / "model", conf=conf) as url:
        for i in range(4):
            r = requests.put(f"{url}/datastore/label?image=fundus_{i:04d}&tag=final",
                             files={"label": (f"fundus_{i:04d}.nrrd", slicer_nrrd(phantom_label_map(i)))}, timeout=60)
            assert r.status_code == 200, r.text
        r = requests.post(f"{url}/train/lesion_seg?run_sync=true", json={"max_epochs": 1, "seed": 5}, timeout=600)
        assert r.status_code == 200, r.text
        assert all((tmp_path / "model" / f"lesion_seg.member{k}.pt").is_file() for k in (0, 1))
        state = requests.get(f"{url}/info/", timeout=60).json()["models"]["lesion_seg"]["state"]
        assert state["trained"] and "ensemble of 2" in state["quality"]
        assert [m["checkpoint"] for m in state["validation"]["members"]] == [
            str((tmp_path / "model" / f"lesion_seg.member{k}.pt").resolve()) for k in (0, 1)]
        r = requests.post(f"{url}/infer/lesion_seg?image=fundus_0005&output=json", timeout=120)
        assert r.status_code == 200, r.text
        assert set(r.json()["lesions"]) == set(LESIONS)
