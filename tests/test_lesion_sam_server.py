"""lesion_sam (TP-DRSeg) through the in-process server: trained on Slicer-style label maps of
phantoms, then prompted by lesion name, by free text, and refined with SAM points and a box."""

from __future__ import annotations

import json

import nrrd
import numpy as np
import pytest
import torch
from requests_toolbelt.multipart.decoder import MultipartDecoder

from conftest import serve_in_process, tiny_conf
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.lesions import LESION_VALUES, LESIONS
from test_lesion_seg_server import phantom_label_map, slicer_nrrd


def _save_label_maps(client, n: int) -> None:
    """Slicer-style label maps of the phantoms fundus_0000 .. n-1, saved as final labels over REST."""
    for i in range(n):
        r = client.put(f"/datastore/label?image=fundus_{i:04d}&tag=final",
                       files={"label": (f"fundus_{i:04d}.nrrd", slicer_nrrd(phantom_label_map(i)))})
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def sam_server(tmp_path_factory):
    """A datastore with 6 Slicer label maps and a lesion_sam trained on them (tiny profile, 2 epochs)."""
    from conftest import write_phantom_store

    base = tmp_path_factory.mktemp("sam")
    store = write_phantom_store(base / "store", n=10, labelled=0, seed=0)
    with serve_in_process(store, tiny_conf(base / "model", models="lesion_sam")) as c:
        assert c.post("/infer/lesion_sam?image=fundus_0001").status_code == 409
        _save_label_maps(c, 6)
        r = c.post("/train/lesion_sam?run_sync=true", json={"max_epochs": 2})
        assert r.status_code == 200, r.text
        yield c, store, base, r.json()


def _infer(client, image_id, **params):
    r = client.post(f"/infer/lesion_sam?image={image_id}&output=all", data={"params": json.dumps(params)})
    return r


def _parts(r):
    parts = {p.headers[b"Content-Disposition"].decode(): p.content
             for p in MultipartDecoder(r.content, r.headers["content-type"]).parts}
    params = json.loads(next(v for k, v in parts.items() if 'name="params"' in k))
    body = next(v for k, v in parts.items() if 'name="image"' in k)
    return body, params


def test_training_stats_and_published_checkpoint(sam_server):
    client, store, base, stats = sam_server
    assert stats["epoch"] == 2
    assert "train_prompt_dice" in stats["train"]["metrics"]
    assert {f"val_dice_{les}" for les in LESIONS} | {"val_mean_dice"} <= set(stats["eval"]["metrics"])
    info = client.get("/info/").json()
    assert info["models"]["lesion_sam"]["type"] == "segmentation"
    assert info["model_state"]["lesion_sam"]["trained"] is True
    ckpt = torch.load(base / "model" / "lesion_sam.pt", map_location="cpu", weights_only=True)
    # from scratch (tiny profile has no weights): everything trains, and the source says so
    assert ckpt["weights_source"]["sam"] is None and ckpt["weights_source"]["clip"] is None
    assert any(k.startswith("injectors.") for k in ckpt["model"])
    assert any(k.startswith("sam.mask_decoder.") for k in ckpt["model"])


def test_lesion_prompt_mask_at_input_geometry(sam_server, tmp_path):
    client, *_ = sam_server
    r = _infer(client, "fundus_0001", lesion="EX", result_extension=".nrrd")
    assert r.status_code == 200, r.text
    body, params = _parts(r)
    out = tmp_path / "ex.nrrd"
    out.write_bytes(body)
    lab = fio.read_label(out)
    assert lab.shape == (240, 320)
    assert set(np.unique(lab)) <= {0, LESION_VALUES["EX"]}
    assert [p["name"] for p in params["prompts"]] == ["EX"]
    p = params["prompts"][0]
    assert p["class"] == "EX" and p["texts"]            # the configured description(s) were used
    assert p["area_px"] == int((lab == LESION_VALUES["EX"]).sum())
    assert params["image_size"] == [240, 320] and params["mode"] == "faithful"


def test_free_text_prompt_and_prior_explanation(sam_server, tmp_path):
    client, *_ = sam_server
    text = "small white or yellowish deposits with sharp margins near the macula"
    r = _infer(client, "fundus_0002", text=text)
    assert r.status_code == 200, r.text
    body, params = _parts(r)
    out = tmp_path / "t.png"
    out.write_bytes(body)
    lab = fio.read_label(out)
    assert lab.shape == (240, 320) and set(np.unique(lab)) <= {0, len(LESIONS) + 1}
    assert params["prompts"][0]["texts"] == [text] and params["prompts"][0]["class"] in LESIONS
    assert params["label_values"] == {"text_1": len(LESIONS) + 1}

    r = _infer(client, "fundus_0002", text=text, lesion="HE", output="prior", result_extension=".nrrd")
    assert r.status_code == 200, r.text
    body, params = _parts(r)
    out = tmp_path / "prior.nrrd"
    out.write_bytes(body)
    arr, header = nrrd.read(str(out))
    assert arr.size == 2 * 240 * 320
    assert 0.0 <= float(arr.min()) and float(arr.max()) <= 1.0 + 1e-5
    assert [p["name"] for p in params["prompts"]] == ["HE", "text_1"]
    # the prior maps' channels are named after the prompts, in order (the app's channel_names field)
    maps, names = fio.read_multichannel(out)
    assert maps.shape == (2, 240, 320) and names == ["HE", "text_1"]


def test_all_lesions_fast_vs_faithful_and_refinement(sam_server):
    client, *_ = sam_server
    r1 = _infer(client, "fundus_0003", lesion="all", mode="fast")
    r2 = _infer(client, "fundus_0003", lesion="all", mode="faithful")
    assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
    p1, p2 = _parts(r1)[1], _parts(r2)[1]
    assert [p["name"] for p in p1["prompts"]] == list(LESIONS) == [p["name"] for p in p2["prompts"]]
    assert p1["mode"] == "fast" and p2["mode"] == "faithful"
    # a foreground point and a box change SAM's prompt tokens, hence the answer
    r3 = _infer(client, "fundus_0003", lesion="HE", foreground=[[160, 120, 0]], background=[[40, 200]],
                roi=[100, 60, 220, 180])
    assert r3.status_code == 200, r3.text
    p3 = _parts(r3)[1]
    assert p3["refinement"] == {"foreground": 1, "background": 1, "roi": True}
    r4 = _infer(client, "fundus_0003", lesion="HE")
    he_plain = _parts(r4)[1]["prompts"][0]["predicted_iou"]
    assert p3["prompts"][0]["predicted_iou"] != he_plain


@pytest.mark.parametrize("params, fragment", [
    ({"lesion": "XX"}, "unknown"),
    ({"mode": "slow"}, "mode"),
    ({"foreground": [[10_000, 5]]}, "outside"),
    ({"foreground": "here"}, "points"),
    ({"roi": [50, 50, 10, 10]}, "roi"),
    ({"text": ["a"] * 20}, "at most"),
    ({"output": "probabilities", "result_extension": ".png"}, ".nrrd"),
])
def test_bad_prompts_are_4xx(sam_server, params, fragment):
    client, store, *_ = sam_server
    before = sorted(p.name for p in (store / "labels" / "final").iterdir())
    r = _infer(client, "fundus_0001", **params)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert fragment in r.text
    assert sorted(p.name for p in (store / "labels" / "final").iterdir()) == before
    assert client.get("/info/").status_code == 200


def test_frozen_pretrained_sam_publishes_only_what_trained(tmp_path):
    """With SAM weights from a local file in the official format, SAM's encoders stay frozen, the
    published checkpoint holds only the trained tensors plus where the frozen ones come from, and
    /infer rebuilds the model from both."""
    import yaml

    from conftest import write_phantom_store
    from monailabel_dr.config import CONFIG_DIR
    from monailabel_dr.networks.tp_drseg import build_tp_drseg

    tiny = yaml.safe_load(open(CONFIG_DIR / "lesion_sam.yaml"))["profiles"]["tiny"]
    sam_file = tmp_path / "sam_tiny_official_format.pth"
    torch.manual_seed(3)
    reference = build_tp_drseg(tiny["network"], load_weights=False).sam.state_dict()
    torch.save(reference, sam_file)

    store = write_phantom_store(tmp_path / "store", n=6, labelled=0, seed=0)
    conf = tiny_conf(tmp_path / "model", models="lesion_sam", lesion_sam_set=f"network.sam.checkpoint={sam_file}")
    with serve_in_process(store, conf) as c:
        _save_label_maps(c, 3)
        r = c.post("/train/lesion_sam?run_sync=true", json={"max_epochs": 1})
        assert r.status_code == 200, r.text
        ckpt = torch.load(tmp_path / "model" / "lesion_sam.pt", map_location="cpu", weights_only=True)
        keys = set(ckpt["model"])
        assert not any(k.startswith(("sam.image_encoder.", "sam.prompt_encoder.")) for k in keys)
        assert any(k.startswith("sam.mask_decoder.") for k in keys)
        assert any(k.startswith("injectors.") for k in keys) and any(k.startswith("prompt_generator.") for k in keys)
        assert ckpt["weights_source"]["sam"] == str(sam_file)
        # the run's full checkpoint shows the encoder did not move
        full = torch.load(tmp_path / "model" / "lesion_sam" / "train_01" / "model.pt", map_location="cpu",
                          weights_only=True)
        full = full.get("model", full)
        for k, v in reference.items():
            if k.startswith("image_encoder."):
                assert torch.equal(full[f"sam.{k}"], v), k
        r = _infer(c, "fundus_0004", lesion="SE")
        assert r.status_code == 200, r.text
        assert _parts(r)[1]["prompts"][0]["name"] == "SE"


def test_tiled_profile_trains_on_crops_and_answers_at_input_geometry(tmp_path):
    """A working image larger than SAM's input (as the CPU `small` profile): training takes lesion-centred
    SAM-sized crops, validation and /infer run SAM over tiles, and the answer is still at input geometry."""
    from conftest import write_phantom_store

    store = write_phantom_store(tmp_path / "store", n=6, labelled=0, seed=1)
    conf = tiny_conf(tmp_path / "model", models="lesion_sam", lesion_sam_image_size=96)
    with serve_in_process(store, conf) as c:
        _save_label_maps(c, 5)
        r = c.post("/train/lesion_sam?run_sync=true", json={"max_epochs": 1, "samples_per_image": 2})
        assert r.status_code == 200, r.text
        stats = r.json()
        # 4 training images, batch 2 (each image giving 2 crops of 64 px) -> 2 iterations
        assert stats["total_iterations"] == 2 and "val_mean_dice" in stats["eval"]["metrics"]
        r = _infer(c, "fundus_0005", lesion="EX,HE", mode="fast", result_extension=".nrrd")
        assert r.status_code == 200, r.text
        body, params = _parts(r)
        out = tmp_path / "tiled.nrrd"
        out.write_bytes(body)
        assert fio.read_label(out).shape == (240, 320) and params["working_size"] == 96
        r = _infer(c, "fundus_0005", lesion="EX", output="prior", result_extension=".nrrd")
        assert r.status_code == 200, r.text
        out.write_bytes(_parts(r)[0])
        prior, _ = nrrd.read(str(out))
        assert prior.size == 240 * 320 and 0.0 <= prior.min() and prior.max() <= 1.0 + 1e-5


@pytest.mark.parametrize("image_size, crop", [(64, None), (96, 64)])
def test_trainer_crops_only_when_the_working_image_exceeds_sams_input(tmp_path, image_size, crop):
    from monai.transforms import RandCropByLabelClassesd
    from monailabel.tasks.train.basic_train import Context

    from monailabel_dr.config import parse_conf
    from monailabel_dr.lib.trainers.lesion_sam import LesionSamTrainer

    app = parse_conf(tiny_conf(tmp_path, models="lesion_sam", lesion_sam_image_size=image_size), str(tmp_path))
    trainer = LesionSamTrainer(app.models["lesion_sam"], app)
    ctx = Context()
    ctx.request = {}
    crops = [t for t in trainer.train_pre_transforms(ctx) if isinstance(t, RandCropByLabelClassesd)]
    assert [tuple(c.cropper.spatial_size) for c in crops] == ([] if crop is None else [(crop, crop)])
