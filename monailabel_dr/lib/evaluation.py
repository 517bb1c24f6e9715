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


class EvaluationError(ValueError):
    """An evaluation that cannot run on what it was given (no images, a bad split); the message is for the user
    (the CLI prints it and exits non-zero)."""


def _grade(task, path: str) -> dict:
    _, result = task({"image": path})
    return result


def checkpoint_profile(path: str, key: str = "grading_profile") -> dict | None:
    """The profile record a grading checkpoint was published with (``GradingTrainer.publish_payload``),
    or None for a checkpoint without one (older files, bare state dicts)."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    rec = ckpt.get(key) if isinstance(ckpt, dict) else None
    return dict(rec) if isinstance(rec, dict) else None


def conf_for_checkpoint(model: str, record: dict, profiles: dict) -> dict[str, str]:
    """``--conf`` entries that rebuild the network a checkpoint was trained with: its profile by name
    when that profile exists here, with the recorded image size, network and preprocessing laid over
    it (so a profile edited since, or one made with ``<model>_set``, still matches the weights)."""
    import yaml

    base = record.get("name") if record.get("name") in profiles else next(iter(profiles))
    flow = lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()  # noqa: E731
    sets = [f"image_size={int(record['image_size'])}", f"network={flow(record['network'])}",
            f"preprocess={flow(record.get('preprocess') or {'method': 'none'})}"]
    for k in ("val_split", "split_seed"):
        if k in record:
            sets.append(f"train.{k}={record[k]}")
    return {f"{model}_profile": str(base), f"{model}_set": ",".join(sets)}


def read_graded_folder(folder: str) -> list[tuple[str, str, int]]:
    """``(id, image path, grade)`` of a graded folder: ``images/`` and ``grades.csv`` (``image,grade``,
    other columns ignored). Raises ValueError naming what is missing."""
    from monailabel_dr.lib.importers import _find_image, read_grades_csv

    csv_path = os.path.join(folder, "grades.csv")
    img_dir = os.path.join(folder, "images")
    if not os.path.isfile(csv_path) or not os.path.isdir(img_dir):
        raise ValueError(f"grades:{folder}: expected {img_dir}/ and {csv_path} (columns image,grade)")
    grades = read_grades_csv(csv_path)
    out, missing = [], []
    for image_id, g in sorted(grades.items()):
        p = _find_image(img_dir, image_id)
        if p is None:
            missing.append(image_id)
        else:
            out.append((image_id, p, int(g)))
    if missing:
        raise ValueError(f"grades:{folder}: {len(missing)} grades.csv rows have no image in images/, e.g. {missing[:5]}")
    if not out:
        raise ValueError(f"grades:{folder}: grades.csv lists no image")
    return out


def evaluate_graded_folder(task, folder: str, split: str = "all", val_split: float = 0.2, split_seed: int = 0,
                           n_boot: int = 1000, threshold: float = 0.5) -> dict:
    """Grading metrics of the served infer task on a graded folder (:func:`read_graded_folder`), through
    the same infer task as ``/infer/grading``; ``split`` ``val`` / ``train``: the trainer's patient split
    of the folder (:func:`monailabel_dr.fundus.patients.patient_split`, with the checkpoint's
    ``val_split`` / ``split_seed``), ``all`` every image. Bootstrap CIs resample patients."""
    from monailabel_dr.fundus.patients import patient_id, patient_split, split_description

    items = read_graded_folder(folder)
    if split != "all":
        train_ids, val_ids = patient_split([i for i, _, _ in items], [g for _, _, g in items], val_split, seed=split_seed)
        keep = set(val_ids if split == "val" else train_ids)
        split_info = split_description(train_ids, val_ids, seed=split_seed)
        items = [it for it in items if it[0] in keep]
    else:
        split_info = {"kind": "all"}
    t0 = time.time()
    per_image = []
    for image_id, path, g in items:
        r = _grade(task, path)
        per_image.append({"image": image_id, "grade": g, "predicted": r["grade"],
                          "grade_probabilities": r["grade_probabilities"],
                          "referable_probability": r["referable_probability"], "image_size": r["image_size"]})
    report = grading_report(np.asarray([p["grade"] for p in per_image]),
                            np.asarray([p["grade_probabilities"] for p in per_image]),
                            np.asarray([p["referable_probability"] for p in per_image]),
                            threshold=threshold, groups=[patient_id(p["image"]) for p in per_image], n_boot=n_boot)
    report["data"] = {"kind": "grades", "folder": os.path.realpath(folder), "split": split, "split_info": split_info,
                      "n": len(per_image), "patients": len({patient_id(p["image"]) for p in per_image})}
    report["model"] = task.model_json()
    report["seconds"] = round(time.time() - t0, 1)
    report["per_image"] = per_image
    return report


def grading_summary(report: dict) -> str:
    """A few lines for the terminal: the point figures with their CIs and the confusion matrix."""
    ci = report.get("ci95", {})
    lines = [f"grading on {report['data'].get('folder', report['data'].get('kind'))} "
             f"(split {report['data'].get('split', '-')}, {report['n']} images):"]
    for k in ("quadratic_weighted_kappa", "accuracy", "referable_auc", "referable_sensitivity", "referable_specificity"):
        v = report.get(k)
        c = ci.get(k)
        lines.append(f"  {k:24s} {v:.3f}" + (f"  [{c[0]:.3f}, {c[1]:.3f}]" if c else "")
                     if v is not None and np.isfinite(v) else f"  {k:24s} n/a")
    lines.append("  confusion (rows true 0-4, columns predicted 0-4):")
    lines += ["    " + " ".join(f"{v:4d}" for v in row) for row in report["confusion_matrix"]]
    return "\n".join(lines)


def idrid_ids(dataset: str, split: str = "all") -> tuple[str, list[str]]:
    """``(folder, ids)`` of ``idrid:<folder>``: every image (``all``) or the lesion trainers' ``val`` / ``train``
    split (ids ending in 0 or 5 validate); ValueError naming what is wrong."""
    from monailabel_dr.fundus.idrid import idrid_split, list_idrid

    kind, _, folder = dataset.partition(":")
    if kind != "idrid" or not folder:
        raise ValueError(f"--dataset {dataset!r}: use idrid:<folder>")
    ids = list_idrid(folder)
    train, val = idrid_split(ids)
    ids = {"val": val, "train": train, "all": ids}[split]
    if not ids:
        raise ValueError(f"no image of split '{split}' in {folder}/images")
    return folder, ids


def evaluate_cam_lesions(task, dataset: str, split: str = "all", params: dict | None = None,
                         overlap: float = 0.5) -> dict:
    """The CAM paper's evaluation of CAM region proposals on an IDRiD-layout folder (lesion masks, no grades).

    For every photograph, ``task.predict`` runs the served ``/infer/cam`` pipeline (request ``params``, default
    target ``referable``) and its regions are counted, exactly as served: the proposals are
    :func:`~monailabel_dr.metrics.lesions.proposals_from_map` of the served map (checked against the JSON
    answer's regions). Per lesion type and for any lesion: lesion-level FROC (sensitivity at 1/8 ... 8 FP per
    image) with the paper's rule (a region covers >= ``overlap`` of a lesion) and the lenient one (one shared
    pixel); the fraction of the CAM's mass inside lesions against the lesions' share of the field of view,
    which is what a map that knows nothing scores (its expectation for a random map)."""
    from monailabel_dr.fundus.idrid import idrid_image_path, idrid_masks
    from monailabel_dr.fundus.lesions import LESIONS
    from monailabel_dr.metrics.lesions import FROCAccumulator, proposals_from_map

    folder, ids = idrid_ids(dataset, split)
    params = dict(params or {})
    params.setdefault("target", "referable")
    kinds = [*LESIONS, "any"]
    froc = {k: {"gt": FROCAccumulator(overlap=overlap, mode="gt"), "pixel": FROCAccumulator(mode="pixel")} for k in kinds}
    mass = {k: [0.0, 0.0] for k in kinds}   # CAM mass inside the lesion, lesion area (pixels in the FOV)
    cam_total, fov_total, per_image = 0.0, 0, []
    t0 = time.time()
    for image_id in ids:
        full, answer, fov = task.predict(idrid_image_path(folder, image_id), **params)
        labels, scores = proposals_from_map(full, threshold=float(answer["threshold"]))
        served = sorted(r["score"] for r in answer["regions"])
        if len(served) != scores.size or not np.allclose(served, np.sort(np.round(scores, 4)), atol=1e-4):
            raise RuntimeError(f"{image_id}: the evaluated proposals differ from the served regions")
        masks = idrid_masks(folder, image_id, full.shape)
        masks["any"] = np.any([masks[les] for les in LESIONS], axis=0)
        total = float(full[fov].sum())
        cam_total += total
        fov_total += int(fov.sum())
        row = {"image": image_id, "regions": int(scores.size), "grade": answer["grade"],
               "target_probability": answer["target_probability"]}
        for k in kinds:
            truth = masks[k] & fov
            for acc in froc[k].values():
                acc.update_regions(image_id, labels, scores, truth)
            mass[k][0] += float(full[truth].sum())
            mass[k][1] += float(truth.sum())
            row[f"mass_in_{k}"] = float(full[truth].sum()) / total if total > 0 else None
        per_image.append(row)
    out = {"data": {"kind": "idrid", "folder": os.path.realpath(folder), "split": split, "n": len(ids)},
           "params": params, "froc": {}, "cam_mass": {}, "per_image": per_image, "model": task.model_json(),
           "seconds": round(time.time() - t0, 1)}
    for k in kinds:
        g, p = froc[k]["gt"].compute(), froc[k]["pixel"].compute()
        for r in (g, p):
            r.pop("curve", None)
        out["froc"][k] = {"overlap_rule": g, "lenient": p}
        out["cam_mass"][k] = {"fraction_inside": mass[k][0] / cam_total if cam_total else None,
                              "area_fraction": mass[k][1] / fov_total if fov_total else None}
        fi, af = out["cam_mass"][k]["fraction_inside"], out["cam_mass"][k]["area_fraction"]
        out["cam_mass"][k]["ratio"] = fi / af if fi is not None and af else None
    return out


def cam_summary(report: dict) -> str:
    rates = report["froc"]["any"]["overlap_rule"]["fp_rates"]
    head = "  lesion  rule     " + " ".join(f"{r:>6g}" for r in rates) + "   mass-in  area   ratio"
    lines = [f"CAM region proposals on {report['data']['folder']} ({report['data']['n']} images, target "
             f"{report['params'].get('target')}): lesion sensitivity at FP/image", head]
    for k, v in report["froc"].items():
        m = report["cam_mass"][k]
        for rule in ("overlap_rule", "lenient"):
            sens = " ".join(f"{s:6.3f}" if s is not None and np.isfinite(s) else "   n/a" for s in v[rule]["sensitivity"])
            tail = (f"   {m['fraction_inside']:.3f}  {m['area_fraction']:.3f}  {m['ratio']:.2f}"
                    if rule == "overlap_rule" and m["ratio"] is not None else "")
            lines.append(f"  {k:6s}  {'>=50%' if rule == 'overlap_rule' else 'pixel':7s}  {sens}{tail}")
    return "\n".join(lines)


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
        raise EvaluationError("evaluate: no graded images found")
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
    ``random_area_baseline``: the pooled Dice of the masks (probability >= ``threshold``) next to the
    expected Dice of a random mask of the same area per image in the field of view
    (:class:`WeakMaskAccumulator`), per lesion and for the union: whether the masks beat chance
    placement, which matters for weakly supervised masks (twlr_inpaint) whose area is not learned.
    """
    from monailabel_dr.fundus import geometry
    from monailabel_dr.fundus.idrid import idrid_image_path, idrid_masks
    from monailabel_dr.fundus.lesions import LESIONS
    from monailabel_dr.metrics.lesions import FROCAccumulator, LesionSegAccumulator
    from monailabel_dr.metrics.regression import WeakMaskAccumulator

    try:
        folder, ids = idrid_ids(dataset, split)
    except ValueError as e:
        raise EvaluationError(f"evaluate: {e}") from e
    seg = LesionSegAccumulator(threshold=threshold)
    froc = {les: FROCAccumulator(overlap=froc_overlap, mode=froc_mode) for les in LESIONS}
    chance = WeakMaskAccumulator(LESIONS)
    served_acc = WeakMaskAccumulator(LESIONS)   # the served masks, when the task applies component rules
    rules_used = False
    t0 = time.time()
    for image_id in ids:
        img_path = idrid_image_path(folder, image_id)
        if task is not None:
            probs_arr, fov = task.predict(img_path, **(params or {}))
            probs = {les: probs_arr[i] for i, les in enumerate(LESIONS)}
            shape = fov.shape
            masks = task.masks_for(probs_arr, fov, params) if hasattr(task, "masks_for") else None
        else:
            img = io.read_image(img_path)
            fov = geometry.detect_fov(io.to_rgb_float(img))
            shape = fov.shape
            probs = _predicted_masks_folder(predictions, image_id, shape)
            masks = None
        truth = idrid_masks(folder, image_id, shape=shape)
        if masks is not None:
            served_acc.update({les: masks[i] for i, les in enumerate(LESIONS)}, truth, fov)
            rules_used = True
        seg.update(image_id, probs, truth, fov)
        chance.update({les: probs[les] >= threshold for les in LESIONS}, truth, fov)
        for les in LESIONS:
            froc[les].update_from_map(image_id, probs[les] * fov, truth[les] & fov, threshold=froc_threshold)
    # the thresholds the task serves (a request's, the profile's or the checkpoint's per-lesion ones): Dice
    # is reported at them beside the fixed `threshold` (0.5 by default)
    served = None
    if task is not None and hasattr(task, "thresholds"):
        thr, served_source = task.thresholds((params or {}).get("threshold"))
        served = dict(zip(LESIONS, thr))
    report = {
        "dataset": os.path.realpath(folder),
        "split": split,
        "images": ids,
        "segmentation": seg.compute(n_boot=n_boot, operating=served),
        "froc": {les: froc[les].compute() for les in LESIONS},
        "random_area_baseline": chance.compute(),
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
        if served is not None:
            report["served_thresholds"] = {"thresholds": served, "source": served_source}
        if rules_used:
            # what the label map and the statistics count under the component rules: pooled Dice of those masks
            computed = served_acc.compute()
            report["served_masks"] = {"min_peak": task.min_peak((params or {}).get("min_peak")),
                                      "min_area_ppm": task.min_area_ppm((params or {}).get("min_area_ppm")),
                                      "dice_pooled": {les: computed[les]["dice"] for les in LESIONS},
                                      "mean_dice": float(np.mean([computed[les]["dice"] for les in LESIONS
                                                                  if computed[les]["dice"] is not None]))}
    else:
        report["predictions"] = os.path.realpath(predictions)
    return report


def lesion_summary(report: dict) -> str:
    from monailabel_dr.fundus.lesions import LESIONS

    seg = report["segmentation"]
    src = report.get("predictions") or (report.get("model") or {}).get("checkpoint", "")
    rows = [f"{len(report['images'])} images (split {report['split']}) of {report['dataset']}; predictions: {src}",
            "lesion  dice_pooled [95% CI]      auc_pr [95% CI]          auc_roc  image_auc  froc   dice_random_area"
            + ("  dice_served_thresholds" if "served_thresholds" in report else "")]
    if "served_thresholds" in report:
        rows.insert(1, f"served thresholds: {report['served_thresholds']['source']}; dice_pooled is at {seg.get('threshold')}")
    chance = report.get("random_area_baseline", {})
    for les in (*LESIONS, "mean"):
        m = seg.get(les, {})
        ci = m.get("ci", {})

        def f(v):
            return "  nan" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"

        def c(k):
            lo, hi = ci.get(k, [None, None])
            return f"[{f(lo)}, {f(hi)}]"

        fr = report["froc"].get(les, {}).get("froc_score") if les != "mean" else None
        served = ""
        if "dice_pooled_operating" in m:
            t = m.get("operating_threshold")
            served = f"  {f(m['dice_pooled_operating'])}" + (f" (t={t:.3f})" if t is not None else "")
        rows.append(f"{les:6s}  {f(m.get('dice_pooled'))} {c('dice_pooled'):16s}  {f(m.get('auc_pr'))} {c('auc_pr'):16s}"
                    f"  {f(m.get('auc_roc'))}    {f(m.get('image_auc'))}      {f(fr)}  {f(chance.get(les, {}).get('random_dice'))}"
                    f"{served}")
    if "any" in chance:
        rows.append(f"any     {f(chance['any']['dice'])}  (random mask of the same area: {f(chance['any']['random_dice'])})")
    if "served_masks" in report:
        sm = report["served_masks"]
        rows.append(f"served masks (min_peak {sm['min_peak']}, min_area_ppm {sm.get('min_area_ppm')}): pooled Dice "
                    + ", ".join(f"{les} {f(sm['dice_pooled'][les])}" for les in LESIONS) + f", mean {f(sm['mean_dice'])}")
    return "\n".join(rows)


def evaluate_twlr_phantoms(task, phantoms: int, seed: int = 1_000_000, size: str = "480x640",
                           params: dict | None = None, min_grade: int = 0) -> dict:
    """TWLR's stage 2 (``twlr_inpaint`` task) on N fresh phantoms, whose lesion-free twin is known.

    Per phantom: the predicted grade before and after the loop (grade drop), steps, stop reason; the
    final image against the healthy twin (PSNR / SSIM inside the removed regions and over the field of
    view, next to the same numbers for the input photograph, i.e. before inpainting); the weak masks
    against the true lesion masks (pooled Dice / precision / recall per lesion and for their union,
    next to a random mask of the same area in the field of view). ``min_grade`` skips phantoms of a
    lower true grade (seeds are still consumed, so a seed always gives the same phantom).
    """
    from monailabel_dr.fundus.lesions import LESIONS
    from monailabel_dr.fundus.phantoms import make_phantom
    from monailabel_dr.metrics.regression import WeakMaskAccumulator

    h, w = (int(v) for v in size.lower().split("x"))
    weak_acc = WeakMaskAccumulator(LESIONS)
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(phantoms):
            ph = make_phantom(seed + i, size=(h, w))
            if ph.grade < min_grade:
                continue
            path = io.write_image(os.path.join(tmp, f"ph_{i}.png"), ph.image)
            full, reg = task.regress(path, final_image=True, **(params or {}))
            rows.append(_twlr_phantom_row(seed + i, ph, full, reg, weak_acc))
    if not rows:
        raise EvaluationError("evaluate: no phantom of the requested grades")
    summary = _twlr_phantom_summary(rows)
    return {
        "data": {"kind": "phantoms", "n_drawn": phantoms, "first_seed": seed, "size": size, "min_grade": min_grade},
        "summary": summary,
        "weak_masks": weak_acc.compute(),
        "weak_masks_variant": "pooled over phantoms inside the field of view; random = a mask of the same area "
                              "placed uniformly in the field of view (expected counts)",
        "quality_variant": "PSNR (dB, 8-bit) / SSIM (7x7 local map averaged) of the final image and of the input "
                           "against the lesion-free twin; means over lesioned phantoms (a phantom with nothing "
                           "removed has no 'removed' value)",
        "per_image": rows,
        "model": task.model_json(),
        "params": params or {},
        "seconds": round(time.time() - t0, 1),
    }


def _twlr_phantom_row(seed: int, ph, full: dict, reg, weak_acc) -> dict:
    """One phantom's figures: the grades along the loop, the final image and the input against the healthy
    twin, and the weak masks against the true ones (added to ``weak_acc``, pooled over phantoms)."""
    from monailabel_dr.fundus.lesions import LESIONS
    from monailabel_dr.metrics.regression import masked_psnr, masked_ssim

    weak = {les: full["weak_label"] == k + 1 for k, les in enumerate(LESIONS)}
    removed = full["weak_label"] > 0
    fov = ph.fov & full["fov"]
    overlap = weak_acc.update(weak, ph.masks, fov)
    row = {
        "seed": seed,
        "true_grade": ph.grade,
        "grades": [s.grade for s in reg.steps],
        "grade_drop": reg.steps[0].grade - reg.steps[-1].grade,
        "steps": len(reg.steps) - 1,
        "stop_reason": reg.stop_reason,
        "removed_fraction_of_fov": round(float(removed[fov].mean()), 5),
    }
    for where, region in (("removed", removed & fov), ("fov", fov)):
        for metric, fn in (("psnr", masked_psnr), ("ssim", masked_ssim)):
            for which, img in (("final", full["final"]), ("input", ph.image)):
                row[f"{metric}_{where}_{which}"] = fn(img, ph.healthy, region)
    row["any_lesion_dice"] = overlap["any"]["dice"]
    row["any_lesion_random_dice"] = overlap["any"]["random_dice"]
    return row


def _twlr_phantom_summary(rows: list[dict]) -> dict:
    """Means over the phantoms (image quality and grade drop over the lesioned ones), stop reasons counted."""

    def mean(key, sel=None):
        vals = [r[key] for r in rows if (sel is None or sel(r)) and r[key] is not None and np.isfinite(r[key])]
        return None if not vals else round(float(np.mean(vals)), 4)

    lesioned = lambda r: r["true_grade"] > 0  # noqa: E731
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["stop_reason"]] = reasons.get(r["stop_reason"], 0) + 1
    return {
        "n": len(rows),
        "n_lesioned": sum(lesioned(r) for r in rows),
        "mean_grade_drop_lesioned": mean("grade_drop", lesioned),
        "fraction_grade_dropped_lesioned": mean_or_none([r["grade_drop"] > 0 for r in rows if lesioned(r)]),
        "fraction_reaching_grade_0_lesioned": mean_or_none([r["grades"][-1] == 0 for r in rows if lesioned(r)]),
        "mean_steps": mean("steps"),
        "stop_reasons": reasons,
        "removed_fraction_of_fov_healthy_eyes": mean("removed_fraction_of_fov", lambda r: r["true_grade"] == 0),
        **{k: mean(k, lesioned) for k in ("psnr_removed_final", "psnr_removed_input", "ssim_removed_final",
                                          "ssim_removed_input", "psnr_fov_final", "psnr_fov_input",
                                          "ssim_fov_final", "ssim_fov_input")},
    }


def mean_or_none(values) -> float | None:
    return None if not len(values) else round(float(np.mean(values)), 4)
