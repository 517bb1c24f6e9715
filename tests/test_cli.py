"""`monailabel-dr` subcommands: demo, import (grades CSV, IDRiD layout), train, infer, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import IDRID, ROOT
from monailabel_dr.cli import main
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.lesions import LESION_VALUES


def run_cli(*args: str) -> dict:
    """Run the console script as a user would and parse its JSON output."""
    out = subprocess.run([sys.executable, "-m", "monailabel_dr.cli", *args], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    text = out.stdout
    return json.loads(text[text.index("{"):])


def test_demo_train_infer_evaluate(tmp_path):
    store, model = tmp_path / "store", tmp_path / "model"
    summary = run_cli("demo", str(store), "--n", "30", "--labelled", "24", "--size", "200x260")
    assert summary["images"] == 30 and summary["labelled"] == 24
    assert len(list(store.glob("*.jpg"))) == 30
    assert len(list((store / "labels" / "final").glob("*.grade.json"))) == 24

    conf = ["--conf", "profile", "tiny", "--conf", "model_dir", str(model)]
    stats = run_cli("train", "grading", "--studies", str(store), *conf, "--epochs", "2")
    assert stats["epoch"] == 2 and "train_kappa" in stats["train"]["metrics"]
    assert (model / "grading.pt").is_file()

    res = run_cli("infer", "grading", "--studies", str(store), *conf, "--image", "fundus_0000")
    assert len(res["grade_probabilities"]) == 5

    out = tmp_path / "cam.nii.gz"
    res = run_cli("infer", "cam", "--studies", str(store), *conf, "--file", str(store / "fundus_0001.jpg"),
                  "--params", json.dumps({"result_extension": ".nii.gz"}), "--output", str(out))
    assert fio.read_label(out).shape == (200, 260)
    assert "regions" in res

    # a whole folder, one JSON line per image, labels into a folder
    outdir = tmp_path / "batch"
    proc = subprocess.run([sys.executable, "-m", "monailabel_dr.cli", "infer", "cam", "--studies", str(store), *conf,
                           "--all", "--output", str(outdir)], capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"image"')]
    assert len(lines) == 30 and all("regions" in r for r in lines)
    assert len(list(outdir.glob("*_cam.png"))) == 30 and len(list(outdir.glob("*_cam.json"))) == 30

    report = run_cli("evaluate", "grading", *conf, "--phantoms", "12", "--size", "200x260")
    assert report["n"] == 12 and report["data"]["first_seed"] == 1_000_000
    assert -1 <= report["quadratic_weighted_kappa"] <= 1
    assert np.array(report["confusion_matrix"]).sum() == 12


def test_import_grades_csv(tmp_path):
    store = tmp_path / "store"
    run_cli("demo", str(store), "--n", "6", "--labelled", "0", "--size", "200x260")
    csv = tmp_path / "grades.csv"
    csv.write_text("Image name,Retinopathy grade\nfundus_0000.jpg,3\nfundus_0001,0\nmissing_eye.jpg,2\n")
    out = run_cli("import", "--studies", str(store), "--grades", str(csv), "--conf", "model_dir", str(tmp_path / "m"))
    assert out["grades_imported"] == 2 and out["missing_images"] == ["missing_eye"]
    g = json.loads((store / "labels" / "final" / "fundus_0000.grade.json").read_text())
    assert g["grade"] == 3
    # a malformed CSV is refused with a message, nothing written
    bad = tmp_path / "bad.csv"
    bad.write_text("image,grade\nfundus_0002,seven\n")
    with pytest.raises(ValueError, match="not an integer"):
        main(["import", "--studies", str(store), "--grades", str(bad), "--conf", "model_dir", str(tmp_path / "m")])
    assert not (store / "labels" / "final" / "fundus_0002.grade.json").exists()


@pytest.mark.skipif(not IDRID.is_dir(), reason="../shared/data/idrid_train not present")
def test_import_idrid_layout(tmp_path):
    store = tmp_path / "store"
    out = run_cli("import", "--studies", str(store), "--idrid", str(IDRID), "--limit", "2",
                  "--conf", "model_dir", str(tmp_path / "m"))
    assert out["idrid_images"] == 2
    lab = fio.read_label(store / "labels" / "final" / "IDRiD_01.png")
    img = fio.read_image(store / "IDRiD_01.jpg")
    assert lab.shape == img.shape[:2] == (2848, 4288)
    # exudates of the original mask are label 3 wherever no smaller lesion was painted over them
    ex = fio.read_label(IDRID / "masks" / "EX" / "IDRiD_01_EX.png") > 0
    assert ex.sum() > 0
    assert np.mean(lab[ex] == LESION_VALUES["EX"]) > 0.9
    ma = fio.read_label(IDRID / "masks" / "MA" / "IDRiD_01_MA.png") > 0
    assert np.all(lab[ma] == LESION_VALUES["MA"])  # MA painted last: never hidden
    ds = json.loads((store / "datastore_v2.json").read_text())
    assert ds["objects"]["IDRiD_01"]["labels"]["final"]["info"]["lesion_presence"]["EX"] is True


def _listing(folder) -> dict:
    """Every entry under ``folder`` (hidden ones too) with its size, mtime and content hash."""
    import hashlib

    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (p.is_dir(), st.st_size, st.st_mtime_ns,
                                           None if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def test_read_only_commands_leave_the_folder_as_it_was(tmp_path):
    """infer (--all, --image) and evaluate only read --studies: no datastore_v2.json, .lock or labels/ appear
    in a plain folder of photographs, and a datastore folder keeps every byte and timestamp."""
    import shutil

    store, model = tmp_path / "store", tmp_path / "model"
    run_cli("demo", str(store), "--n", "8", "--labelled", "6", "--size", "200x260")
    conf = ["--conf", "profile", "tiny", "--conf", "model_dir", str(model), "--conf", "models", "grading"]
    run_cli("train", "grading", "--studies", str(store), *conf, "--epochs", "1")
    plain = tmp_path / "photos"
    plain.mkdir()
    for p in sorted(store.glob("*.jpg"))[:3]:
        shutil.copy(p, plain / p.name)
    for folder in (plain, store):
        before = _listing(folder)
        proc = subprocess.run([sys.executable, "-m", "monailabel_dr.cli", "infer", "grading", "--studies", str(folder),
                               *conf, "--all"], capture_output=True, text=True, cwd=str(ROOT), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len([line for line in proc.stdout.splitlines() if line.startswith('{"image"')]) == len(list(folder.glob("*.jpg")))
        res = run_cli("infer", "cam", "--studies", str(folder), *conf, "--image", sorted(folder.glob("*.jpg"))[0].stem)
        assert "regions" in res
        assert _listing(folder) == before, folder
    before = _listing(store)
    report = run_cli("evaluate", "grading", "--studies", str(store), *conf)
    assert report["n"] == 6 and report["data"]["studies"] == str(store.resolve())
    assert _listing(store) == before


def test_a_train_key_typo_stops_the_cli_with_the_accepted_keys(tmp_path):
    """A typo in `--conf <model>_set train.*` ends the command with one line naming the key and the accepted
    ones (exit status non-zero, no traceback), before anything is read or trained."""
    out = subprocess.run([sys.executable, "-m", "monailabel_dr.cli", "train", "lesion_seg", "--studies", str(tmp_path),
                          "--conf", "models", "lesion_seg", "--conf", "lesion_seg_set", "train.learnig_rate=0.1",
                          "--conf", "model_dir", str(tmp_path / "model")],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert out.returncode != 0
    assert "unknown key(s) ['learnig_rate']" in out.stderr and "'learning_rate'" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "model").exists()
