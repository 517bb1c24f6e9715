"""Grading on real photographs (issue 16): patient split, local contrast, the balanced ordinal loss,
the smoothed selection, grading metrics with patient bootstrap, and `evaluate grading --dataset grades:`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from monailabel_dr.fundus.patients import patient_id, patient_split, split_description
from monailabel_dr.fundus.preprocess import local_contrast, parse_preprocess
from monailabel_dr.metrics.grading import grading_report, selection_score, sensitivity_specificity
from monailabel_dr.fundus.labels import make_targets
from monailabel_dr.networks.cam_grader import GraderLoss, grade_class_weights

from conftest import ROOT


# ----------------------------------------------------------------------------- patients and the split
@pytest.mark.parametrize("image_id, patient", [
    ("Patient012_L", "Patient012"), ("Patient012_R", "Patient012"), ("13_left", "13"), ("13_right", "13"),
    ("P7-OD", "P7"), ("P7 os", "P7"), ("IDRiD_05", "IDRiD_05"), ("eye_l2", "eye_l2"), ("L", "L"),
])
def test_patient_id(image_id, patient):
    assert patient_id(image_id) == patient


def test_patient_split_keeps_patients_together_and_balances_grades():
    rng = np.random.default_rng(0)
    ids, grades = [], []
    for p in range(100):
        g = int(rng.choice(5, p=[0.45, 0.17, 0.28, 0.06, 0.04]))
        for eye in ("L", "R"):
            ids.append(f"Patient{p:03d}_{eye}")
            grades.append(g)
    train, val = patient_split(ids, grades, 0.2)
    assert len(train) + len(val) == len(ids) and not set(train) & set(val)
    assert not {patient_id(i) for i in train} & {patient_id(i) for i in val}
    assert 0.15 <= len(val) / len(ids) <= 0.25
    by_id = dict(zip(ids, grades))
    val_grades = {by_id[i] for i in val}
    assert {0, 1, 2} <= val_grades           # stratified: the common grades are all in validation
    assert patient_split(ids, grades, 0.2) == (train, val)   # a function of the ids, grades and seed
    assert patient_split(ids, grades, 0.2, seed=1) != (train, val)
    d = split_description(train, val)
    assert d["kind"] == "patient" and d["shared_patients"] == 0 and d["val_patients"] == len({patient_id(i) for i in val})


def test_ids_without_eye_suffix_split_by_image():
    ids = [f"IDRiD_{i:02d}" for i in range(1, 31)]
    train, val = patient_split(ids, [0] * 30, 0.2)
    assert len(val) == 6 and split_description(train, val)["kind"] == "image"
    assert patient_split(ids, None, 0.0) == (ids, [])


# ----------------------------------------------------------------------------- local contrast
def _disc(size=128):
    yy, xx = np.mgrid[:size, :size]
    return (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= (size / 2 - 2) ** 2


def test_local_contrast_flattens_illumination_and_keeps_small_lesions():
    fov = _disc()
    yy, xx = np.mgrid[:128, :128]
    # a left-to-right illumination ramp and an orange retina, with one dark 3 px "microaneurysm"
    ramp = (0.3 + 0.5 * xx / 127.0)[..., None] * np.array([0.9, 0.45, 0.2])[None, None]
    img = ramp.astype(np.float32)
    img[60:63, 90:93] *= 0.5
    img[~fov] = 0
    out = local_contrast(img, fov)
    inside = fov.copy()
    inside[55:68, 85:98] = False
    # illumination and the rim drop out: the retina away from the lesion is ~ neutral grey, also at the edge
    assert np.abs(out[inside] - 0.5).max() < 0.08
    # the lesion stands out well below the background
    assert out[61, 91].mean() < 0.3
    assert np.all(out[~fov] == 0.5)
    assert out.dtype == np.float32 and out.shape == img.shape


def test_parse_preprocess_refuses_unknown_settings():
    assert parse_preprocess(None) == {"method": "none"}
    assert parse_preprocess("local_contrast") == {"method": "local_contrast"}
    assert parse_preprocess({"method": "local_contrast", "gain": 3})["gain"] == 3.0
    for bad in ({"method": "clahe"}, {"method": "local_contrast", "gian": 4}, {"method": "none", "gain": 4},
                {"method": "local_contrast", "gain": -1}):
        with pytest.raises(ValueError):
            parse_preprocess(bad)


def test_profile_preprocess_typos_are_conf_errors(tmp_path):
    from monailabel_dr.config import ConfError, parse_conf

    s = parse_conf({"models": "grading", "grading_profile": "real"}, str(tmp_path))
    assert s.models["grading"].options["preprocess"]["method"] == "local_contrast"
    with pytest.raises(ConfError, match="gian"):
        parse_conf({"models": "grading", "grading_profile": "real", "grading_set": "preprocess.gian=3"}, str(tmp_path))


# ----------------------------------------------------------------------------- loss
def test_grade_class_weights():
    w = grade_class_weights([0] * 16 + [1] * 4 + [2] * 1)
    # (16/n) ** 0.5 = 1, 2, 4 for the grades present, then scaled to mean 1; absent grades get the largest
    assert w[0] < w[1] < w[2] and w[3] == w[4] == w[2]
    assert np.mean(w[:3]) == pytest.approx(1.0)
    assert w[1] / w[0] == pytest.approx(2.0, rel=1e-4) and w[2] / w[0] == pytest.approx(4.0, rel=1e-4)


def test_ordinal_loss_costs_a_distant_wrong_grade_more():
    loss = GraderLoss(ordinal_weight=1.0, referable_weight=0.0, lesion_weight=0.0)
    target = torch.tensor([make_targets(4, None)])
    near = torch.tensor([[0, 0, 0, 5.0, 0, 0, 0, 0, 0, 0]])   # says grade 3
    far = torch.tensor([[5.0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])    # says grade 0
    plain = GraderLoss(referable_weight=0.0, lesion_weight=0.0)
    assert plain(near, target) == pytest.approx(float(plain(far, target)))    # cross-entropy: the same
    assert loss(far, target) > loss(near, target) + 0.5
    weighted = GraderLoss(class_weights=[1, 1, 1, 1, 4], referable_weight=0.0, lesion_weight=0.0)
    both = torch.tensor([make_targets(4, None), make_targets(0, None)])
    logits = torch.zeros(2, 10)
    logits[1, 0] = 5.0   # grade 0 right, grade 4 wrong: the weighted loss counts the wrong grade-4 eye more
    assert weighted(logits, both) > plain(logits, both)
    with pytest.raises(ValueError):
        GraderLoss(class_weights=[1, 1, 1])


# ----------------------------------------------------------------------------- metrics
def test_grading_report_operating_point_and_patient_bootstrap():
    t = np.array([0, 0, 1, 2, 3, 4, 0, 2])
    probs = np.eye(5)[t] * 0.8 + 0.04
    ref = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.2, 0.7])
    ss = sensitivity_specificity(t, ref, 0.5)
    assert (ss["tp"], ss["fn"], ss["tn"], ss["fp"]) == (3, 1, 3, 1)
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    rep = grading_report(t, probs, ref, groups=groups, n_boot=200)
    assert rep["quadratic_weighted_kappa"] == pytest.approx(1.0) and rep["accuracy"] == 1.0
    assert rep["referable_sensitivity"] == 0.75 and rep["referable_specificity"] == 0.75
    assert rep["bootstrap"]["unit"] == "patient"
    lo, hi = rep["ci95"]["referable_sensitivity"]
    assert 0 <= lo <= 0.75 <= hi <= 1
    assert np.array(rep["confusion_matrix"]).trace() == 8
    assert selection_score(t, probs, ref) == pytest.approx((1.0 + rep["referable_auc"]) / 2)


# ----------------------------------------------------------------------------- trainer + evaluate
def _graded_folder(root, n_patients=12, size=(300, 400), seed=0):
    """A graded folder (images/ + grades.csv with extra columns) of phantoms named like graded_dr."""
    from monailabel_dr.fundus import io as fio
    from monailabel_dr.fundus.phantoms import make_phantom

    (root / "images").mkdir(parents=True)
    rows = ["image,grade,maculopathy,source_class"]
    for p in range(n_patients):
        g = p % 5
        for k, eye in enumerate(("L", "R")):
            ph = make_phantom(seed + 2 * p + k, size=size, grade=g)
            fio.write_image(root / "images" / f"Patient{p:03d}_{eye}.jpg", ph.image)
            rows.append(f"Patient{p:03d}_{eye},{g},0,class {g}")
    (root / "grades.csv").write_text("\n".join(rows) + "\n")
    return root


def _cli(*args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "monailabel_dr.cli", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_import_train_by_patient_and_evaluate_from_the_checkpoint(tmp_path):
    folder = _graded_folder(tmp_path / "graded")
    store, model_dir = tmp_path / "store", tmp_path / "model"
    out = _cli("import", "--studies", str(store), "--grades", str(folder / "grades.csv"), "--images", str(folder / "images"))
    assert json.loads(out.stdout[out.stdout.index("{"):])["grades_imported"] == 24
    out = _cli("train", "grading", "--studies", str(store), "--conf", "models", "grading",
               "--conf", "grading_profile", "tiny_real", "--conf", "model_dir", str(model_dir))
    stats = json.loads(out.stdout[out.stdout.index("{"):])
    split = stats["split"]
    assert split["kind"] == "patient" and split["shared_patients"] == 0
    assert split["train_images"] + split["val_images"] == 24 and split["val_images"] % 2 == 0
    assert "val_select" in stats["eval"]["metrics"] and "val_referable_auc" in stats["eval"]["metrics"]
    published = json.loads((model_dir / "grading" / "train_stats.json").read_text()) \
        if (model_dir / "grading" / "train_stats.json").exists() else None
    if published is not None:
        assert published["split"]["kind"] == "patient"
    ckpt = model_dir / "grading.pt"
    rec = torch.load(ckpt, weights_only=True)["grading_profile"]
    assert rec["name"] == "tiny_real" and rec["preprocess"]["method"] == "local_contrast"

    # a folder of full-size originals the model never saw; no --conf: the profile comes from the checkpoint
    # (the default profile's network would not load these weights)
    test = tmp_path / "heldout"
    _graded_folder(test, n_patients=1, size=(2592, 3872), seed=500)
    report = tmp_path / "out.json"
    out = _cli("evaluate", "grading", "--dataset", f"grades:{test}", "--checkpoint", str(ckpt), "--json", str(report),
               "--n-boot", "50")
    rep = json.loads(report.read_text())
    assert rep["n"] == 2 and rep["data"]["patients"] == 1
    assert rep["profile_from_checkpoint"]["name"] == "tiny_real"
    assert all(p["image_size"] == [2592, 3872] for p in rep["per_image"])
    for k in ("quadratic_weighted_kappa", "accuracy", "referable_auc", "referable_sensitivity", "referable_specificity",
              "confusion_matrix", "ci95", "operating_point"):
        assert k in rep
    assert "quadratic_weighted_kappa" in out.stdout

    # the CAM paper's evaluation of the served proposals on an IDRiD-layout folder (phantoms here)
    from conftest import write_idrid_phantoms
    from monailabel_dr.fundus.phantoms import make_phantom

    idrid = write_idrid_phantoms(tmp_path / "idrid", [make_phantom(900 + k, size=(300, 400), grade=2 + k % 3)
                                                      for k in range(3)])
    cam_json = tmp_path / "cam.json"
    out = _cli("evaluate", "cam", "--dataset", f"idrid:{idrid}", "--checkpoint", str(ckpt), "--json", str(cam_json))
    cam = json.loads(cam_json.read_text())
    assert cam["data"]["n"] == 3 and cam["params"]["target"] == "referable"
    for k in ("MA", "HE", "EX", "SE", "any"):
        for rule in ("overlap_rule", "lenient"):
            assert len(cam["froc"][k][rule]["sensitivity"]) == 7
        assert 0 <= cam["cam_mass"][k]["fraction_inside"] <= 1 and 0 <= cam["cam_mass"][k]["area_fraction"] <= 1
    assert cam["froc"]["any"]["lenient"]["mode"] == "pixel" and cam["froc"]["any"]["overlap_rule"]["overlap"] == 0.5
    # lenient detection finds at least what the 50 % rule finds
    assert all(a >= b for a, b in zip(cam["froc"]["any"]["lenient"]["sensitivity"], cam["froc"]["any"]["overlap_rule"]["sensitivity"]))
    assert "mass-in" in out.stdout

    # --split val evaluates exactly the trainer's validation patients
    out = _cli("evaluate", "grading", "--dataset", f"grades:{folder}", "--checkpoint", str(ckpt), "--split", "val",
               "--json", str(report), "--n-boot", "0")
    rep = json.loads(report.read_text())
    assert rep["n"] == split["val_images"] and rep["data"]["split_info"]["shared_patients"] == 0


def test_evaluate_graded_folder_errors_are_clear(tmp_path):
    folder = _graded_folder(tmp_path / "graded", n_patients=1)
    (folder / "images" / "Patient000_R.jpg").unlink()
    ckpt = tmp_path / "none.pt"
    r = subprocess.run([sys.executable, "-m", "monailabel_dr.cli", "evaluate", "grading", "--dataset", f"grades:{folder}",
                        "--checkpoint", str(ckpt)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "no such file" in (r.stdout + r.stderr)
    shutil.rmtree(folder / "images")
    r = subprocess.run([sys.executable, "-m", "monailabel_dr.cli", "evaluate", "grading", "--dataset", f"grades:{folder}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "images/" in (r.stdout + r.stderr)


# ----------------------------------------------------------------------------- grade rationale from lesions
def _stats(**counts):
    """lesion_seg-style statistics: counts = {"HE": (n, [q1, q2, q3, q4], nearest)}."""
    from monailabel_dr.fundus.lesions import LESIONS

    names = ["superior_nasal", "superior_temporal", "inferior_nasal", "inferior_temporal"]
    out = {}
    for les in LESIONS:
        n, quads, near = counts.get(les, (0, [0, 0, 0, 0], None))
        out[les] = {"components": n, "area_px": 30 * n, "presence_probability": 0.9 if n else 0.1,
                    "components_per_quadrant": dict(zip(names, quads)), "nearest_to_centre": near}
    return out


def test_icdr_rule_and_rationale_text():
    from monailabel_dr.networks.lesion_rationale import icdr_rule, rationale_text

    assert icdr_rule(_stats())[0] == 0
    assert icdr_rule(_stats(MA=(3, [1, 1, 1, 0], 0.6)))[0] == 1
    assert icdr_rule(_stats(MA=(3, [1, 1, 1, 0], 0.6), EX=(2, [0, 2, 0, 0], 0.1)))[0] == 2
    # 4-2-1 rule, first part: more than 20 haemorrhages in each of the 4 quadrants
    assert icdr_rule(_stats(HE=(88, [22, 21, 23, 22], 0.3)))[0] == 3
    assert icdr_rule(_stats(HE=(80, [20, 20, 20, 20], 0.3)))[0] == 2
    txt = rationale_text(_stats(HE=(31, [8, 8, 8, 7], 0.5), EX=(2, [0, 2, 0, 0], 0.1)))
    assert txt == "HE in 4 quadrants, 31 components; EX in 1 quadrant, 2 components; EX near the fovea"
    assert "near the fovea" not in rationale_text(_stats(EX=(2, [0, 2, 0, 0], 0.1)), anatomical=False)


def test_lesion_grade_model_learns_counts_and_round_trips(tmp_path):
    from monailabel_dr.networks.lesion_rationale import LesionGradeModel, lesion_features

    rng = np.random.default_rng(0)
    X, y = [], []
    for g in range(5):
        for _ in range(30):
            n = int(rng.poisson([0.2, 3, 12, 40, 60][g]))
            X.append(lesion_features(_stats(HE=(n, [n // 4] * 4, 0.5), MA=(n + 1, [1, 1, 1, 1], 0.4)), 1e5))
            y.append(g)
    X, y = np.stack(X), np.array(y)
    m = LesionGradeModel.fit(X, y, C=1.0)
    p = m.predict_proba(X)
    assert p.shape == (150, 5) and np.allclose(p.sum(1), 1)
    from monailabel_dr.metrics.grading import quadratic_weighted_kappa

    assert quadratic_weighted_kappa(y, p.argmax(1)) > 0.7
    m.save(str(tmp_path / "r.json"))
    m2 = LesionGradeModel.load(str(tmp_path / "r.json"))
    assert np.allclose(m2.predict_proba(X), p)
    # the stored model gives what scikit-learn gives
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(X)
    ref = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000).fit(sc.transform(X), y)
    assert np.allclose(ref.predict_proba(sc.transform(X)), p, atol=1e-6)
    bad = m.to_dict()
    bad["features"] = bad["features"][:-1]
    with pytest.raises(ValueError):
        LesionGradeModel.from_dict(bad)


def test_import_lesion_presence_marks_model_flags(tmp_path):
    """lesion_seg answers -> lesion flags in grade labels, grades kept, the source recorded."""
    from monailabel_dr.fundus.labels import read_grade_label
    from monailabel_dr.lib.importers import import_grades, import_lesion_presence

    folder = _graded_folder(tmp_path / "graded", n_patients=2)
    from monailabel_dr.cli import make_app

    app = make_app(str(tmp_path), {"models": "grading", "model_dir": str(tmp_path / "m")})
    ds = app.datastore()
    import_grades(ds, str(folder / "grades.csv"), images_dir=str(folder / "images"))
    answers = tmp_path / "answers"
    answers.mkdir()
    ids = sorted(ds.list_images())
    for k, i in enumerate(ids[:-1]):   # the last image has no answer
        st = {les: {"present": les == "HE" and k % 2 == 0, "presence_probability": 0.9 if les == "HE" else 0.1}
              for les in ("MA", "HE", "EX", "SE")}
        (answers / f"{i}_lesion_seg.json").write_text(json.dumps({"lesions": st, "model": {"name": "lesion_seg"}}))
    out = import_lesion_presence(ds, str(answers))
    assert out["lesion_presence_imported"] == len(ids) - 1 and out["missing_answers"] == [ids[-1]]
    g0 = read_grade_label(ds.final_label_files(ids[0])["grade"])
    assert g0.grade == 0 and g0.lesions == {"MA": False, "HE": True, "EX": False, "SE": False}
    assert g0.extra["lesions_source"]["kind"] == "lesion_seg predictions"
    assert read_grade_label(ds.final_label_files(ids[-1])["grade"]).lesions == {}
