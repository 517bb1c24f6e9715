"""TWLR weak lesion masks as pseudo-labels (`monailabel-dr twlr-pseudolabels`, METHODS.md §4).

TWLR's stage 2 (the ``twlr_inpaint`` infer task, ``output=label``) removes lesions by iterative
saliency-guided inpainting; the union of the removed regions per lesion is a weak lesion mask,
"lesion localisation without pixel labels". This module runs that task on datastore images and
writes the masks where the ``lesion_seg`` trainer can learn from them:

- into the datastore, as each image's ``original``-tag label map (MA=1, HE=2, EX=3, SE=4) through
  :meth:`FundusDatastore.save_label` (validated like any upload), with label info saying that it is
  a TWLR pseudo-label, the regression settings, the grader checkpoint and the stop reason. A
  ``final`` label is never written or changed; an existing ``original`` label is replaced only with
  ``overwrite``. Train on them with the train request key ``label_tag: original``
  (``monailabel-dr train lesion_seg --studies DIR --params '{"label_tag": "original"}'``);
- into a folder in the IDRiD layout (``images/NAME.<ext>``, a symlink to the photograph or a copy,
  ``masks/<LES>/NAME_<LES>.png`` 0/255 only where the weak mask is non-empty, as IDRiD has no file
  for an absent lesion), read by ``monailabel-dr train lesion_seg --dataset idrid:FOLDER``
  (:mod:`monailabel_dr.fundus.idrid`: ids whose trailing number is a multiple of 5 validate).
  Provenance per image goes to ``pseudolabel_info/NAME.json`` next to ``images/``.

Nothing here is HTTP: errors that concern one image are :class:`~monailabel_dr.lib.errors.ClientError`
(reported per image, the batch goes on); problems with the whole request are :class:`PseudoLabelError`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from monailabel_dr.fundus import io
from monailabel_dr.fundus.idrid import IDRID_IMAGE_EXTENSIONS, IDRID_MASK_EXTENSIONS
from monailabel_dr.fundus.lesions import LESION_VALUES, LESIONS
from monailabel_dr.lib.errors import ClientError, NotFound

INFER_TASK = "twlr_inpaint"
PSEUDO_TAG = "original"        # MONAI Label's DefaultLabelTag.ORIGINAL; never "final"
SOURCE = "twlr_pseudolabel"
INFO_DIR = "pseudolabel_info"  # provenance files of an IDRiD-layout output folder
# request keys the command owns: what is inferred, on which image, and that nothing is saved by the app
_RESERVED = ("model", "image", "save_label", "label_tag", "device")


class PseudoLabelError(ValueError):
    """The request as a whole cannot run (bad parameters, untrained grader, unknown selection)."""


# ----------------------------------------------------------------------------- request
def parse_params(text: str | None) -> dict[str, Any]:
    """``--params`` JSON -> the ``twlr_inpaint`` request parameters (output forced to ``label``)."""
    params: dict[str, Any] = {}
    if text:
        try:
            params = json.loads(text)
        except json.JSONDecodeError as e:
            raise PseudoLabelError(f"--params is not valid JSON: {e}") from e
        if not isinstance(params, dict):
            raise PseudoLabelError(f"--params must be a JSON object, got {type(params).__name__}")
    bad = sorted(k for k in params if k in _RESERVED)
    if bad:
        raise PseudoLabelError(f"--params may not set {bad}: the command chooses them")
    out = str(params.get("output", "label")).lower()
    if out != "label":
        raise PseudoLabelError(f"pseudo-labels are label maps: --params output must be 'label', got {out!r}")
    ext = str(params.get("result_extension", ".png")).lower()
    if ext not in io.LABEL_EXTENSIONS:
        raise PseudoLabelError(f"result_extension must be one of {io.LABEL_EXTENSIONS}, got {ext!r}")
    return {**params, "output": "label", "result_extension": ext}


def check_task(app, params: dict[str, Any]):
    """The ``twlr_inpaint`` task, trained, with ``params`` it accepts (checked once, before any image)."""
    task = app._infers.get(INFER_TASK)
    if task is None:
        raise PseudoLabelError(f"the app serves no {INFER_TASK} task: add the twlr model (--conf models twlr,...)")
    if not os.path.isfile(task.model.serve_path):
        raise PseudoLabelError(task.state().get("how_to_train") or f"{INFER_TASK} has no trained weights")
    try:
        _, backend, _ = task.settings(params)   # tau, threshold, dilation, t_max, backend ... as the task reads them
    except ClientError as e:
        raise PseudoLabelError(f"--params: {e.detail}") from e
    if backend in ("unet", "external") and hasattr(task, "inpainter_network"):
        try:   # the learned inpainter must be there too, or every image would fail alike
            task.inpainter_network(backend, "cpu")
        except ClientError as e:
            raise PseudoLabelError(e.detail) from e
    return task


def default_models(params: dict[str, Any]) -> str:
    """The model rows the command needs: ``twlr``, and ``twlr_inpainter`` for ``backend: unet``."""
    if str(params.get("backend", "")).lower() == "unet":
        from monailabel_dr.config import load_model_table

        if "twlr_inpainter" in load_model_table():
            return "twlr,twlr_inpainter"
    return "twlr"


def select_images(datastore, images: list[str] | None = None, unlabelled_only: bool = False) -> list[str]:
    """The image ids to run on: ``images`` in the order given (unknown ids are kept, so they are
    reported per image), else every image; ``unlabelled_only``: those without a *final lesion label
    map* (a grade-only label does not count: TWLR's grader learns from grades, the masks are what
    is missing)."""
    if images:
        seen: dict[str, None] = {}
        for i in images:
            if i.strip():
                seen.setdefault(i.strip(), None)
        return list(seen)
    ids = sorted(datastore.list_images())
    if unlabelled_only:
        finder = getattr(datastore, "final_label_files", None)
        ids = [i for i in ids if not (finder and "lesion_map" in finder(i, "final"))]
    return ids


# ----------------------------------------------------------------------------- writers
def has_original_label(datastore, image_id: str) -> bool:
    """Any ``original``-tag label of the image, in the datastore model or as a label-map file on disk."""
    if datastore.get_label_by_image_id(image_id, PSEUDO_TAG):
        return True
    finder = getattr(datastore, "final_label_files", None)
    return bool(finder and finder(image_id, PSEUDO_TAG))


def file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def label_info(result: dict[str, Any], params: dict[str, Any], checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """What an ``original`` pseudo-label records: its source, the loop's settings, the grader, the stop."""
    model = dict(result.get("model") or {})
    if checkpoint_sha256:
        model["sha256"] = checkpoint_sha256
    return {
        "source": SOURCE,
        "pseudo_label": True,
        "method": "TWLR severity regression (twlr_inpaint): union of the inpainted regions per lesion",
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "settings": result.get("settings"),
        "request": {k: v for k, v in params.items() if k not in ("output", "result_extension")},
        "model": model,
        "stop_reason": result.get("stop_reason"),
        "grades": result.get("grades"),
        "steps": result.get("steps"),
        "weak_mask_area_px": result.get("weak_mask_area_px"),
    }


def save_to_datastore(datastore, image_id: str, label_file: str, info: dict[str, Any]) -> dict[str, Any]:
    """Save ``label_file`` as the image's ``original`` label (validated by the datastore)."""
    ext = io.file_extension(label_file)
    datastore.save_label(image_id, label_file, PSEUDO_TAG, info)
    # a label map of the same id with another extension would shadow this one (final_label_files order)
    model = getattr(datastore, "_datastore", None)   # LocalDatastore's model (FundusDatastore)
    folder = model.label_path(PSEUDO_TAG) if model is not None else None
    for other in io.LABEL_EXTENSIONS if folder else ():
        stale = os.path.join(folder, image_id + other)
        if other != ext and os.path.isfile(stale):
            os.remove(stale)
    return {"tag": PSEUDO_TAG, "label": datastore.get_label_uri(image_id, PSEUDO_TAG)}


def idrid_existing(folder: str, image_id: str) -> list[str]:
    """Files of ``image_id`` already in an IDRiD-layout folder (image and masks)."""
    found = []
    for ext in IDRID_IMAGE_EXTENSIONS:
        for e in (ext, ext.upper()):
            p = os.path.join(folder, "images", image_id + e)
            if os.path.lexists(p):
                found.append(p)
    for les in LESIONS:
        for ext in IDRID_MASK_EXTENSIONS:
            for e in (ext, ext.upper()):
                p = os.path.join(folder, "masks", les, f"{image_id}_{les}{e}")
                if os.path.lexists(p):
                    found.append(p)
    return sorted(set(found))


def write_idrid(folder: str, image_id: str, image_path: str, label: np.ndarray, info: dict[str, Any],
                copy: bool = False) -> dict[str, Any]:
    """One image and its weak masks into ``folder`` in the IDRiD layout (existing files of the id are
    replaced). The photograph is symlinked (or copied; NIfTI and other non-IDRiD types are written as
    PNG, in display orientation, which is how every reader of the app sees them)."""
    for p in idrid_existing(folder, image_id):
        os.remove(p)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    src = os.path.realpath(image_path)
    ext = io.file_extension(src)
    if ext in IDRID_IMAGE_EXTENSIONS:
        dst = os.path.join(images, image_id + ext)
        linked = False
        if not copy:
            try:
                os.symlink(src, dst)
                linked = True
            except OSError:
                linked = False
        if not linked:
            shutil.copy2(src, dst)
    else:
        dst = os.path.join(images, image_id + ".png")
        img = io.read_image(src, max_pixels=None, min_side=None)
        io.write_image(dst, (io.to_rgb_float(img) * 255 + 0.5).astype(np.uint8))
    masks = {}
    for les in LESIONS:
        m = label == LESION_VALUES[les]
        if m.any():
            d = os.path.join(folder, "masks", les)
            os.makedirs(d, exist_ok=True)
            masks[les] = io.write_label(os.path.join(d, f"{image_id}_{les}.png"), m.astype(np.uint8) * 255)
    meta = os.path.join(folder, INFO_DIR)
    os.makedirs(meta, exist_ok=True)
    with open(os.path.join(meta, image_id + ".json"), "w", encoding="utf-8") as f:
        json.dump({**info, "image": image_id, "image_source": src}, f, indent=1, default=str)
    return {"folder": os.path.realpath(folder), "image": dst, "masks": masks}


# ----------------------------------------------------------------------------- the batch
def run_pseudolabels(
    app,
    image_ids: list[str],
    params: dict[str, Any],
    to_datastore: bool = False,
    idrid_out: str | None = None,
    overwrite: bool = False,
    copy_images: bool = False,
    emit: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Run ``twlr_inpaint`` (output=label) on each image and write the weak masks; one record per image
    goes to ``emit``; returns the summary. ClientErrors of one image are recorded and the batch goes on."""
    if bool(to_datastore) == bool(idrid_out):
        raise PseudoLabelError("give exactly one destination: to_datastore or idrid_out")
    emit = emit or (lambda rec: None)
    task = check_task(app, params)
    ds = app.datastore()
    if idrid_out:
        idrid_out = os.path.realpath(os.path.expanduser(idrid_out))
        os.makedirs(idrid_out, exist_ok=True)
    counts = {"written": 0, "skipped": 0, "failed": 0, "empty": 0}
    stop_reasons: dict[str, int] = {}
    areas_total = {les: 0 for les in LESIONS}
    hashes: dict[tuple, str] = {}   # (checkpoint, modified) -> sha256, recorded with every label
    for image_id in image_ids:
        rec: dict[str, Any] = {"image": image_id}
        t0 = time.time()
        try:
            if not ds.get_image_uri(image_id):
                raise NotFound(f"image '{image_id}' is not in the datastore")
            # existing outputs are checked before the (slow) regression runs
            if not overwrite:
                if to_datastore and has_original_label(ds, image_id):
                    rec["skipped"] = "an original label exists (use --overwrite to replace it)"
                elif idrid_out and idrid_existing(idrid_out, image_id):
                    rec["skipped"] = f"already in {idrid_out} (use --overwrite to replace it)"
            if "skipped" in rec:
                counts["skipped"] += 1
                emit(rec)
                continue
            res = app.infer({**params, "model": INFER_TASK, "image": image_id})
            label_file, result = res.get("file"), dict(res.get("params") or {})
            try:
                areas = {les: int(v) for les, v in (result.get("weak_mask_area_px") or {}).items()}
                rec.update({"stop_reason": result.get("stop_reason"), "grades": result.get("grades"),
                            "steps": result.get("steps"), "areas": areas})
                model = result.get("model") or {}
                key = (model.get("checkpoint"), model.get("modified"))   # a retrain mid-batch is a new key
                if key[0] and key not in hashes and os.path.isfile(key[0]):
                    hashes[key] = file_sha256(key[0])
                info = label_info(result, params, hashes.get(key))
                if to_datastore:
                    rec["written"] = {"datastore": save_to_datastore(ds, image_id, label_file, info)}
                else:
                    label = io.read_label(label_file)
                    rec["written"] = {"idrid": write_idrid(idrid_out, image_id, ds.get_image_uri(image_id), label,
                                                           info, copy=copy_images)}
            finally:
                if label_file and os.path.isfile(label_file):
                    os.remove(label_file)
        except ClientError as e:   # one unusable image does not stop the batch
            counts["failed"] += 1
            emit({"image": image_id, "error": e.detail, "status": e.status_code})
            continue
        counts["written"] += 1
        if not any(areas.values()):
            counts["empty"] += 1
        for les, v in areas.items():
            areas_total[les] = areas_total.get(les, 0) + v
        reason = str(rec.get("stop_reason"))
        stop_reasons[reason] = stop_reasons.get(reason, 0) + 1
        rec["seconds"] = round(time.time() - t0, 2)
        emit(rec)
    return {
        "images": len(image_ids),
        **counts,
        "stop_reasons": stop_reasons,
        "weak_mask_area_px": areas_total,
        "destination": {"datastore": os.path.realpath(app.studies), "tag": PSEUDO_TAG} if to_datastore
        else {"idrid": idrid_out},
        "model": task.model_json(),
    }
