"""`monailabel-dr twlr-pseudolabels`: TWLR weak lesion masks as `original` labels / an IDRiD-layout folder,
and the lesion_seg trainer learning from both (tiny profiles, phantoms)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import tiny_conf, write_phantom_store
from monailabel_dr.cli import main
from monailabel_dr.demo import read_truth
from monailabel_dr.fundus import idrid
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.lesions import LESION_VALUES, LESIONS

SIZE = (200, 260)
PARAMS = json.dumps({"tau": 0.05, "t_max": 3})   # a low tau keeps the tiny grader looping


def _conf_args(model_dir) -> list[str]:
    args = []
    for k, v in tiny_conf(model_dir, models="twlr,lesion_seg").items():
        args += ["--conf", k, v]
    return args


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{\"")]


def _run(capsys, *args) -> tuple[int, list[dict]]:
    capsys.readouterr()
    rc = main(["twlr-pseudolabels", *args])
    return rc, _lines(capsys)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A phantom datastore (grade labels only) with a tiny twlr grader trained on it."""
    base = tmp_path_factory.mktemp("pseudo")
    store = write_phantom_store(base / "store", n=12, labelled=12, seed=3, size=SIZE)
    conf = _conf_args(base / "model")
    main(["train", "twlr", "--studies", str(store), *conf, "--epochs", "3"])
    assert (base / "model" / "twlr.pt").is_file()
    truth = read_truth(str(store))
    lesioned = [k for k, v in sorted(truth.items()) if v["grade"] >= 2]
    return store, conf, lesioned


def _datastore(store, conf):
    from monailabel_dr.cli import make_app

    return make_app(str(store), {conf[i + 1]: conf[i + 2] for i in range(0, len(conf), 3)}).datastore()


def test_to_datastore_original_labels_never_final(trained, capsys, tmp_path):
    store, conf, lesioned = trained
    a, b, c = lesioned[:3]
    # c already has a final lesion map (a human's): it must stay exactly as it is
    final = np.zeros(SIZE, np.uint8)
    final[90:110, 120:140] = LESION_VALUES["HE"]
    ds = _datastore(store, conf)
    ds.save_label(c, fio.write_label(tmp_path / f"{c}.png", final), "final", {"source": "annotator"})
    final_file = store / "labels" / "final" / f"{c}.png"
    final_bytes = final_file.read_bytes()
    assert "lesion_map" not in ds.final_label_files(a) and "lesion_map" in ds.final_label_files(c)
    from monailabel_dr.lib.pseudolabels import select_images

    unlabelled = select_images(ds, unlabelled_only=True)   # grade-only labels do not count as lesion labels
    assert c not in unlabelled and a in unlabelled and len(unlabelled) == 11

    rc, lines = _run(capsys, "--studies", str(store), *conf, "--images", f"{a},{b},{c}", "--to-datastore",
                     "--params", PARAMS)
    assert rc == 0, lines
    recs, summary = {r["image"]: r for r in lines if "image" in r}, lines[-1]["summary"]
    assert set(recs) == {a, b, c} and summary["written"] == 3 and summary["failed"] == 0
    for image_id in (a, b, c):
        r = recs[image_id]
        assert r["written"]["datastore"]["tag"] == "original"
        assert set(r["areas"]) == set(LESIONS) and r["stop_reason"] and r["grades"]
        lab = fio.read_label(store / "labels" / "original" / f"{image_id}.png")
        assert lab.shape == SIZE and set(np.unique(lab).tolist()) <= {0, 1, 2, 3, 4}
        assert {les: int((lab == v).sum()) for les, v in LESION_VALUES.items()} == r["areas"]
    assert any((fio.read_label(store / "labels" / "original" / f"{i}.png") > 0).any() for i in (a, b, c))
    assert final_file.read_bytes() == final_bytes          # the final label is untouched

    ds = _datastore(store, conf)
    info = ds.get_label_info(a, "original")
    assert info["source"] == "twlr_pseudolabel" and info["pseudo_label"] is True and info["kind"] == "lesion_map"
    assert info["settings"]["tau"] == 0.05 and info["settings"]["t_max"] == 3 and info["stop_reason"]
    assert info["model"]["checkpoint"].endswith("twlr.pt") and len(info["model"]["sha256"]) == 64
    assert ds.get_label_info(c, "final")["source"] == "annotator"
    assert ds.final_label_files(c)["lesion_map"].endswith(f"final/{c}.png")
    assert ds.final_label_files(a, "original")["lesion_map"].endswith(f"original/{a}.png")

    # without --overwrite: an existing original label is skipped before any inference; a bad id fails alone
    before = (store / "labels" / "original" / f"{a}.png").read_bytes()
    rc, lines = _run(capsys, "--studies", str(store), *conf, "--images", f"{a},no_such_eye", "--to-datastore",
                     "--params", json.dumps({"tau": 0.05, "t_max": 1}))
    assert rc == 1
    assert "skipped" in lines[0] and lines[1]["status"] == 404 and lines[-1]["summary"]["failed"] == 1
    assert (store / "labels" / "original" / f"{a}.png").read_bytes() == before
    assert _datastore(store, conf).get_label_info(a, "original")["settings"]["t_max"] == 3
    # --overwrite replaces the original label (new settings recorded), still never the final one
    rc, lines = _run(capsys, "--studies", str(store), *conf, "--images", f"{a},{c}", "--to-datastore", "--overwrite",
                     "--params", json.dumps({"tau": 0.05, "t_max": 1}))
    assert rc == 0 and lines[-1]["summary"]["written"] == 2
    ds = _datastore(store, conf)
    assert ds.get_label_info(a, "original")["settings"]["t_max"] == 1
    assert final_file.read_bytes() == final_bytes and ds.get_label_info(c, "final")["source"] == "annotator"

    # lesion_seg learns from the original labels when asked (label_tag), from final ones by default
    from monailabel_dr.cli import make_app

    app = make_app(str(store), {conf[i + 1]: conf[i + 2] for i in range(0, len(conf), 3)})
    trainer = app._trainers["lesion_seg"]
    items = trainer.pre_process({"label_tag": "original"}, app.datastore())
    assert [(it["id"], os.path.basename(os.path.dirname(it["label"]))) for it in items] == \
        [(i, "original") for i in sorted((a, b, c))]
    items = trainer.pre_process({}, app.datastore())
    assert [(it["id"], os.path.basename(os.path.dirname(it["label"]))) for it in items] == [(c, "final")]
    capsys.readouterr()
    model_dir = tmp_path / "seg_ds"
    seg_conf = [*conf, "--conf", "model_dir", str(model_dir)]
    assert main(["train", "lesion_seg", "--studies", str(store), *seg_conf, "--epochs", "1",
                 "--params", json.dumps({"label_tag": "original"})]) == 0
    assert (model_dir / "lesion_seg.pt").is_file()


def test_idrid_out_layout_and_lesion_seg_trains(trained, capsys, tmp_path):
    store, conf, lesioned = trained
    # one id validates in IDRiD's split (trailing number a multiple of 5), the others train
    ids = sorted({*lesioned[:2], next(i for i in lesioned if int(i[-4:]) % 5 == 0)})
    out = tmp_path / "idrid_pseudo"
    rc, lines = _run(capsys, "--studies", str(store), *conf, "--images", ",".join(ids), "--idrid-out", str(out),
                     "--params", PARAMS)
    assert rc == 0, lines
    recs = {r["image"]: r for r in lines if "image" in r}
    assert idrid.list_idrid(out) == ids
    train_ids, val_ids = idrid.idrid_split(ids)
    assert train_ids and val_ids
    for image_id in ids:
        img = out / "images" / f"{image_id}.jpg"
        assert img.is_symlink() and os.path.realpath(img) == os.path.realpath(store / f"{image_id}.jpg")
        areas = recs[image_id]["areas"]
        for les in LESIONS:
            p = idrid.idrid_mask_path(out, image_id, les)
            assert (p is not None) == (areas[les] > 0), (image_id, les, p, areas)   # a file only where non-empty
            if p:
                assert set(np.unique(fio.read_label(p)).tolist()) == {0, 255}
        masks = idrid.idrid_masks(out, image_id)
        assert all(m.shape == SIZE for m in masks.values())
        assert {les: int(m.sum()) for les, m in masks.items()} == areas
        info = json.loads((out / "pseudolabel_info" / f"{image_id}.json").read_text())
        assert info["source"] == "twlr_pseudolabel" and info["settings"]["tau"] == 0.05
    assert any(any(r["areas"].values()) for r in recs.values())
    # the lesion_seg trainer's own reader of the folder
    from monailabel_dr.lib.trainers.lesion_data import idrid_items

    items = idrid_items(str(out))
    assert [it["id"] for it in items] == ids and {it["split"] for it in items} == {"train", "val"}
    # a second run skips what is there; --overwrite rewrites (stale mask files of the id removed)
    rc, lines = _run(capsys, "--studies", str(store), *conf, "--images", ids[0], "--idrid-out", str(out))
    assert rc == 0 and "skipped" in lines[0]
    stale = out / "masks" / "SE" / f"{ids[0]}_SE.png"
    stale.parent.mkdir(parents=True, exist_ok=True)
    fio.write_label(stale, np.full(SIZE, 255, np.uint8))
    rc, lines = _run(capsys, "--studies", str(store), *conf, "--images", ids[0], "--idrid-out", str(out),
                     "--overwrite", "--params", json.dumps({"tau": 0.05, "t_max": 1}))
    assert rc == 0 and lines[0]["written"]["idrid"]
    assert stale.is_file() == (lines[0]["areas"]["SE"] > 0)
    if stale.is_file():
        assert int((fio.read_label(stale) > 0).sum()) == lines[0]["areas"]["SE"]

    # lesion_seg trains one epoch from the folder (tiny profile)
    capsys.readouterr()
    model_dir = tmp_path / "seg"
    assert main(["train", "lesion_seg", "--dataset", f"idrid:{out}", *conf, "--conf", "model_dir", str(model_dir),
                 "--epochs", "1"]) == 0
    assert (model_dir / "lesion_seg.pt").is_file()


def test_bad_requests_are_clean_errors(trained, tmp_path, capsys):
    store, conf, lesioned = trained
    base = ["--studies", str(store), *conf, "--images", lesioned[0], "--to-datastore", "--overwrite"]
    originals = store / "labels" / "original"
    before = {p.name: p.stat().st_mtime_ns for p in originals.glob("*")} if originals.is_dir() else {}
    ds_json = (store / "datastore_v2.json").read_bytes()
    for bad, match in (("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ('{"tau": 2}', "tau"),
                       ('{"output": "image"}', "output"), ('{"backend": "lama"}', "backend"),
                       ('{"result_extension": ".jpg"}', "result_extension"), ('{"model": "cam"}', "may not set"),
                       ('{"backend": "unet"}', "twlr_inpainter")):   # the learned inpainter is not served here
        with pytest.raises(SystemExit, match=match):
            main(["twlr-pseudolabels", *base, "--params", bad])
    after = {p.name: p.stat().st_mtime_ns for p in originals.glob("*")} if originals.is_dir() else {}
    assert after == before and (store / "datastore_v2.json").read_bytes() == ds_json   # nothing written
    # an untrained grader: one clean message before any image (never random weights)
    with pytest.raises(SystemExit, match="no trained weights"):
        main(["twlr-pseudolabels", "--studies", str(store), *conf, "--conf", "model_dir", str(tmp_path / "empty"),
              "--images", lesioned[0], "--idrid-out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    # exactly one destination
    with pytest.raises(SystemExit):
        main(["twlr-pseudolabels", "--studies", str(store), *conf, "--to-datastore", "--idrid-out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        main(["twlr-pseudolabels", "--studies", str(store), *conf])
