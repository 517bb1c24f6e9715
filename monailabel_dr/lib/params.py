"""Request parameters as checked data: each infer task declares what it accepts, the base task checks it.

A request parameter of the wrong type, not finite, out of range or not one of the accepted
values is answered 422 naming the parameter and what is accepted, before anything runs.
Keys a task does not know are left alone (clients send their own: ``client_id``, Slicer's
``label_info``...) unless they are a near miss of a key the task knows (``treshold``): a typo
that would otherwise silently run with the default is refused with "did you mean".

Parsing helpers that need the image (points, boxes in input pixels) stay with their task
(``lib/infers/lesion_sam.py``); they are declared here as ``Param.any`` so the typo rule
still knows them.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from monailabel_dr.lib.errors import BadInput

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


@dataclass(frozen=True)
class Param:
    kind: str                              # number | integer | boolean | choice | text | any
    low: float | None = None
    high: float | None = None
    low_open: bool = False                 # (low, ... instead of [low, ...
    high_open: bool = False
    choices: tuple = field(default_factory=tuple)
    max_len: int = 10_000
    words: tuple = field(default_factory=tuple)   # a number parameter's named values (lesion threshold "validation")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def number(cls, low=None, high=None, low_open=False, high_open=False, words: tuple = ()) -> "Param":
        return cls("number", low, high, low_open, high_open, words=tuple(words))

    @classmethod
    def integer(cls, low=None, high=None) -> "Param":
        return cls("integer", low, high)

    @classmethod
    def boolean(cls) -> "Param":
        return cls("boolean")

    @classmethod
    def choice(cls, *choices) -> "Param":
        return cls("choice", choices=tuple(choices))

    @classmethod
    def text(cls, max_len: int = 10_000) -> "Param":
        return cls("text", max_len=max_len)

    @classmethod
    def any(cls) -> "Param":
        return cls("any")

    # ---------------------------------------------------------------- checking
    def accepted(self) -> str:
        if self.kind in ("number", "integer"):
            lo = "" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
            hi = "" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
            what = "a finite number" if self.kind == "number" else "an integer"
            words = "".join(f" or {w!r}" for w in self.words)
            return f"{what}" + (f" in {lo or '(-inf'}, {hi or 'inf)'}" if lo or hi else "") + words
        if self.kind == "boolean":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "text":
            return f"a string of at most {self.max_len} characters"
        return "see the model's description"

    def check(self, name: str, value: Any) -> Any:
        """The value, normalised (numbers from strings, lower-case choices), or 422 naming ``name``."""
        def bad(why: str):
            return BadInput(f"parameter {name!r}: {why} (got {_show(value)}); accepted: {self.accepted()}")

        if self.kind == "any":
            return value
        if self.kind == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise bad("not a boolean")
        if self.kind == "choice":
            v = value.strip().lower() if isinstance(value, str) else value
            if isinstance(v, int) and not isinstance(v, bool) and str(v) in self.choices:
                v = str(v)   # a JSON number for a choice spelt as digits (cam target 2)
            if v in self.choices:
                return v
            raise bad("not an accepted value")
        if self.kind == "text":
            if not isinstance(value, str):
                raise bad("not a string")
            if len(value) > self.max_len:
                raise bad("too long")
            return value
        # numbers
        if self.words and isinstance(value, str) and value.strip().lower() in self.words:
            return value.strip().lower()
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad("not a number")
        try:
            x = float(value)
        except ValueError:
            raise bad("not a number") from None
        if not math.isfinite(x):
            raise bad("not finite")
        if self.kind == "integer":
            if x != int(x):
                raise bad("not an integer")
            x = int(x)
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            raise bad("out of range")
        if self.high is not None and (x > self.high or (self.high_open and x == self.high)):
            raise bad("out of range")
        return x


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# What every infer task of the app accepts besides its own parameters (MONAI Label's request keys).
COMMON: dict[str, Param] = {
    "result_dtype": Param.choice("uint8", "uint16", "int16", "int32", "float32"),
    "result_compress": Param.boolean(),
    "save_label": Param.boolean(),
    "label_tag": Param.text(64),
    "client_id": Param.text(200),
    "label_info": Param.any(),
    "description": Param.any(),
}
# Keys MONAI Label itself puts in a request (never typos of a task parameter).
_INTERNAL = ("model", "image", "session", "label", "device", "result_extension", "skip_writer", "cache_transforms",
             "pipeline", "logging")


def check_request(request: dict, params: Mapping[str, Param], model: str, common: Mapping[str, Param] | None = None,
                  internal: tuple[str, ...] = _INTERNAL) -> dict:
    """``request`` with the declared parameters checked and normalised (a new dict); 422 on the first bad one.
    ``common``: parameters accepted besides the task's own (default: MONAI Label's infer request keys)."""
    out = dict(request)
    known = {**(COMMON if common is None else common), **params}
    for key, value in request.items():
        if key in known:
            if value is None and key not in params:
                continue
            out[key] = known[key].check(key, value)
        elif key not in internal and isinstance(key, str):
            close = difflib.get_close_matches(key.lower(), list(params), n=1, cutoff=0.75)
            if close:
                raise BadInput(f"unknown parameter {key!r} for {model} (did you mean {close[0]!r}?); "
                               f"its parameters: {', '.join(sorted(params)) or 'none'}")
    return out


def describe(params: Mapping[str, Param]) -> dict[str, str]:
    """{name: what is accepted}, for /info."""
    return {k: p.accepted() for k, p in sorted(params.items())}


def check_device(value: Any) -> str | None:
    """The request's ``device`` (cpu, cuda, cuda:N of this machine), or 422."""
    if value is None or value == "":
        return None
    import torch

    v = str(value).strip().lower()
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ok = ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(n)] if n else [])
    if v not in ok:
        raise BadInput(f"parameter 'device': {_show(value)} is not a device of this server; accepted: {', '.join(ok)}")
    return v


# What a train request may set (MONAI Label's BasicTrainTask config and this app's trainers).
TRAIN_PARAMS: dict[str, Param] = {
    "max_epochs": Param.integer(1, 10_000),
    "learning_rate": Param.number(0, 10, low_open=True),
    "train_batch_size": Param.integer(1, 4096),
    "val_batch_size": Param.integer(1, 4096),
    "val_split": Param.number(0, 1, high_open=True),
    "early_stop_patience": Param.integer(-1, 10_000),
    "seed": Param.integer(-1, 2**31 - 1),
    "pretrained": Param.boolean(),
    "multi_gpu": Param.boolean(),
    "name": Param.text(200),
    "dataset": Param.choice("cachedataset", "dataset", "persistentdataset", "smartcachedataset"),
    "dataloader": Param.choice("dataloader", "threaddataloader"),
    "gpus": Param.any(), "tracking": Param.any(), "tracking_uri": Param.any(), "tracking_experiment_name": Param.any(),
    "device": Param.any(),
    # this app's trainers (each reads those it uses)
    "dataset_source": Param.text(4096), "label_tag": Param.text(64),
    "samples_per_image": Param.integer(1, 256), "val_samples_per_image": Param.integer(1, 256),
    "val_seed": Param.integer(0, 2**31 - 1), "val_variants": Param.integer(1, 64),
    "patch_size": Param.integer(16, 4096), "crop_size": Param.integer(16, 4096),
    "ssim_weight": Param.number(0, 100), "negative_prob": Param.number(0, 1),
    "negatives_source": Param.text(4096), "negatives_max": Param.integer(0, 100_000),
}
TRAIN_INTERNAL = ("model", "run_sync", "enqueue", "force_sync", "client_id", "user", "local_rank", "world_size",
                  "train_ds", "val_ds")


def check_train_request(request: dict, what: str, extra: Mapping[str, Param] | None = None) -> dict:
    """A train request's settings checked (422 naming the setting); MONAI Label's dataset / dataloader names
    keep their spelling."""
    params = {**TRAIN_PARAMS, **(extra or {})}
    out = check_request(request, params, what, common={}, internal=TRAIN_INTERNAL)
    for key, proper in (("dataset", ("CacheDataset", "Dataset", "PersistentDataset", "SmartCacheDataset")),
                        ("dataloader", ("DataLoader", "ThreadDataLoader"))):
        if isinstance(out.get(key), str):
            out[key] = {p.lower(): p for p in proper}[out[key]]
    if out.get("device") is not None:
        out["device"] = check_device(out["device"]) or out["device"]
    return out
