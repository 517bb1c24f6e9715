"""`monailabel-dr evaluate lesion_seg` end to end on a folder in the IDRiD layout.

The folder is built from phantoms (images/NAME.jpg, masks/<LES>/NAME_<LES>.png, a missing
file = an empty mask), so the metrics of known predictions are known exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.fundus.phantoms import make_phantom

# Grades 0 (no lesion at all), 1, 2, 2, 3, 4: every lesion is absent from at least one image.
GRADES = (0, 1, 2, 2, 3, 4)


def cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "monailabel_dr.cli", *args], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def idrid_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("idrid_like")
    (root / "images").mkdir()
    for les in LESIONS:
        (root / "masks" / les).mkdir(parents=True)
    for i, grade in enumerate(GRADES):
        name = f"IDRiD_{i + 1:02d}"
        ph = make_phantom(300 + i, size=(240, 320), grade=grade)
        fio.write_image(root / "images" / f"{name}.jpg", ph.image)
        for les in LESIONS:
            if ph.masks[les].any():  # absent lesion: no file, as in IDRiD
                Image.fromarray(ph.masks[les].astype(np.uint8) * 255).save(root / "masks" / les / f"{name}_{les}.png")
    return root


def _evaluate(folder: Path, out: Path, *extra: str) -> dict:
    proc = cli("evaluate", "lesion_seg", "--dataset", f"idrid:{folder}", "--json", str(out), "--n-boot", "50", *extra)
    assert "dice_pooled" in proc.stdout  # the printed table
    text = out.read_text()
    assert "NaN" not in text  # strict JSON: undefined metrics are null
    return json.loads(text)


def test_true_masks_as_predictions_score_perfectly(idrid_folder, tmp_path):
    report = _evaluate(idrid_folder, tmp_path / "perfect.json", "--predictions", str(idrid_folder / "masks"))
    assert len(report["images"]) == len(GRADES) and report["split"] == "all"
    seg = report["segmentation"]
    for les in LESIONS:
        m = seg[les]
        assert m["n_pos_images"] >= 1 and m["n_neg_images"] >= 1, les
        assert m["dice_pooled"] == pytest.approx(1.0, abs=1e-6)
        assert m["iou_pooled"] == pytest.approx(1.0, abs=1e-6)
        assert m["auc_pr"] == pytest.approx(1.0, abs=1e-3)
        assert m["auc_roc"] == pytest.approx(1.0, abs=1e-3)
        assert m["image_auc"] == pytest.approx(1.0)
        lo, hi = m["ci"]["dice_pooled"]
        assert lo == pytest.approx(1.0, abs=1e-6) and hi == pytest.approx(1.0, abs=1e-6)
        froc = report["froc"][les]
        assert froc["froc_score"] == pytest.approx(1.0) and froc["n_false_positive_proposals"] == 0
    assert seg["mean"]["dice_pooled"] == pytest.approx(1.0, abs=1e-6)
    chance = report["random_area_baseline"]   # the true masks beat a random mask of their own area
    for les in (*LESIONS, "any"):
        assert chance[les]["dice"] == pytest.approx(1.0, abs=1e-6), les
        assert 0 < chance[les]["random_dice"] < 0.5, les


def test_missing_prediction_files_count_as_empty(idrid_folder, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(idrid_folder / "masks", pred)
    shutil.rmtree(pred / "HE")  # no haemorrhage predicted anywhere
    # EX predicted everywhere in the image: every FOV pixel is a false positive where there is no EX
    for p in (idrid_folder / "images").glob("*.jpg"):
        Image.fromarray(np.full((240, 320), 255, np.uint8)).save(pred / "EX" / f"{p.stem}_EX.png")
    report = _evaluate(idrid_folder, tmp_path / "r.json", "--predictions", str(pred), "--froc-mode", "iou")
    seg = report["segmentation"]
    assert seg["HE"]["dice_pooled"] == pytest.approx(0.0)
    assert seg["HE"]["fn"] == seg["HE"]["n_pos_pixels"] > 0
    assert seg["MA"]["dice_pooled"] == pytest.approx(1.0, abs=1e-6)
    ex = seg["EX"]
    assert ex["tp"] == ex["n_pos_pixels"] and ex["fp"] == ex["n_neg_pixels"]  # everything inside the FOV is "EX"
    assert ex["dice_pooled"] == pytest.approx(2 * ex["tp"] / (2 * ex["tp"] + ex["fp"]))
    assert "intersection / union" in report["froc_variant"]
    chance = report["random_area_baseline"]
    # a mask of the whole field of view lands the same wherever it is "placed": no better than chance
    assert chance["EX"]["random_dice"] == pytest.approx(chance["EX"]["dice"], rel=1e-6)
    assert chance["HE"]["dice"] == 0.0 and chance["HE"]["random_dice"] == 0.0   # nothing predicted
    # one FOV-sized proposal per image: under IoU >= 50 % it matches no small exudate
    assert report["froc"]["EX"]["froc_score"] == pytest.approx(0.0)


def test_checkpoint_of_a_tiny_model_and_the_val_split(idrid_folder, tmp_path):
    model = tmp_path / "model"
    conf = ["--conf", "models", "lesion_seg", "--conf", "profile", "tiny", "--conf", "model_dir", str(model)]
    cli("train", "lesion_seg", "--dataset", f"idrid:{idrid_folder}", *conf, "--epochs", "2")
    ckpt = model / "lesion_seg.pt"
    assert ckpt.is_file()
    report = _evaluate(idrid_folder, tmp_path / "ckpt.json", "--checkpoint", str(ckpt), "--split", "val",
                       "--conf", "profile", "tiny")
    assert report["images"] == ["IDRiD_05"] and report["split"] == "val"
    assert report["model"]["checkpoint"] == str(ckpt.resolve())
    for les in LESIONS:
        m = report["segmentation"][les]
        assert set(m) >= {"dice_pooled", "dice_per_image_mean", "iou_pooled", "auc_pr", "auc_roc", "image_auc", "ci"}
        assert m["auc_roc"] is None or 0.0 <= m["auc_roc"] <= 1.0
        assert set(report["froc"][les]) >= {"froc_score", "sensitivity", "fp_rates"}
    assert "served_masks" not in report   # no component rule: the served masks are the thresholded maps
    # with component rules the report scores the masks the label map would hold (the same function as /infer)
    ruled = _evaluate(idrid_folder, tmp_path / "rules.json", "--checkpoint", str(ckpt), "--split", "val",
                      "--conf", "profile", "tiny", "--conf", "lesion_seg_set", "inference.min_peak=0.9,inference.min_area_ppm=50")
    sm = ruled["served_masks"]
    assert sm["min_peak"] == 0.9 and sm["min_area_ppm"] == 50.0 and set(sm["dice_pooled"]) == set(LESIONS)
    assert ruled["segmentation"] == report["segmentation"]   # probability metrics do not depend on the rules


def test_evaluate_uses_the_preprocessing_the_checkpoint_records(idrid_folder, tmp_path):
    """evaluate lesion_seg --checkpoint: a checkpoint trained with local contrast is evaluated with it (the file
    records it) without a --conf; a --conf that says otherwise is refused as the server refuses it."""
    model = tmp_path / "model"
    conf = ["--conf", "models", "lesion_seg", "--conf", "profile", "tiny", "--conf", "model_dir", str(model)]
    cli("train", "lesion_seg", "--dataset", f"idrid:{idrid_folder}", *conf, "--epochs", "1",
        "--conf", "lesion_seg_set", "preprocess.method=local_contrast")
    ckpt = model / "lesion_seg.pt"
    import torch

    assert torch.load(ckpt, weights_only=True)["preprocess"] == {"method": "local_contrast"}
    report = _evaluate(idrid_folder, tmp_path / "lc.json", "--checkpoint", str(ckpt), "--split", "val",
                       "--conf", "profile", "tiny")
    assert report["images"] == ["IDRiD_05"] and report["segmentation"]["mean"]["auc_pr"] is not None
    out = subprocess.run([sys.executable, "-m", "monailabel_dr.cli", "evaluate", "lesion_seg", "--dataset",
                          f"idrid:{idrid_folder}", "--split", "val", "--checkpoint", str(ckpt), "--conf", "profile", "tiny",
                          "--conf", "lesion_seg_set", "preprocess.method=none"], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=600)
    assert out.returncode != 0 and "trained with preprocess" in out.stderr


def test_lesion_sam_ablations_train_and_evaluate(idrid_folder, tmp_path):
    """The paper's Table 3 switches: bare lesion names and no injectors, trained and evaluated alike."""
    import torch

    model = tmp_path / "model"
    conf = ["--conf", "models", "lesion_sam", "--conf", "profile", "tiny", "--conf", "model_dir", str(model)]
    ablation = ["--text-mode", "name", "--injector", "off"]
    cli("train", "lesion_sam", "--dataset", f"idrid:{idrid_folder}", *conf, *ablation, "--epochs", "1")
    ckpt = model / "lesion_sam.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    assert not any(k.startswith("injectors.") for k in state)
    assert any(k.startswith("prompt_generator.") for k in state)

    out = tmp_path / "sam.json"
    proc = cli("evaluate", "lesion_sam", "--dataset", f"idrid:{idrid_folder}", "--json", str(out), "--n-boot", "20",
               "--checkpoint", str(ckpt), "--split", "val", "--conf", "profile", "tiny", *ablation,
               "--params", '{"mode": "fast"}')
    assert "dice_pooled" in proc.stdout
    report = json.loads(out.read_text())
    assert report["images"] == ["IDRiD_05"]
    assert report["profile_network"]["text_mode"] == "name" and report["profile_network"]["injector"] is False
    assert report["params"] == {"mode": "fast"}
    assert set(report["segmentation"]) >= set(LESIONS)

    # the injector-free checkpoint does not fit the model with injectors: a clear error, not a silent load
    bad = subprocess.run([sys.executable, "-m", "monailabel_dr.cli", "evaluate", "lesion_sam", "--dataset",
                          f"idrid:{idrid_folder}", "--checkpoint", str(ckpt), "--split", "val", "--conf", "profile",
                          "tiny", "--n-boot", "5"], capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert bad.returncode != 0
    assert "trained tensors missing" in bad.stdout + bad.stderr


def test_negatives_from_healthy_training_patients(idrid_folder, tmp_path):
    """negatives_source grades:<folder>: the grade-0 eyes of the training patients only, as empty masks,
    and a lesion_seg run trains with them."""
    from test_real_grading import _graded_folder

    from monailabel_dr.fundus.patients import patient_split
    from monailabel_dr.lib.importers import read_grades_csv
    from monailabel_dr.lib.trainers.lesion_data import negative_items

    graded = _graded_folder(tmp_path / "graded", n_patients=12, size=(240, 320))
    grades = read_grades_csv(str(graded / "grades.csv"))
    ids = sorted(grades)
    train, val = patient_split(ids, [grades[i] for i in ids], val_fraction=0.2)
    items = negative_items(f"grades:{graded}")
    got = {it["id"].split(":", 1)[1] for it in items}
    assert got and got == {i for i in train if grades[i] == 0}
    assert not got & set(val) and all(it["masks"] == {} and it["split"] == "train" for it in items)
    assert len(negative_items(f"grades:{graded}", max_n=2)) == 2
    with pytest.raises(Exception, match="grades:<folder>"):
        negative_items(f"idrid:{graded}")
    model = tmp_path / "model"
    conf = ["--conf", "models", "lesion_seg", "--conf", "profile", "tiny", "--conf", "model_dir", str(model)]
    out = cli("train", "lesion_seg", "--dataset", f"idrid:{idrid_folder}", *conf, "--epochs", "1",
              "--params", json.dumps({"negatives_source": f"grades:{graded}", "negatives_max": 3}))
    assert json.loads(out.stdout[out.stdout.index("{"):])["epoch"] == 1
    from monailabel_dr.fundus.idrid import idrid_split, list_idrid
    from monailabel_dr.lib.checkpoints import read_record

    idrid_train, idrid_val = idrid_split(list_idrid(str(idrid_folder)))
    record = read_record(str(model / "lesion_seg.pt"))
    assert record["n_train"] == len(idrid_train) + 3 and record["n_val"] == len(idrid_val)   # the 3 healthy eyes trained
    # the per-lesion thresholds the trainer chose on its validation images are in the record, and evaluate
    # reports Dice at the thresholds the task serves (profile thresholds: validation) beside Dice at 0.5
    from monailabel_dr.lib.checkpoints import operating_thresholds

    stored = operating_thresholds(record, LESIONS)
    assert stored is not None
    report = _evaluate(idrid_folder, tmp_path / "served.json", "--checkpoint", str(model / "lesion_seg.pt"), *conf,
                       "--conf", "lesion_seg_set", "inference.thresholds=validation", "--split", "val")
    assert report["served_thresholds"]["thresholds"] == stored
    assert report["served_thresholds"]["source"].startswith("validation")
    seg = report["segmentation"]
    assert report["segmentation"]["threshold"] == 0.5
    for les in LESIONS:
        if "dice_pooled_operating" in seg[les]:
            assert seg[les]["operating_threshold"] == stored[les]
