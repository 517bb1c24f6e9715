"""Evaluate served models through their infer tasks (the same code path as /infer).

Grading: on the grade labels of a datastore, or on N fresh synthetic phantoms
(seeds the demo never uses) with their known grades.  Metrics come from
:mod:`monailabel_dr.metrics.grading`.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from monailabel_dr.fundus import io
from monailabel_dr.fundus.labels import read_grade_label
from monailabel_dr.metrics.grading import grading_report


def _grade(task, path: str) -> dict:
    _, result = task({"image": path})
    return result


def evaluate_grading(app, studies: str | None = None, phantoms: int | None = None, seed: int = 1_000_000,
                     size: str = "480x640") -> dict:
    task = app._infers["grading"]
    truths, probs, refs = [], [], []
    t0 = time.time()
    if phantoms:
        from monailabel_dr.fundus.phantoms import make_phantom

        h, w = (int(v) for v in size.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(phantoms):
                ph = make_phantom(seed + i, size=(h, w))
                p = io.write_image(os.path.join(tmp, f"ph_{i}.jpg"), ph.image)
                r = _grade(task, p)
                truths.append(ph.grade)
                probs.append(r["grade_probabilities"])
                refs.append(r["referable_probability"])
        data = {"kind": "phantoms", "n": phantoms, "first_seed": seed, "size": size}
    else:
        ds = app.datastore()
        for image_id in sorted(ds.list_images()):
            gl = ds.final_label_files(image_id).get("grade")
            if not gl:
                continue
            g = read_grade_label(gl).grade
            if g is None:
                continue
            r = _grade(task, ds.get_image_uri(image_id))
            truths.append(g)
            probs.append(r["grade_probabilities"])
            refs.append(r["referable_probability"])
        data = {"kind": "datastore", "studies": os.path.realpath(studies or app.studies), "n": len(truths)}
    if not truths:
        raise SystemExit("evaluate: no graded images found")
    report = grading_report(np.asarray(truths), np.asarray(probs), np.asarray(refs))
    report["data"] = data
    report["model"] = task.model_json()
    report["seconds"] = round(time.time() - t0, 1)
    return report
