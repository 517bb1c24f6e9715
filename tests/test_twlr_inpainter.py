"""TWLR's learned inpainter: the hole generator, the trainer's data, and training / serving through the
in-process server (`twlr_inpainter` trainer, `twlr_inpaint` with backend=unet)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from conftest import serve_in_process, tiny_conf, write_phantom_store
from monailabel_dr.fundus import geometry
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.holes import HoleSettings, RandHoleMaskd, healthy_region, hole_psnr, random_hole_mask
from monailabel_dr.fundus.lesions import LESION_VALUES, LESIONS
from monailabel_dr.fundus.phantoms import make_phantom

STORE_SEED = 11
SIZE = (240, 320)


def _disc_and_lesions(h=96, w=128):
    yy, xx = np.mgrid[:h, :w]
    fov = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.45 * w) ** 2
    lesions = np.zeros((h, w), bool)
    lesions[30:38, 50:60] = True     # a haemorrhage
    lesions[60, 80] = True           # a one-pixel microaneurysm
    return fov, lesions


# ----------------------------------------------------------------------------- the hole generator
def test_holes_inside_fov_off_dilated_lesions_area_in_range_and_seeded():
    fov, lesions = _disc_and_lesions()
    s = HoleSettings(blobs=(1, 3), strokes=(0, 2), area_fraction=(0.05, 0.2), lesion_margin=3)
    allowed = healthy_region(fov, lesions, s.lesion_margin)
    near = cv2.dilate(lesions.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))) > 0
    assert not (allowed & near).any() and (allowed & fov).sum() == allowed.sum()
    fractions = []
    for seed in range(60):
        hole = random_hole_mask(allowed, np.random.RandomState(seed), s)
        assert hole.any() and not (hole & ~fov).any(), seed
        assert not (hole & near).any(), seed       # not on a lesion, nor within the margin around it
        fractions.append(hole.sum() / allowed.sum())
        np.testing.assert_array_equal(hole, random_hole_mask(allowed, np.random.RandomState(seed), s))
    assert min(fractions) >= 0.05 and max(fractions) <= 0.2, (min(fractions), max(fractions))
    assert len({round(f, 4) for f in fractions}) > 30       # not one shape over and over
    # strokes only, a tiny range: still inside the range
    thin = HoleSettings(blobs=(0, 0), strokes=(1, 3), area_fraction=(0.01, 0.02))
    for seed in range(20):
        f = random_hole_mask(allowed, np.random.RandomState(seed), thin).sum() / allowed.sum()
        assert 0.01 <= f <= 0.02, (seed, f)
    assert not random_hole_mask(np.zeros_like(fov), np.random.RandomState(0), s).any()
    with pytest.raises(ValueError):
        HoleSettings.from_dict({"area_fraction": [0.3, 0.1]})
    with pytest.raises(ValueError):
        HoleSettings.from_dict({"blob_count": 3})


def test_rand_hole_transform_is_seeded_like_monai_transforms():
    fov, lesions = _disc_and_lesions()
    data = {"image": torch.rand(3, *fov.shape), "fov": torch.from_numpy(fov[None].astype(np.float32)),
            "les": torch.from_numpy(np.stack([lesions, np.zeros_like(lesions)]).astype(np.float32))}
    t = RandHoleMaskd(keys="image", avoid_key="les", settings={"lesion_margin": 2})
    a = t.set_random_state(seed=5)(data)["hole"]
    b = t.set_random_state(seed=5)(data)["hole"]
    c = t(data)["hole"]
    assert a.shape == (1, *fov.shape) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not bool((a[0].bool() & torch.from_numpy(lesions)).any())
    assert hole_psnr(data["image"][None], data["image"][None], a[None]) == [100.0]


# ----------------------------------------------------------------------------- the trainer's data
def _write_idrid(folder, seeds):
    (folder / "images").mkdir(parents=True)
    for i, seed in enumerate(seeds, start=1):
        ph = make_phantom(seed, size=SIZE, grade=3)
        fio.write_image(folder / "images" / f"IDRiD_{i:02d}.jpg", ph.image)
        for les in LESIONS:
            if ph.masks[les].any():
                (folder / "masks" / les).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / "masks" / les / f"IDRiD_{i:02d}_{les}.png"), ph.masks[les].astype(np.uint8) * 255)
    return folder


def test_trainer_data_from_idrid_keeps_holes_in_the_fov_and_off_lesions(tmp_path):
    from monai.transforms import Compose
    from monailabel.tasks.train.basic_train import Context

    from monailabel_dr.config import parse_conf
    from monailabel_dr.lib.trainers.twlr_inpainter import AVOID_KEY, HOLE_KEY, TWLRInpainterTrainer

    folder = _write_idrid(tmp_path / "idrid", seeds=[501, 502, 503, 504, 505])
    app = parse_conf(tiny_conf(tmp_path / "model", models="twlr_inpainter"), "/app")
    task = TWLRInpainterTrainer(app.models["twlr_inpainter"], app)
    items = task.pre_process({"dataset_source": f"idrid:{folder}"}, datastore=None)
    assert [d["split"] for d in items] == ["train"] * 4 + ["val"] and all(d["masks"] for d in items)
    ctx = Context()
    ctx.request = dict(task.config())
    chain = task.train_pre_transforms(ctx)
    crops = Compose(chain[: -len(task._pair())]).set_random_state(0)(items[0])   # before the input/target pairing
    assert len(crops) == task.config()["samples_per_image"]
    for c in crops:
        hole, fov, les = c[HOLE_KEY][0] > 0.5, c["fov"][0] > 0.5, c[AVOID_KEY][0] > 0.5
        assert hole.shape == (64, 64) and bool(hole.any())
        assert not bool((hole & ~fov).any()) and not bool((hole & les).any())
    out = Compose(chain).set_random_state(0)(items[0])[0]
    assert out["image"].shape == (4, 64, 64) and out["label"].shape == (4, 64, 64)
    assert torch.equal(out["image"][3], out["label"][3])                        # the hole, in both
    assert float((out["image"][:3] * out["image"][3:]).abs().max()) == 0.0        # the hole is zeroed in the input
    # validation holes are the same in every call (fixed per image)
    val = Compose(task.val_pre_transforms(ctx))
    a, b = val(items[4]), val(items[4])
    assert len(a) == 2 and all(torch.equal(x["label"], y["label"]) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- through the server
def _write_lesion_maps(store, ids):
    label_dir = store / "labels" / "final"
    for i in ids:
        ph = make_phantom(STORE_SEED + i, size=SIZE)   # write_demo's phantom i
        lab = np.zeros(SIZE, np.uint8)
        for les in ("EX", "SE", "HE", "MA"):
            lab[ph.masks[les]] = LESION_VALUES[les]
        fio.write_label(label_dir / f"fundus_{i:04d}.png", lab)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("tin")
    store = write_phantom_store(base / "store", n=12, labelled=0, seed=STORE_SEED, size=SIZE)
    _write_lesion_maps(store, [0, 1, 2])
    model_dir = base / "model"
    with serve_in_process(store, tiny_conf(model_dir, models="twlr,twlr_inpainter")) as c:
        yield c, store, model_dir


def _unet_request(client):
    params = {"backend": "unet", "tau": 0.05, "t_max": 2, "result_extension": ".png"}
    return client.post("/infer/twlr_inpaint?image=fundus_0003&output=json", data={"params": json.dumps(params)})


def _grader_checkpoint(model_dir):
    """A twlr grader checkpoint (random weights: the grader's quality is not under test here), so that a
    twlr_inpaint request gets past the grader's own 409 and reaches the inpainter."""
    from monailabel_dr.config import parse_conf
    from monailabel_dr.networks.twlr import build_twlr_grader

    m = parse_conf(tiny_conf(model_dir, models="twlr"), "/app").models["twlr"]
    torch.manual_seed(0)
    net = build_twlr_grader(m.network, image_size=m.image_size)
    torch.save({"model": net.state_dict()}, m.published_path)


def _whole_image_psnr(network, store, ids, size=128):
    """Hole PSNR of the inference path (network_inpaint on whole working images, as twlr_inpaint calls it)."""
    from monailabel_dr.fundus.inpainting import network_inpaint

    values = []
    for k, i in enumerate(ids):
        rgb = fio.to_rgb_float(fio.read_image(store / f"fundus_{i:04d}.jpg"))
        work, _, fov = geometry.prepare(rgb, size)
        u8 = (work * 255 + 0.5).astype(np.uint8)
        hole = random_hole_mask(fov > 0.5, np.random.RandomState(100 + k), HoleSettings(area_fraction=(0.05, 0.1)))
        out = network_inpaint(network.eval(), u8, hole)
        t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255   # noqa: E731
        values += hole_psnr(t(out), t(u8), torch.from_numpy(hole)[None, None].float())
    return float(np.mean(values))


def test_train_publish_and_serve_through_twlr_inpaint(server):
    client, store, model_dir = server
    # 1. nothing trained: the grader's 409 comes first (FundusInferTask checks its own model first)
    r = _unet_request(client)
    assert r.status_code == 409 and "twlr.pt" in r.text and "twlr_inpainter" not in r.text, r.text
    # 2. with a grader, backend=unet answers 409 naming the untrained inpainter and how to train it
    _grader_checkpoint(model_dir)
    r = _unet_request(client)
    assert r.status_code == 409, r.text
    assert "twlr_inpainter has no trained weights" in r.text and "/train/twlr_inpainter" in r.text, r.text
    info = client.get("/info/").json()
    assert "twlr_inpainter" in info["trainers"] and info["trainers"]["twlr_inpainter"]["state"]["trained"] is False

    r = client.post("/train/twlr_inpainter?run_sync=true", json={"crop_size": 50})
    assert r.status_code == 422 and "crop_size" in r.text, r.text

    # 3. train the tiny profile: checkpoint published, metrics against the Navier-Stokes baseline
    r = client.post("/train/twlr_inpainter?run_sync=true", json={"max_epochs": 3})
    assert r.status_code == 200, r.text
    stats = r.json()
    metrics = stats["eval"]["metrics"]
    assert stats["eval"]["key_metric_name"] == "val_psnr"
    assert np.isfinite(metrics["val_psnr"]) and 5 < metrics["val_psnr_ns"] < 100, metrics
    published = model_dir / "twlr_inpainter.pt"
    assert published.is_file()
    info = client.get("/info/").json()
    state = info["trainers"]["twlr_inpainter"]["state"]
    assert state["trained"] is True and state["checkpoint"] == str(published)
    assert info["train_stats"]["twlr_inpainter"]["eval"]["metrics"]["val_psnr"] == metrics["val_psnr"]

    # 4. the trained inpainter fills holes in whole images better than the same network untrained
    from monailabel_dr.lib.infers.base import load_weights
    from monailabel_dr.networks.inpainter import build_inpainter

    from monailabel_dr.config import parse_conf

    network = parse_conf(tiny_conf(model_dir, models="twlr_inpainter"), "/app").models["twlr_inpainter"].network
    torch.manual_seed(0)
    untrained = build_inpainter(network)
    trained = load_weights(build_inpainter(network), str(published), "cpu")
    ids = [3, 5, 7, 9]
    before, after = _whole_image_psnr(untrained, store, ids), _whole_image_psnr(trained, store, ids)
    assert after > before + 3.0, (before, after)

    # 5. twlr_inpaint now runs with backend=unet
    r = _unet_request(client)
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["backend"] == "unet", r.text
