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


def _predicted_masks_folder(folder: str, image_id: str, shape) -> dict[str, np.ndarray]:
    """Probabilities from a folder of predicted masks in the IDRiD layout (<LES>/<ID>_<LES>.png, 0-255 or 0/1)."""
    from monailabel_dr.fundus.lesions import LESIONS

    out = {}
    for les in LESIONS:
        p = os.path.join(folder, les, f"{image_id}_{les}.png")
        if os.path.isfile(p):
            a = io.read_label(p, shape=shape).astype(np.float32)
            out[les] = a / 255.0 if a.max() > 1 else a
        else:
            out[les] = np.zeros(shape, np.float32)
    return out


def evaluate_lesions(dataset: str, task=None, predictions: str | None = None, split: str = "all",
                     n_boot: int = 1000, threshold: float = 0.5, froc_threshold: float = 0.5,
                     froc_mode: str = "gt", froc_overlap: float = 0.5, params: dict | None = None) -> dict:
    """Lesion segmentation metrics on an IDRiD-layout folder, at full resolution.

    Either ``task`` (a lesion infer task, lesion_seg or lesion_sam: its probability maps, with the
    infer request ``params``) or ``predictions`` (a folder of
    predicted masks in the IDRiD layout) is evaluated against ``dataset``'s masks, inside the field
    of view detected on each photograph. ``split``: ``all`` (every image of the folder), ``val``
    (ids ending in a multiple of 5, as the trainer holds out) or ``train``. FROC proposals are the
    connected components of probability >= ``froc_threshold``; a proposal hits a lesion by
    ``froc_mode`` / ``froc_overlap`` (:class:`FROCAccumulator`; ``gt`` = intersection / lesion
    area, the documented default, which credits one large proposal with every lesion it covers
    by half; ``iou`` does not).
    """
    from monailabel_dr.fundus import geometry
    from monailabel_dr.fundus.idrid import idrid_image_path, idrid_masks, idrid_split, list_idrid
    from monailabel_dr.fundus.lesions import LESIONS
    from monailabel_dr.metrics.lesions import FROCAccumulator, LesionSegAccumulator

    kind, _, folder = dataset.partition(":")
    if kind != "idrid" or not folder:
        raise SystemExit(f"--dataset {dataset!r}: use idrid:<folder>")
    ids = list_idrid(folder)
    train, val = idrid_split(ids)
    ids = {"val": val, "train": train, "all": ids}[split]
    if not ids:
        raise SystemExit(f"evaluate: no image of split '{split}' in {folder}/images")
    seg = LesionSegAccumulator(threshold=threshold)
    froc = {les: FROCAccumulator(overlap=froc_overlap, mode=froc_mode) for les in LESIONS}
    t0 = time.time()
    for image_id in ids:
        img_path = idrid_image_path(folder, image_id)
        if task is not None:
            probs_arr, fov = task.predict(img_path, **(params or {}))
            probs = {les: probs_arr[i] for i, les in enumerate(LESIONS)}
            shape = fov.shape
        else:
            img = io.read_image(img_path)
            fov = geometry.detect_fov(io.to_rgb_float(img))
            shape = fov.shape
            probs = _predicted_masks_folder(predictions, image_id, shape)
        truth = idrid_masks(folder, image_id, shape=shape)
        seg.update(image_id, probs, truth, fov)
        for les in LESIONS:
            froc[les].update_from_map(image_id, probs[les] * fov, truth[les] & fov, threshold=froc_threshold)
    report = {
        "dataset": os.path.realpath(folder),
        "split": split,
        "images": ids,
        "segmentation": seg.compute(n_boot=n_boot),
        "froc": {les: froc[les].compute() for les in LESIONS},
        "froc_variant": f"proposals: connected components of probability >= {froc_threshold}, scored by their max; "
                        + {"gt": f"TP when covering >= {froc_overlap:.0%} of a ground-truth lesion's area",
                           "iou": f"TP when intersection / union with a ground-truth lesion >= {froc_overlap:.0%}",
                           "pixel": "TP when sharing at least one pixel with a ground-truth lesion"}[froc_mode],
        "seconds": round(time.time() - t0, 1),
    }
    if task is not None:
        report["model"] = task.model_json()
        report["working_size"] = task.model.image_size
        report["profile_network"] = task.model.network
        report["params"] = params or {}
    else:
        report["predictions"] = os.path.realpath(predictions)
    return report


def lesion_summary(report: dict) -> str:
    from monailabel_dr.fundus.lesions import LESIONS

    seg = report["segmentation"]
    src = report.get("predictions") or (report.get("model") or {}).get("checkpoint", "")
    rows = [f"{len(report['images'])} images (split {report['split']}) of {report['dataset']}; predictions: {src}",
            "lesion  dice_pooled [95% CI]      auc_pr [95% CI]          auc_roc  image_auc  froc"]
    for les in (*LESIONS, "mean"):
        m = seg.get(les, {})
        ci = m.get("ci", {})

        def f(v):
            return "  nan" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"

        def c(k):
            lo, hi = ci.get(k, [None, None])
            return f"[{f(lo)}, {f(hi)}]"

        fr = report["froc"].get(les, {}).get("froc_score") if les != "mean" else None
        rows.append(f"{les:6s}  {f(m.get('dice_pooled'))} {c('dice_pooled'):16s}  {f(m.get('auc_pr'))} {c('auc_pr'):16s}"
                    f"  {f(m.get('auc_roc'))}    {f(m.get('image_auc'))}      {f(fr)}")
    return "\n".join(rows)
