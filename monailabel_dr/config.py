"""The model table, network profiles and the app's `--conf` options.

Model sizes and profiles are data (YAML files in ``configs/``); this module only
reads them and the string-valued ``--conf`` options MONAI Label passes in.
Nothing here imports MONAI Label, so the CLI and tests can use it directly.
"""

from __future__ import annotations

import copy
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monailabel_dr.metrics.lesions import CAM_THRESHOLD

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Every --conf key the app understands, with its default and meaning (the README table
# is generated from the same text; `monailabel-dr conf` prints it).
# the admission orders of waiting inferences (lib/offload.InferSlots), the first the default
INFER_ORDERS = ("response_ratio", "arrival")

CONF_OPTIONS: dict[str, tuple[str, str]] = {
    "models": ("all", "Models to serve: `all` or a comma list of rows of configs/models.yaml (e.g. `grading`)."),
    "device": ("auto", "`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."),
    "profile": ("(per model default)", "Network profile for every model: a key of `profiles:` in the model's config (`tiny`, `demo`, `paper`)."),
    "<model>_profile": ("", "Profile for one model, e.g. `grading_profile paper`."),
    "image_size": ("(profile)", "Working resolution (square side, px) for every model; overrides the profile."),
    "<model>_image_size": ("", "Working resolution for one model."),
    "<model>_checkpoint": ("", "A checkpoint to serve until the model is trained here, and the weights training starts from (e.g. `grading_checkpoint /data/grading.pt`)."),
    "model_dir": ("<app>/model", "Folder where trained models are published and runs are kept."),
    "max_image_pixels": ("40000000", "Largest image accepted (pixels); larger uploads and requests get HTTP 422."),
    "min_image_side": ("64", "Smallest image side accepted (px)."),
    "max_upload_mb": ("100", "Largest HTTP request body accepted (MB = 2^20 bytes; an upload to /datastore or /infer); larger ones get HTTP 413 "
                             "before anything is read or written; 0 = no limit."),
    "infer_concurrency": ("auto", "Inferences computed at once per device (more wait their turn; label saves, /info and the datastore never wait "
                                  "for them). `auto`: one per two CPU cores on a CPU, 2 per GPU."),
    "infer_order": ("response_ratio", "Which waiting inference a freed slot starts: `response_ratio` (highest (waited + expected) / expected "
                                      "first, expected = the model's recent service time: a quick grade is not queued behind long "
                                      "segmentations, and a long job's turn comes as it waits) or `arrival` (first come, first served). lib/offload.py."),
    "offload": ("true", "`true`: requests run in worker threads, off the event loop (lib/offload.py); `false`: MONAI Label's stock "
                        "handling, one request at a time on the event loop (for bench/load_test.py's comparison)."),
    "rescore_interval": ("10", "Seconds between checks for stale active-learning scores (after a retrain published a new model); "
                               "they are recomputed in a background thread while no inference runs, once the model has not changed for twice this long (a strategy that finds stale scores starts it at once). 0 = off."),
    "infer_workers": ("1", "Worker processes that run the server's inferences (each builds the served models once at start, "
                           "and runs one inference at a time); 0 = in the server process, in threads. A process has its own "
                           "Python interpreter, so label saves and /info never share one with the inferences."),
    "train_nice": ("idle", "CPU priority of background jobs (training), so annotators' requests come first on a busy machine: "
                         "a nice level 0-19 (0 = the server's own priority), or `idle`: Linux SCHED_IDLE, CPU time no "
                         "request wants (lib/priority.py)."),
    "train_on_start": ("", "Comma list of models to train in the background when the server starts (the demo uses `grading`)."),
    "retrain_after": ("0", "Retrain on correction: after this many new `final` labels of a kind a model learns from "
                           "(`learns_from` in configs/models.yaml), fine-tune it from the served model in the background; 0 = off."),
    "retrain_epochs": ("5", "Epochs of each retrain-on-correction fine-tuning run."),
    "<model>_max_epochs": ("(profile)", "Default number of epochs for the model's trainer."),
    "<model>_set": ("", "Override values of the model's profile: comma list of `dotted.key=value` (values in YAML), e.g. "
                        "`lesion_sam_set network.sam.checkpoint=/data/sam_vit_b_01ec64.pth,network.clip.pretrained=/data/clip_b16.bin` "
                        "(local weights) or `lesion_sam_set network.text_mode=name,network.injector=false` (the TP-DRSeg ablations); "
                        "lists and mappings in YAML brackets, e.g. `lesion_seg_set train.pos_weight=[10,3,1,1]`."),
    "<model>_lesion_checkpoint": ("<model_dir>/lesion_seg.pt", "Lesion-Net weights for a lesion-attention grading profile (`grading_profile attention`); frozen while the grader trains."),
    "<model>_attention_mode": ("FA", "Lesion attention as `FA` (F x A, the paper) or `F(1+A)`."),
    "twlr_inpainter_external": ("", "TorchScript inpainter file for `twlr_inpaint`'s `external` backend (e.g. an exported LaMa, "
                                    "with the learned `unet` backend's (image, mask) -> image contract; fundus/inpainting.py); "
                                    "needed only for requests with `backend external`."),
    "cam_threshold": (f"{CAM_THRESHOLD:g}", "CAM region-proposal threshold on the min-max normalised map (the CAM paper's value)."),
    "cam_method": ("cam", "`cam` (GAP + linear head, the paper) or `gradcam` (monai.visualize.GradCAM)."),
    "dicomweb_filter": ('{"Modality": "OP"}', "With `--studies http://.../dicom-web`: QIDO-RS filter (JSON) of the series served as photographs."),
    "dicomweb_cache": ("~/.cache/monailabel-dr/dicomweb", "With a DICOMweb server: folder of the local cache (photographs as PNG, labels, SEGs waiting for upload); one subfolder per server URL."),
    "dicomweb_refresh": ("10", "With a DICOMweb server: seconds between re-listings of the server (new series, SEGs, queued uploads)."),
    "dicomweb_retries": ("3", "With a DICOMweb server: attempts per request (exponential back-off) before HTTP 503 / a queued upload."),
    "dicomweb_timeout": ("30", "With a DICOMweb server: seconds per HTTP request."),
    "seg_segment_names": ("", "With a DICOMweb server: extra SEG segment names read as lesions, `NAME=LESION,...` "
                              "(e.g. `Bleeding=HE,Cotton wool=SE`); MA / HE / EX / SE and their long names are built in."),
}


@dataclass
class ModelSpec:
    """One row of configs/models.yaml."""

    name: str
    description: str
    network_config: str
    infers: dict[str, str]
    trainer: str | None
    checkpoint: str
    strategies: dict[str, str] = field(default_factory=dict)
    scoring: dict[str, str] = field(default_factory=dict)
    learns_from: tuple[str, ...] = ()   # final label kinds ("grade", "lesion_map") that retrain it on correction

    def network_profiles(self) -> dict[str, Any]:
        with open(CONFIG_DIR / self.network_config) as f:
            return yaml.safe_load(f)


def load_model_table(path: str | os.PathLike | None = None) -> dict[str, ModelSpec]:
    path = Path(path) if path else CONFIG_DIR / "models.yaml"
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    table = {}
    for name, row in raw.items():
        table[name] = ModelSpec(
            name=name,
            description=row.get("description", ""),
            network_config=row["network_config"],
            infers=dict(row.get("infers") or {}),
            trainer=row.get("trainer"),
            checkpoint=row.get("checkpoint", f"{name}.pt"),
            strategies=dict(row.get("strategies") or {}),
            scoring=dict(row.get("scoring") or {}),
            learns_from=tuple(str(k) for k in (row.get("learns_from") or ())),
        )
    return table


# the blocks a profile in configs/<model>.yaml may have (the `--conf <model>_set` keys start with one of them)
PROFILE_BLOCKS = ("image_size", "network", "train", "regression", "preprocess", "inference")


def import_object(ref: str):
    """Import "package.module:Name"."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class ModelSettings:
    """Resolved settings of one model (profile + overrides)."""

    spec: ModelSpec
    profile_name: str
    image_size: int
    network: dict
    train: Any                    # the trainer's typed settings (lib/trainers/settings.py), defaults filled in
    checkpoint_override: str | None
    model_dir: str
    options: dict = field(default_factory=dict)   # the profile's other blocks (e.g. TWLR's `regression`)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def published_path(self) -> str:
        """Where the trainer publishes the best model and the infer task looks first."""
        return os.path.join(self.model_dir, self.spec.checkpoint)

    @property
    def serve_path(self) -> str:
        """The checkpoint the infer tasks serve now.

        The model trained here (published in ``model_dir``) once it exists; before that the
        ``--conf <model>_checkpoint`` file, if given (MONAI Label's convention: the last
        existing path of a task's list is served).
        """
        if os.path.isfile(self.published_path) or not self.checkpoint_override:
            return self.published_path
        return self.checkpoint_override


@dataclass
class AppSettings:
    models: dict[str, ModelSettings]
    device: str
    max_image_pixels: int
    min_image_side: int
    train_on_start: list[str]
    retrain_after: int = 0
    retrain_epochs: int = 5
    max_upload_bytes: int = 100 * 2**20
    infer_concurrency: int | None = None   # None: lib/offload.default_infer_concurrency per device
    infer_order: str = "response_ratio"     # lib/offload.INFER_ORDERS
    offload: bool = True
    rescore_interval: float = 10.0
    train_nice: int | str = "idle"          # a nice level 0-19, or "idle" (lib/priority.py)
    infer_workers: int = 1
    extra: dict = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """A ``--conf`` value the code reads by name; every such key is in CONF_OPTIONS (the table that
        ``monailabel-dr conf`` prints and the README shows), so a new one cannot be left undocumented."""
        if key not in CONF_OPTIONS:
            raise KeyError(f"--conf {key!r} is read but not documented in config.CONF_OPTIONS")
        return self.extra.get(key, default)


class ConfError(ValueError):
    pass


def resolve_device(device: str) -> str:
    device = (device or "auto").strip().lower()
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _model_settings(name: str, conf: dict, table: dict[str, ModelSpec], model_dir: str) -> ModelSettings:
    """One model's settings: its profile (``--conf <name>_profile`` / ``profile`` / the YAML default) with
    ``--conf <name>_set`` applied, every block checked (unknown blocks refused, the train block typed, the
    preprocessing parsed, an attention grader's lesion model resolved), and the size / checkpoint overrides."""
    spec = table[name]
    profiles = spec.network_profiles()
    profile_name = str(conf.get(f"{name}_profile") or conf.get("profile") or profiles.get("default_profile"))
    if profile_name not in profiles["profiles"]:
        raise ConfError(
            f"--conf {name}_profile: unknown profile '{profile_name}' for {name}; "
            f"available: {sorted(profiles['profiles'])}"
        )
    profile = copy.deepcopy(profiles["profiles"][profile_name])
    if conf.get(f"{name}_set"):
        apply_overrides(profile, str(conf[f"{name}_set"]), f"--conf {name}_set")
    size = conf.get(f"{name}_image_size") or conf.get("image_size") or profile["image_size"]
    try:
        size = int(size)
    except ValueError as e:
        raise ConfError(f"--conf image_size must be an integer, got {size!r}") from e
    if size < 16 or size > 4096:
        raise ConfError(f"--conf image_size {size} is outside 16..4096")
    unknown = sorted(set(profile) - set(PROFILE_BLOCKS))
    if unknown:
        raise ConfError(f"{name} profile '{profile_name}': unknown key(s) {unknown}; accepted: {list(PROFILE_BLOCKS)}")
    train = dict(profile.get("train") or {})
    if conf.get(f"{name}_max_epochs"):
        try:
            train["max_epochs"] = int(conf[f"{name}_max_epochs"])
        except (TypeError, ValueError) as e:
            raise ConfError(f"--conf {name}_max_epochs must be an integer, got {conf[f'{name}_max_epochs']!r}") from e
    train = _typed_train(spec, profile_name, train)
    network = dict(profile.get("network") or {})
    if network.get("attention"):
        network["attention"] = _resolve_attention(name, network["attention"], conf, table, model_dir)
    if "preprocess" in profile:
        from monailabel_dr.fundus.preprocess import parse_preprocess

        try:
            profile["preprocess"] = parse_preprocess(profile["preprocess"])
        except ValueError as e:
            raise ConfError(f"{name} profile '{profile_name}': {e}") from e
    ckpt = conf.get(f"{name}_checkpoint") or None
    if ckpt:
        ckpt = os.path.realpath(os.path.expanduser(str(ckpt)))
    return ModelSettings(
        spec=spec,
        profile_name=profile_name,
        image_size=size,
        network=network,
        train=train,
        checkpoint_override=ckpt,
        model_dir=model_dir,
        options={k: copy.deepcopy(v) for k, v in profile.items() if k not in ("image_size", "network", "train")},
    )


def parse_conf(conf: dict[str, Any] | None, app_dir: str, table: dict[str, ModelSpec] | None = None) -> AppSettings:
    """Turn MONAI Label's string `--conf` dict into typed settings (raises ConfError on bad values)."""
    conf = {str(k): v for k, v in (conf or {}).items()}
    table = table or load_model_table()

    wanted = str(conf.get("models", "all")).strip()
    names = list(table) if wanted in ("", "all") else [m.strip() for m in wanted.split(",") if m.strip()]
    unknown = [m for m in names if m not in table]
    if unknown:
        raise ConfError(f"--conf models: unknown model(s) {unknown}; available: {sorted(table)}")

    model_dir = str(conf.get("model_dir") or os.path.join(app_dir, "model"))
    models = {name: _model_settings(name, conf, table, model_dir) for name in names}

    train_on_start = [m.strip() for m in str(conf.get("train_on_start", "")).split(",") if m.strip()]
    bad = [m for m in train_on_start if m not in models]
    if bad:
        raise ConfError(f"--conf train_on_start names models that are not served: {bad}")

    retrain = {}
    for key, default, low in (("retrain_after", 0, 0), ("retrain_epochs", 5, 1)):
        try:
            retrain[key] = int(conf.get(key, default))
        except (TypeError, ValueError) as e:
            raise ConfError(f"--conf {key} must be an integer, got {conf.get(key)!r}") from e
        if retrain[key] < low:
            raise ConfError(f"--conf {key} must be >= {low}, got {retrain[key]}")

    try:
        max_upload = float(conf.get("max_upload_mb", 100))
    except (TypeError, ValueError) as e:
        raise ConfError(f"--conf max_upload_mb must be a number of MB, got {conf.get('max_upload_mb')!r}") from e
    if max_upload < 0:
        raise ConfError(f"--conf max_upload_mb must be >= 0 (0 = no limit), got {max_upload}")

    ic = str(conf.get("infer_concurrency", "auto")).strip().lower()
    if ic in ("", "auto"):
        infer_concurrency = None
    else:
        try:
            infer_concurrency = int(ic)
        except ValueError as e:
            raise ConfError(f"--conf infer_concurrency must be `auto` or an integer 1..64, got {ic!r}") from e
        if not 1 <= infer_concurrency <= 64:
            raise ConfError(f"--conf infer_concurrency must be `auto` or an integer 1..64, got {infer_concurrency}")
    infer_order = str(conf.get("infer_order", CONF_OPTIONS["infer_order"][0])).strip().lower()
    if infer_order not in INFER_ORDERS:
        raise ConfError(f"--conf infer_order must be one of {', '.join(INFER_ORDERS)}, got {infer_order!r}")
    offload = str(conf.get("offload", "true")).strip().lower()
    if offload not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfError(f"--conf offload must be true or false, got {offload!r}")

    rescore_interval = _conf_number(conf, "rescore_interval", float, 0, 86400, "(seconds; 0 = off)")
    raw_nice = str(conf.get("train_nice", CONF_OPTIONS["train_nice"][0])).strip().lower()
    train_nice = "idle" if raw_nice == "idle" else _conf_number(conf, "train_nice", int, 0, 19, "or idle")
    infer_workers = _conf_number(conf, "infer_workers", int, 0, 16)

    return AppSettings(
        models=models,
        infer_workers=infer_workers,
        train_nice=train_nice,
        rescore_interval=rescore_interval,
        infer_concurrency=infer_concurrency,
        infer_order=infer_order,
        offload=offload in ("true", "1", "yes"),
        max_upload_bytes=int(max_upload * 2**20),
        device=resolve_device(str(conf.get("device", "auto"))),
        max_image_pixels=int(conf.get("max_image_pixels", 40_000_000)),
        min_image_side=int(conf.get("min_image_side", 64)),
        train_on_start=train_on_start,
        **retrain,
        extra={k: v for k, v in conf.items()},
    )


def _typed_train(spec: ModelSpec, profile_name: str, train: dict):
    """A profile's ``train`` block as its trainer's settings class (``settings_class``, lib/trainers/settings.py):
    typed, defaults filled in, an unknown key refused naming the accepted ones."""
    where = f"{spec.name} profile '{profile_name}' train"
    if not spec.trainer:
        if train:
            raise ConfError(f"{where}: {spec.name} has no trainer, so its train keys {sorted(train)} would do nothing")
        return None
    try:
        return import_object(spec.trainer).settings_class.from_dict(train, where)
    except ValueError as e:
        raise ConfError(str(e)) from e


def _conf_number(conf: dict, key: str, kind: type, low: float, high: float, unit: str = ""):
    """``--conf key`` as ``kind`` (int or float) in ``low..high``; its default is the one in CONF_OPTIONS."""
    raw = conf.get(key, CONF_OPTIONS[key][0])
    what = ("an integer" if kind is int else "a number") + f" in {low:g}..{high:g}" + (f" {unit}" if unit else "")
    try:
        value = kind(raw)
    except (TypeError, ValueError) as e:
        raise ConfError(f"--conf {key} must be {what}, got {raw!r}") from e
    if not low <= value <= high:
        raise ConfError(f"--conf {key} must be {what}, got {value}")
    return value


def _split_items(spec: str, what: str) -> list[str]:
    """``spec`` split at the commas outside YAML brackets, so a value may be a list or a mapping
    (``train.pos_weight=[10,3,1,1]``); unbalanced brackets are refused."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise ConfError(f"{what}: unbalanced {ch!r} in {spec!r}")
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    if depth:
        raise ConfError(f"{what}: unclosed bracket in {spec!r}")
    items.append(spec[start:])
    return [x.strip() for x in items if x.strip()]


def apply_overrides(profile: dict, spec: str, what: str = "overrides") -> dict:
    """Apply ``a.b=value,c=value`` (YAML values; commas inside [] or {} belong to the value) to a profile
    dict in place; unknown top-level keys are refused."""
    for item in _split_items(spec, what):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfError(f"{what}: {item!r} is not key=value")
        parts = key.strip().split(".")
        if parts[0] not in PROFILE_BLOCKS:
            raise ConfError(f"{what}: {key!r} must start with image_size, network., train., regression., preprocess "
                            "or inference.")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfError(f"{what}: value of {key!r} is not valid YAML: {e}") from e
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node = profile
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfError(f"{what}: {key!r} goes through {p!r}, which is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return profile


def _resolve_attention(name: str, att: dict, conf: dict, table: dict[str, ModelSpec], model_dir: str) -> dict:
    """Make a grader's ``attention`` block self-contained: the lesion network of a lesion_seg profile,
    its working size, and the checkpoint of the lesion branch (``--conf <model>_lesion_checkpoint``,
    default the lesion_seg model published in ``model_dir``)."""
    if "lesion_seg" not in table:
        raise ConfError(f"{name}: an attention profile needs the lesion_seg model in the table")
    lesion_profiles = table["lesion_seg"].network_profiles()["profiles"]
    lp = str(att.get("lesion_profile", "cpu"))
    if lp not in lesion_profiles:
        raise ConfError(f"{name}: attention.lesion_profile '{lp}' is not a lesion_seg profile ({sorted(lesion_profiles)})")
    ckpt = conf.get(f"{name}_lesion_checkpoint") or os.path.join(model_dir, table["lesion_seg"].checkpoint)
    from monailabel_dr.fundus.preprocess import parse_preprocess

    try:
        lesion_preprocess = parse_preprocess(lesion_profiles[lp].get("preprocess"))
    except ValueError as e:
        raise ConfError(f"{name}: lesion_seg profile '{lp}': {e}") from e
    return {
        "lesion": dict(lesion_profiles[lp]["network"]),
        "lesion_size": int(lesion_profiles[lp]["image_size"]),
        # the lesion profile's own preprocessing: the frozen branch sees what its trainer and infer task saw
        "lesion_preprocess": lesion_preprocess,
        "lesion_profile": lp,
        "lesion_checkpoint": os.path.realpath(os.path.expanduser(str(ckpt))),
        "mode": str(conf.get(f"{name}_attention_mode") or att.get("mode", "FA")),
        "mid_channels": int(att.get("mid_channels", 16)),
    }


def conf_table_markdown() -> str:
    rows = ["| `--conf` key | default | meaning |", "|---|---|---|"]
    for k, (d, m) in CONF_OPTIONS.items():
        rows.append(f"| `{k}` | `{d}` | {m} |")
    return "\n".join(rows)
