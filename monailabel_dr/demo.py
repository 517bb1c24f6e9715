"""Write the demo datastore: synthetic fundus phantoms, some with grade labels.

Layout (what MONAI Label's local datastore reads):
``DIR/fundus_0000.jpg`` ... images, ``DIR/labels/final/fundus_0000.grade.json`` for
the labelled subset, and ``DIR/demo_truth.csv`` with every image's true grade and
lesion presence (so users can check the server's answers on unlabelled images).
Nothing here imports MONAI Label.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from monailabel_dr.fundus import io
from monailabel_dr.fundus.labels import GRADE_LABEL_SUFFIX, GradeLabel, write_grade_label
from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.fundus.phantoms import make_phantom

TRUTH_FILE = "demo_truth.csv"


def _one(args):
    i, seed, size, folder, prefix = args
    ph = make_phantom(seed, size=size)
    image_id = f"{prefix}{i:04d}"
    io.write_image(os.path.join(folder, image_id + ".jpg"), ph.image)
    return image_id, ph.grade, ph.lesion_presence()


def write_demo(folder: str, n: int = 600, labelled: int = 240, seed: int = 0, size: tuple[int, int] = (480, 640),
               prefix: str = "fundus_", workers: int | None = None) -> dict:
    """Generate ``n`` phantoms (seeds ``seed .. seed+n-1``); label a random ``labelled`` of them."""
    if labelled > n:
        raise ValueError("labelled must be <= n")
    os.makedirs(folder, exist_ok=True)
    label_dir = os.path.join(folder, "labels", "final")
    os.makedirs(label_dir, exist_ok=True)
    jobs = [(i, seed + i, tuple(size), folder, prefix) for i in range(n)]
    workers = workers or min(2, os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            rows = list(ex.map(_one, jobs, chunksize=8))
    else:
        rows = [_one(j) for j in jobs]
    rng = np.random.default_rng(seed + 7919)
    chosen = set(rng.choice(n, size=labelled, replace=False).tolist()) if labelled else set()
    with open(os.path.join(folder, TRUTH_FILE), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "grade", *LESIONS, "labelled"])
        for i, (image_id, grade, presence) in enumerate(rows):
            is_labelled = i in chosen
            w.writerow([image_id, grade, *[int(presence[les]) for les in LESIONS], int(is_labelled)])
            if is_labelled:
                write_grade_label(os.path.join(label_dir, image_id + GRADE_LABEL_SUFFIX),
                                  GradeLabel(grade=int(grade), lesions=dict(presence), extra={"source": "demo phantom"}))
    grades = [r[1] for r in rows]
    return {"folder": os.path.realpath(folder), "images": n, "labelled": len(chosen),
            "grade_counts": {g: grades.count(g) for g in range(5)}}


def read_truth(folder: str) -> dict[str, dict]:
    with open(os.path.join(folder, TRUTH_FILE)) as f:
        return {r["image"]: {"grade": int(r["grade"]), **{les: int(r[les]) for les in LESIONS},
                             "labelled": int(r["labelled"])} for r in csv.DictReader(f)}
