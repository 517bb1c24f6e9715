"""What a published checkpoint says about itself: its validation record.

Trainers write the record into the checkpoint they publish (``payload["validation"]``,
lib/trainers/common.py ``AtomicPublish``), so it travels with the file (``--conf <model>_checkpoint``
on another server shows it too). Infer tasks read it back for ``/info`` and every answer, so an
annotator can tell a first-epoch model from a finished one.

Record fields: ``metric`` (the validation key metric's name, None without validation images),
``value`` (its value for the served weights), ``metrics`` (every validation metric at that epoch),
``epoch`` (the epoch of the served weights), ``epochs_run`` / ``max_epochs`` (how far the run was
when the file was written), ``complete`` (the run had ended), ``n_train`` / ``n_val`` (images),
``trained_at`` (ISO time the file was written), ``run``, ``resumed_from``, ``split``.
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
from typing import Any

RECORD_KEY = "validation"
_cache: dict[tuple, dict | None] = {}
_lock = threading.Lock()


def checkpoint_state(path: str) -> dict[str, Any]:
    """Trained/untrained state of a checkpoint path, for /info and result JSON."""
    if path and os.path.isfile(path):
        st = os.stat(path)
        return {
            "trained": True,
            "checkpoint": path,
            "modified": _dt.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds"),
            "size_bytes": st.st_size,
        }
    return {"trained": False, "checkpoint": path}


def make_record(trainer, evaluator, run: str | None, resumed_from: str | None, split: dict | None,
                complete: bool, metrics: dict | None = None, epoch: int | None = None) -> dict[str, Any]:
    """The record of the weights being published by an ignite ``trainer`` (and its ``evaluator``)."""
    def size(engine) -> int | None:
        loader = getattr(engine, "data_loader", None) if engine is not None else None
        try:
            return len(loader.dataset)
        except (AttributeError, TypeError):
            return None

    st = trainer.state
    rec: dict[str, Any] = {
        "metric": None, "value": None, "metrics": {},
        "epoch": int(epoch if epoch is not None else st.epoch),
        "epochs_run": int(st.epoch), "max_epochs": int(st.max_epochs or st.epoch), "complete": bool(complete),
        "n_train": size(trainer), "n_val": size(evaluator) or 0,
        "trained_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "run": run, "resumed_from": resumed_from,
        "split": (split or {}).get("kind") if isinstance(split, dict) else split,
    }
    if evaluator is not None:
        es = evaluator.state
        rec["metric"] = getattr(es, "key_metric_name", None)
        best = getattr(es, "best_metric", None)
        rec["value"] = None if best is None or best == -1 else round(float(best), 4)
        if epoch is None:
            rec["epoch"] = int(getattr(es, "best_metric_epoch", st.epoch) or st.epoch)
        rec["metrics"] = {k: round(float(v), 4) for k, v in (metrics if metrics is not None else es.metrics).items()
                          if isinstance(v, (int, float))}
    return rec


def load_weights(network, path: str, device: str, key: str = "model"):
    """Load a MONAI CheckpointSaver file ({"model": state_dict}) or a bare state_dict into ``network`` (strict)."""
    import torch

    checkpoint = torch.load(path, map_location=torch.device(device), weights_only=True)
    state = checkpoint.get(key, checkpoint) if isinstance(checkpoint, dict) else checkpoint
    network.load_state_dict(state, strict=True)
    return network


def write_checkpoint(path: str, payload: dict, record: dict | None) -> None:
    """Write ``payload`` with ``record`` under ``RECORD_KEY`` to ``path`` atomically (a temporary file, then
    ``os.replace``): an /infer reading the file at the same moment sees the old or the new one, never half."""
    import torch

    payload = dict(payload)
    payload[RECORD_KEY] = record
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_mapped(path: str):
    """The checkpoint at ``path`` loaded on the CPU with its tensors memory-mapped where the file allows (the
    record, the preprocessing or the weights' names are read without reading the weights), else loaded whole."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return torch.load(path, map_location="cpu", weights_only=True)


def read_record(path: str) -> dict | None:
    """The record stored in checkpoint ``path`` (None when it has none); read once per file version."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    with _lock:
        if key in _cache:
            return _cache[key]
    try:
        ckpt = load_mapped(path)
    except Exception:
        ckpt = None
    rec = ckpt.get(RECORD_KEY) if isinstance(ckpt, dict) else None
    rec = dict(rec) if isinstance(rec, dict) else None
    with _lock:
        if len(_cache) > 64:
            _cache.clear()
        _cache[key] = rec
    return rec


def describe(rec: dict | None) -> str:
    """One sentence for an annotator: how good the served model is and whether it is still training."""
    if rec is None:
        return ("the served checkpoint carries no validation record (trained before the app stored one, or "
                "brought from elsewhere): its quality is unknown here")
    if rec.get("members"):
        quality = (f"ensemble of {len(rec['members'])} networks, validation {rec['metric']} {rec['value']} "
                   f"({rec.get('n_val')} validation / {rec.get('n_train')} training images)")
    elif rec.get("metric"):
        quality = (f"validation {rec['metric']} {rec['value']} at epoch {rec['epoch']} "
                   f"({rec.get('n_val')} validation / {rec.get('n_train')} training images)")
    else:
        quality = (f"not validated (no validation images; {rec.get('n_train')} training images), "
                   f"weights of epoch {rec['epoch']}")
    if not rec.get("complete"):
        return (f"EARLY CHECKPOINT: {quality}, written while training was at epoch {rec.get('epochs_run')} of "
                f"{rec.get('max_epochs')}; answers will change as training goes on")
    return f"{quality}; training run finished ({rec.get('epochs_run')} of {rec.get('max_epochs')} epochs)"


THRESHOLD_PREFIX = "val_threshold_"   # per-lesion operating thresholds (lib/trainers/lesion_data.py OperatingThresholds)


def operating_thresholds(rec: dict | None, names) -> dict[str, float] | None:
    """The per-lesion operating thresholds a lesion trainer chose on its validation images for the
    weights of this record (``metrics["val_threshold_<name>"]``), or None when the record has none for
    every name (trained without validation images, or before the trainer stored them)."""
    metrics = (rec or {}).get("metrics") or {}
    out = {}
    for n in names:
        v = metrics.get(f"{THRESHOLD_PREFIX}{n}")
        if not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
            return None
        out[n] = float(v)
    return out


PREPROCESS_KEY = "preprocess"   # a lesion checkpoint's preprocessing (lib/trainers/lesion_seg.py publish_payload)


def checkpoint_preprocess(path: str) -> dict:
    """The preprocessing a lesion checkpoint was trained with (``{"method": "none"}`` when the file records
    none: lesion trainers applied no preprocessing before they recorded it)."""
    ckpt = load_mapped(path)
    rec = ckpt.get(PREPROCESS_KEY) if isinstance(ckpt, dict) else None
    return dict(rec) if isinstance(rec, dict) else {"method": "none"}


def checkpoint_members(path: str) -> int:
    """How many networks a lesion checkpoint holds: K for an ensemble's (``members.<k>.*`` weights,
    ``networks/lesion_net.py LesionEnsemble``), else 1."""
    import re

    ckpt = load_mapped(path)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}
    ks = {int(m.group(1)) for k in (state if isinstance(state, dict) else {}) for m in [re.match(r"members\.(\d+)\.", str(k))] if m}
    return len(ks) if ks else 1


def check_members(path: str, expected: int, what: str) -> None:
    """ValueError naming both when the checkpoint at ``path`` holds another number of networks than ``expected``
    (a profile's ``network.members``): an ensemble's file served by a single-network profile, or the reverse."""
    have = checkpoint_members(path)
    if have != int(expected):
        def n(k):
            return "one network" if k == 1 else f"an ensemble of {k} networks"
        raise ValueError(f"{path} holds {n(have)}, but {what} serves {n(int(expected))} (network.members): "
                         "serve it with the profile it was trained with (e.g. cpu_ensemble for an ensemble of 2), or retrain")


def check_preprocess(path: str, expected: dict | None, what: str) -> None:
    """ValueError naming both when the checkpoint at ``path`` was trained with another preprocessing than
    ``expected`` (a profile's parsed ``preprocess`` block; None = none): its maps would be meaningless."""
    from monailabel_dr.fundus.preprocess import effective_preprocess

    want = dict(expected or {"method": "none"})
    have = checkpoint_preprocess(path)
    if effective_preprocess(have) != effective_preprocess(want):   # defaults written out or not: the same
        raise ValueError(f"{path} was trained with preprocess {have}, but {what} applies {want}: "
                         "serve it with the profile it was trained with, or retrain")
