"""What the healthy-eye benchmarks share (bench/grade0_*.py, bench/component_rules_sweep.py): the grade-0
photographs of the graded_dr validation patients, and the served `lesion_seg` task of a checkpoint."""

from __future__ import annotations

import csv
import os
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
GRADED = os.path.join(ROOT, "..", "shared", "data", "graded_dr")


def add_task_args(p, profile: str = "cpu_negatives") -> None:
    """The checkpoint, profile and profile overrides of the served `lesion_seg` a benchmark runs."""
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--profile", default=profile)
    p.add_argument("--set", help="profile overrides as --conf lesion_seg_set takes them, e.g. image_size=1536")


def lesion_task(a):
    """The `lesion_seg` infer task of ``a.checkpoint`` as the server builds it (the /infer code path)."""
    from monailabel_dr.cli import make_app

    conf = {"models": "lesion_seg", "lesion_seg_profile": a.profile, "model_dir": tempfile.mkdtemp(prefix="mldr_bench_"),
            "device": "cpu", "lesion_seg_checkpoint": os.path.realpath(a.checkpoint)}
    if a.set:
        conf["lesion_seg_set"] = a.set
    return make_app(tempfile.mkdtemp(prefix="mldr_bench_store_"), conf)._infers["lesion_seg"]


def grade0_images(folder: str = GRADED, split: str = "val") -> list[tuple[str, str]]:
    """``(id, path)`` of the grade-0 photographs of ``split``'s patients (the grading trainer's patient split:
    the validation patients are never trained on, the lesion trainer's negatives come from the others)."""
    from monailabel_dr.fundus.patients import patient_split

    with open(os.path.join(folder, "grades.csv")) as f:
        grades = {r["image"]: int(r["grade"]) for r in csv.DictReader(f)}
    ids = sorted(grades)
    train, val = patient_split(ids, [grades[i] for i in ids], val_fraction=0.2)
    chosen = {"val": val, "train": train, "all": ids}[split]
    files = {os.path.splitext(n)[0]: os.path.join(folder, "images", n) for n in os.listdir(os.path.join(folder, "images"))}
    return [(i, files[i]) for i in sorted(chosen) if grades[i] == 0]
