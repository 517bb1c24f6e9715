"""Training settings as checked data: a profile's ``train:`` block (YAML or ``--conf <model>_set train.*``)
becomes one of the frozen dataclasses below, typed on load, and a key the trainer does not read is an error
naming it and the accepted ones (a typo such as ``train.learnig_rate`` would otherwise train with the
default without a word).

Each trainer names its class (``settings_class``); ``config.parse_conf`` builds it, so a bad key stops the
server or the CLI at start-up, before any run. The defaults here are the only ones: the trainers read
``model.train.<field>`` and never carry a fallback of their own. A train *request* may still override a few
of them per run (``lib/params.py TRAIN_PARAMS``), checked there.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from monailabel_dr.fundus.counterfactual import CounterfactualSettings
from monailabel_dr.fundus.holes import HoleSettings
from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.networks.settings import refuse_unknown

N_CROP_CLASSES = len(LESIONS) + 1   # MA, HE, EX, SE, anywhere in the field of view


def _coerce(where: str, name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type (YAML gives ints for floats, lists for tuples), or ValueError naming it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(where, name, value, hint)
    bad = ValueError(f"{where}: {name}={value!r} is not {getattr(hint, '__name__', hint)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise bad
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: {name}={value!r} must be a list")
        return tuple(_coerce(where, f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
    return value


@dataclass(frozen=True)
class _Typed:
    """Shared loading rule: unknown keys refused, values typed, then each class's ``check``."""

    renames: ClassVar[Mapping[str, str]] = {}             # YAML name -> field name (``lambda`` is a Python keyword)
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    nested: ClassVar[Mapping[str, Any]] = {}              # field -> a settings class with from_dict (None stays None)

    @classmethod
    def accepted(cls) -> list[str]:
        back = {v: k for k, v in cls.renames.items()}
        return sorted(back.get(f.name, f.name) for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "train"):
        d = dict(d or {})
        refuse_unknown(d, cls.accepted(), where)            # YAML names (``lambda``), before the renaming
        d = {cls.renames.get(k, k): v for k, v in d.items()}
        hints = typing.get_type_hints(cls)
        out = {}
        for k, v in d.items():
            if k in cls.nested and not (v is None and type(None) in typing.get_args(hints[k])):
                try:
                    out[k] = cls.nested[k].from_dict(v, f"{where}.{k}") if issubclass(cls.nested[k], _Typed) \
                        else cls.nested[k].from_dict(v)
                except (TypeError, ValueError) as e:
                    raise ValueError(e if issubclass(cls.nested[k], _Typed) else f"{where}.{k}: {e}") from e
            else:
                out[k] = _coerce(where, k, v, hints[k])
        s = cls(**out)
        for k, allowed in cls.choices.items():
            if getattr(s, k) not in allowed:
                raise ValueError(f"{where}: {k}={getattr(s, k)!r}; accepted: {', '.join(allowed)}")
        s.check(where)
        return s

    def check(self, where: str) -> None:
        """Ranges beyond the type (override, calling super)."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _positive(where: str, **values) -> None:
    for k, v in values.items():
        if v is not None and v <= 0:
            raise ValueError(f"{where}: {k} must be > 0, got {v}")


@dataclass(frozen=True)
class LesionCrops(_Typed):
    """Lesion-centred crops (``lesion_data.lesion_centred_crops``): ``samples_per_image`` crops per image,
    centred on MA / HE / EX / SE / anywhere in the field of view in the ratios ``class_ratios``."""

    samples_per_image: int = 4
    class_ratios: tuple[float, ...] = (1.0,) * N_CROP_CLASSES

    def check(self, where: str) -> None:
        if len(self.class_ratios) != N_CROP_CLASSES or min(self.class_ratios) < 0 or sum(self.class_ratios) <= 0:
            raise ValueError(f"{where}: class_ratios needs {N_CROP_CLASSES} values >= 0 (MA, HE, EX, SE, anywhere), "
                             f"got {list(self.class_ratios)}")
        _positive(where, samples_per_image=self.samples_per_image)


@dataclass(frozen=True)
class SizedCrops(LesionCrops):
    """Lesion-centred crops of their own side (TWLR stage 1's ``train.crop``)."""

    size: int = 256

    def check(self, where: str) -> None:
        super().check(where)
        _positive(where, size=self.size)


CPU_PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainSettings(_Typed):
    """What every trainer reads (``common.trainer_config`` and ``FundusTrainTask.optimizer``: AdamW)."""

    max_epochs: int = 20
    seed: int = 0                        # a negative seed leaves a run unseeded
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    val_split: float = 0.2
    val_interval: int = 1                # epochs between validations
    ema_decay: float = 0.0               # > 0: validate and publish an EMA of the weights (common.EMAWeights)
    # bf16: training forward passes on a CPU under bfloat16 autocast where the CPU has native bf16
    # (common.CPUAutocastInferer); validation, published weights and serving stay float32
    cpu_precision: str = "fp32"

    def check(self, where: str) -> None:
        _positive(where, max_epochs=self.max_epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                  val_interval=self.val_interval)
        if self.cpu_precision not in CPU_PRECISIONS:
            raise ValueError(f"{where}: cpu_precision={self.cpu_precision!r}; accepted: {', '.join(CPU_PRECISIONS)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"{where}: ema_decay must be in [0, 1) (0: no averaging), got {self.ema_decay}")
        if not 0 <= self.val_split < 1:
            raise ValueError(f"{where}: val_split must be in [0, 1), got {self.val_split}")
        if self.weight_decay < 0:
            raise ValueError(f"{where}: weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class GraderTrainBase(TrainSettings):
    """Grade-learning trainers (grading, TWLR stage 1): the patient split and an exponential lr decay."""

    split_seed: int = 0                  # seed of the validation split by patient (fundus/patients.py)
    lr_gamma: float = 1.0                # per-epoch exponential decay; 1: constant


@dataclass(frozen=True)
class GradingTrain(GraderTrainBase):
    choices: ClassVar = {"optimizer": ("adamw", "sgd"), "class_balance": ("none", "inverse_sqrt", "inverse"),
                         "selection": ("kappa", "smoothed")}

    optimizer: str = "adamw"
    momentum: float = 0.9                # SGD only
    class_balance: str = "none"          # grade class weights from the training counts
    ordinal_weight: float = 0.0
    label_smoothing: float = 0.0
    selection: str = "kappa"             # which validation figure publishes a model (trainers/grading.py)
    selection_warmup: float = 0.0        # smoothed selection: the fraction of epochs before it may publish
    selection_window: int = 3


@dataclass(frozen=True)
class TWLRTrain(GraderTrainBase):
    nested: ClassVar = {"crop": SizedCrops, "counterfactual": CounterfactualSettings}

    learning_rate: float = 1e-4
    val_variants: int = 4                # fixed counterfactuals per validation image (idrid datasets)
    crop: SizedCrops | None = None       # lesion-centred crops at the working size (idrid datasets)
    counterfactual: CounterfactualSettings = field(default_factory=lambda: CounterfactualSettings.from_dict(None))


@dataclass(frozen=True)
class LesionSegTrain(TrainSettings, LesionCrops):
    renames: ClassVar = {"lambda": "lam"}
    choices: ClassVar = {"loss": ("dual_dice", "dice", "wbce", "focal"), "loss_schedule": ("dual", "paper")}

    patch_size: int = 384
    loss: str = "dual_dice"
    lam: float = 0.8                     # YAML ``lambda``: pixel vs image Dice in the dual Dice
    loss_schedule: str = "dual"          # paper: pixel Dice until the lr first drops, plateau lr, early stop
    bce_weight: float = 0.0
    pos_weight: tuple[float, ...] | None = None   # per lesion, weights its positive pixels in the BCE
    dice_smooth: float = 1.0
    plateau_patience: int = 4            # paper schedule, in validations
    early_stop_patience: int = 10        # paper schedule, in validations
    negatives_max: int = 0               # real negatives (healthy eyes, empty masks); >0 requires negatives_source
    negatives_source: str | None = None  # grades:<folder> (or the train request's)

    def check(self, where: str) -> None:
        TrainSettings.check(self, where)
        LesionCrops.check(self, where)
        _positive(where, patch_size=self.patch_size)
        if self.pos_weight is not None and len(self.pos_weight) != len(LESIONS):
            raise ValueError(f"{where}: pos_weight needs {len(LESIONS)} values ({', '.join(LESIONS)}), "
                             f"got {list(self.pos_weight)}")
        if self.negatives_max < 0:
            raise ValueError(f"{where}: negatives_max must be >= 0, got {self.negatives_max}")


@dataclass(frozen=True)
class LesionSamTrain(TrainSettings, LesionCrops):
    choices: ClassVar = {"lr_schedule": ("cosine", "constant")}

    learning_rate: float = 1e-4
    negative_prob: float = 0.2           # prompts naming a lesion the image does not show
    pos_weight: float = 1.0
    lr_schedule: str = "cosine"

    def check(self, where: str) -> None:
        TrainSettings.check(self, where)
        LesionCrops.check(self, where)
        if not 0 <= self.negative_prob <= 1:
            raise ValueError(f"{where}: negative_prob must be in [0, 1], got {self.negative_prob}")


@dataclass(frozen=True)
class InpainterTrain(TrainSettings):
    nested: ClassVar = {"holes": HoleSettings}

    crop_size: int = 128
    samples_per_image: int = 8
    val_samples_per_image: int = 4
    val_seed: int = 0
    ssim_weight: float = 0.0
    baseline_radius: int = 5             # OpenCV baseline's inpainting radius, for the PSNR comparison
    holes: HoleSettings = field(default_factory=lambda: HoleSettings.from_dict(None))

    def check(self, where: str) -> None:
        super().check(where)
        _positive(where, crop_size=self.crop_size, samples_per_image=self.samples_per_image,
                  val_samples_per_image=self.val_samples_per_image, baseline_radius=self.baseline_radius)
