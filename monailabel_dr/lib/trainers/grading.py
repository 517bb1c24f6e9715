"""`grading` trainer: the CAM grader trained from final labels in the datastore.

Targets come from final labels: a grade label (``ID.grade.json``: grade and/or
lesion presence flags, saved through ``PUT /datastore/label`` or written by
``monailabel-dr import``) and, when present, a lesion label map (values 1-4 give
lesion presence).  Unknown entries are masked out of the loss, so an image with
only lesion labels still trains the lesion-presence head.

Training statistics (``/info`` -> ``train_stats.grading``) carry quadratic
weighted kappa and accuracy of the grade for training and validation epochs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from ignite.handlers import EarlyStopping
from ignite.metrics import EpochMetric
from monai.handlers import LrScheduleHandler, stopping_fn_from_metric
from monai.transforms import (
    EnsureTyped,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandFlipd,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
)
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import Context

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.fundus import io
from monailabel_dr.fundus.labels import LabelFormatError, is_grade_label_file, read_grade_label
from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.lib.checkpoints import check_preprocess
from monailabel_dr.lib.errors import Conflict
from monailabel_dr.lib.trainers.settings import GradingTrain
from monailabel_dr.lib.trainers.common import (
    FundusTrainTask,
    attach_shared_handlers,
    stack_pred_label,
)
from monailabel_dr.fundus.patients import has_eye_suffix, patient_split, split_description
from monailabel_dr.metrics.grading import accuracy, quadratic_weighted_kappa, selection_score
from monailabel_dr.networks.attention_grader import build_grader
from monailabel_dr.fundus.labels import make_targets
from monailabel_dr.networks.cam_grader import N_GRADES, GraderLoss, grade_class_weights, split_outputs
from monailabel_dr.transforms import LESION_MAPS_KEY, LoadFundusd, lesion_map_transforms, preprocessing_transforms

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- metrics glue
def _kappa(y_pred: torch.Tensor, y: torch.Tensor) -> float:
    k = quadratic_weighted_kappa(y[:, 0].cpu().numpy(), y_pred[:, :N_GRADES].argmax(1).cpu().numpy())
    return 0.0 if np.isnan(k) else k


def _accuracy(y_pred: torch.Tensor, y: torch.Tensor) -> float:
    a = accuracy(y[:, 0].cpu().numpy(), y_pred[:, :N_GRADES].argmax(1).cpu().numpy())
    return 0.0 if np.isnan(a) else a


def kappa_metric() -> EpochMetric:
    return EpochMetric(_kappa, output_transform=stack_pred_label, check_compute_fn=False)


def accuracy_metric() -> EpochMetric:
    return EpochMetric(_accuracy, output_transform=stack_pred_label, check_compute_fn=False)


def _selection(y_pred: torch.Tensor, y: torch.Tensor) -> float:
    out = split_outputs(y_pred.float().cpu())
    return selection_score(y[:, 0].cpu().numpy(), out["grade"].numpy(), out["referable"].numpy())


class SmoothedSelection(EpochMetric):
    """The model-selection criterion: :func:`selection_score` (mean of quadratic weighted kappa and
    referable-DR AUC) averaged over the last ``window`` validations, and -1 before ``warmup``
    validations have run.

    A kappa measured on ~80 validation eyes moves by +-0.1 between neighbouring epochs, so selecting the
    single best epoch picks noise (an epoch-5 model was published that way); the running mean selects an
    epoch whose neighbourhood was good, and the warm-up keeps the barely trained first epochs out. The
    history lives in the metric object, i.e. for one training run (one evaluator)."""

    def __init__(self, window: int = 3, warmup: int = 0):
        self.window = max(1, int(window))
        self.warmup = max(0, int(warmup))
        self.history: list[float] = []
        super().__init__(_selection, output_transform=stack_pred_label, check_compute_fn=False)

    def compute(self) -> float:
        raw = float(super().compute())
        self.history.append(raw if np.isfinite(raw) else 0.0)
        if len(self.history) < max(self.warmup, 1):
            return -1.0
        return float(np.mean(self.history[-self.window:]))


def _raw_selection_metric() -> EpochMetric:
    return EpochMetric(_selection, output_transform=stack_pred_label, check_compute_fn=False)


def _referable_auc(y_pred: torch.Tensor, y: torch.Tensor) -> float:
    from monailabel_dr.metrics.grading import referable_auc

    v = referable_auc(y[:, 0].cpu().numpy(), torch.sigmoid(y_pred[:, N_GRADES].float()).cpu().numpy())
    return 0.0 if np.isnan(v) else v


# ---------------------------------------------------------------- targets
def targets_from_labels(files: dict[str, str], presence: dict[str, bool] | None = None) -> list[float] | None:
    """Target vector from an image's final label files, or None if nothing usable.

    ``presence``: exact lesion flags kept in a lesion map's label info (e.g. by the IDRiD
    import), which a single-valued label map cannot show where lesions overlap.
    """
    grade = None
    lesions: dict[str, Any] = {k.upper(): bool(v) for k, v in (presence or {}).items() if k.upper() in LESIONS}
    if "grade" in files:
        try:
            g = read_grade_label(files["grade"])
        except LabelFormatError as e:
            logger.warning(f"skipping unreadable grade label {files['grade']}: {e}")
            g = None
        if g is not None:
            grade = g.grade
            lesions.update(g.lesions)
    if "lesion_map" in files:
        try:
            lab = io.read_label(files["lesion_map"])
            present = set(io.label_values(lab).tolist())
            for i, name in enumerate(LESIONS):
                lesions.setdefault(name, (i + 1) in present)
        except Exception as e:  # an unreadable map must not stop training on the others
            logger.warning(f"skipping unreadable lesion map {files['lesion_map']}: {e}")
    if grade is None and not lesions:
        return None
    return make_targets(grade, lesions)


class GradingTrainer(FundusTrainTask):
    settings_class = GradingTrain

    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app, f"Train the DR grader ({model.profile_name} profile, {model.image_size} px) "
                                     "from final grade labels")

    # ------------------------------------------------------------ data
    def pre_process(self, request, datastore: Datastore):
        items = []
        finder = getattr(datastore, "final_label_files", None)
        for image_id in sorted(datastore.list_images()):
            if finder is not None:
                files = finder(image_id)
            else:  # generic datastores: the single final label, if it is a grade label
                lab = datastore.get_label_by_image_id(image_id, "final")
                files = {"grade": datastore.get_label_uri(lab, "final")} if lab and is_grade_label_file(datastore.get_label_uri(lab, "final")) else {}
            if not files:
                continue
            presence = None
            if "lesion_map" in files:
                info = datastore.get_label_info(image_id, "final") or {}
                if info.get("kind") == "lesion_map":
                    presence = info.get("lesion_presence")
            target = targets_from_labels(files, presence)
            if target is None:
                continue
            items.append({"image": datastore.get_image_uri(image_id), "label": target, "id": image_id})
        if not items:
            raise Conflict(
                "no final grade labels to train the grader on: save grade labels "
                '(PUT /datastore/label with a JSON file {"grade": 0-4}) or run `monailabel-dr import --grades CSV`'
            )
        logger.info(f"grading: {len(items)} labelled images")
        return items

    def _lesion_maps(self, context: Context) -> tuple[list, list]:
        """A lesion-attention profile: the frozen branch's maps, computed once per image from the photograph
        at the branch's working size (deterministic, so CacheDataset keeps them) and concatenated to the
        image; the infer tasks run the same transforms."""
        def branch():
            net = context.network.module if hasattr(context.network, "module") else context.network
            return net.lesion_net
        return lesion_map_transforms(self.model.network, branch, self.model.image_size,
                                     self.app_settings.max_image_pixels, self.app_settings.min_image_side,
                                     device=str(context.device))

    def train_pre_transforms(self, context: Context):
        before, after = self._lesion_maps(context)
        spatial = ["image", LESION_MAPS_KEY] if after else ["image"]
        return [
            *before,
            self._load(),
            *preprocessing_transforms(self.model.options),
            RandFlipd(keys=spatial, prob=0.5, spatial_axis=0),
            RandFlipd(keys=spatial, prob=0.5, spatial_axis=1),
            RandRotate90d(keys=spatial, prob=0.5),
            RandRotated(keys=spatial, range_x=np.pi / 12, prob=0.3, padding_mode="zeros"),
            # random brightness and contrast, as in the CAM paper's augmentation (the image only, not its lesion maps)
            RandScaleIntensityd(keys="image", factors=0.15, prob=0.5),
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.5),
            *self._normalise(),
            *after,
            EnsureTyped(keys="label", data_type="tensor", dtype=torch.float32, track_meta=False),
        ]

    def val_pre_transforms(self, context: Context):
        before, after = self._lesion_maps(context)
        return [
            *before,
            self._load(),
            *preprocessing_transforms(self.model.options),
            *self._normalise(),
            *after,
            EnsureTyped(keys="label", data_type="tensor", dtype=torch.float32, track_meta=False),
        ]

    def _normalise(self) -> list:
        """The CAM paper standardises each image by its own mean and std."""
        return [NormalizeIntensityd(keys="image")]

    def _load(self):
        return LoadFundusd(
            keys="image",
            size=self.model.image_size,
            max_pixels=self.app_settings.max_image_pixels,
            min_side=self.app_settings.min_image_side,
        )

    def train_post_transforms(self, context: Context):
        return None

    def val_post_transforms(self, context: Context):
        return None

    # ------------------------------------------------------------ model
    def network(self, context: Context):
        net = build_grader(self.model.network)
        att = self.model.network.get("attention")
        if att:  # the paper trains the grader with a pre-trained, fixed Lesion-Net
            path = att["lesion_checkpoint"]
            if not os.path.isfile(path):
                raise Conflict(f"the '{self.model.profile_name}' grading profile needs a trained lesion_seg model at {path}: "
                               f"train lesion_seg first, or set --conf {self.model.name}_lesion_checkpoint PATH")
            try:   # the branch's maps are computed with the lesion profile's preprocessing (LesionMapsd)
                check_preprocess(path, att.get("lesion_preprocess"), f"lesion_seg profile '{att['lesion_profile']}'")
            except ValueError as e:
                raise Conflict(f"the '{self.model.profile_name}' grading profile's lesion branch: {e}") from e
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.lesion_net.load_state_dict(state.get("model", state))
            net.freeze_lesion_branch()
        return net

    def optimizer(self, context: Context):
        t = self.model.train
        if t.optimizer != "sgd":
            return super().optimizer(context)   # AdamW (FundusTrainTask)
        params = [p for p in context.network.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.learning_rate(context), momentum=t.momentum, weight_decay=t.weight_decay)


    def loss_function(self, context: Context):
        t = self.model.train
        weights = None
        if t.class_balance != "none":   # inverse_sqrt or inverse (GradingTrain.choices)
            grades = [int(d["label"][0]) for d in (context.train_datalist or context.datalist)]
            weights = grade_class_weights(grades, power=0.5 if t.class_balance == "inverse_sqrt" else 1.0)
            logger.info(f"grading: class weights {weights} ({t.class_balance} of the training grade counts)")
        return GraderLoss(ordinal_weight=t.ordinal_weight, class_weights=weights, label_smoothing=t.label_smoothing)

    def lr_scheduler_handler(self, context: Context):
        gamma = self.model.train.lr_gamma
        if gamma >= 1.0:
            return None
        sched = torch.optim.lr_scheduler.ExponentialLR(context.optimizer, gamma=gamma)
        return LrScheduleHandler(sched, print_lr=True, epoch_level=True)

    def train_key_metric(self, context: Context):
        return {"train_kappa": kappa_metric()}

    def train_additional_metrics(self, context: Context):
        return {"train_acc": accuracy_metric()}

    val_key = "val_kappa"   # the validation metric that selects the published model (and early stopping)

    @property
    def _selection(self) -> str:
        """``kappa`` (the best validation kappa, the default) or ``smoothed`` (:class:`SmoothedSelection`)."""
        return self.model.train.selection

    def val_key_metric(self, context: Context):
        if self._selection == "smoothed":
            t = self.model.train
            warmup = int(round(t.selection_warmup * int(context.max_epochs)))
            return {"val_select": SmoothedSelection(window=t.selection_window, warmup=warmup)}
        return {"val_kappa": kappa_metric()}

    def val_additional_metrics(self, context: Context):
        extra = {"val_acc": accuracy_metric(), "val_referable_auc": EpochMetric(
            _referable_auc, output_transform=stack_pred_label, check_compute_fn=False)}
        if self._selection == "smoothed":
            extra.update({"val_kappa": kappa_metric(), "val_select_raw": _raw_selection_metric()})
        return extra

    def partition_datalist(self, context: Context, shuffle=False):
        """Validation by patient (:func:`monailabel_dr.fundus.patients.patient_split`) when the ids carry an eye
        suffix: both eyes of a patient on the same side, grades stratified. Ids without one (phantoms, IDRiD)
        keep MONAI Label's split by image (the last ``val_split`` of the sorted ids). The split used is in the
        run's stats (``split``). Too few images: train on all, select by training kappa."""
        self._last_split = None
        if context.request.get("val_ds") or context.request.get("train_ds"):
            return super().partition_datalist(context, shuffle=shuffle)
        val_split = float(context.request.get("val_split", 0.0) or 0.0)
        if len(context.datalist) < 5 or val_split <= 0:
            context.request["val_split"] = 0.0
            self._last_split = {"kind": "none", "train_images": len(context.datalist), "val_images": 0}
            return super().partition_datalist(context, shuffle=shuffle)
        seed = self.model.train.split_seed
        by_id = {d["id"]: d for d in context.datalist}
        ids = sorted(by_id)
        if not any(has_eye_suffix(i) for i in ids):
            # no patient in the ids: MONAI Label's own split (the last val_split of the sorted ids), as before
            train, val = super().partition_datalist(context, shuffle=shuffle)
            self._last_split = {**split_description([d["id"] for d in train], [d["id"] for d in val], seed=seed),
                                "rule": "MONAI Label's partition_dataset: the last val_split of the ids (no eye suffix, "
                                        "so no patient to group by)"}
            context.split_info = self._last_split
            return train, val
        train_ids, val_ids = patient_split(ids, [int(by_id[i]["label"][0]) for i in ids], val_split, seed=seed)
        self._last_split = split_description(train_ids, val_ids, seed=seed)
        logger.info(f"grading split: {self._last_split}")
        context.split_info = self._last_split
        return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]

    def __call__(self, request, datastore):
        stats = super().__call__(request, datastore)
        if isinstance(stats, dict) and getattr(self, "_last_split", None):
            stats["split"] = self._last_split
        return stats

    # ------------------------------------------------------------ what the published checkpoint records
    def publish_payload(self, state: dict) -> dict:
        """The weights and the profile they were trained with, so ``evaluate --checkpoint`` and a server
        started on another profile know what the file is (:func:`monailabel_dr.lib.evaluation.checkpoint_profile`)."""
        return {"model": state, "grading_profile": profile_record(self.model)}

    def finalize(self, context: Context):
        attach_shared_handlers(self, context)
        patience = int(context.request.get("early_stop_patience", 0) or 0)
        if patience > 0 and context.evaluator:
            stopper = EarlyStopping(patience=patience, score_function=stopping_fn_from_metric(self.val_key),
                                    trainer=context.trainer)
            context.evaluator.add_event_handler(Events.EPOCH_COMPLETED, stopper)


def profile_record(model: ModelSettings) -> dict:
    """What a grading checkpoint records of the profile it was trained with (JSON-able)."""
    network = dict(model.network)
    att = network.get("attention")
    if att:  # the resolved block holds paths of this machine; keep what the profile said
        network["attention"] = {k: att[k] for k in ("lesion_profile", "mode", "mid_channels") if k in att}
    t = model.train
    return {"name": model.profile_name, "image_size": int(model.image_size), "network": network,
            "preprocess": model.options.get("preprocess", {"method": "none"}),
            "val_split": t.val_split, "split_seed": t.split_seed}
