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
from monailabel_dr.lib.errors import Conflict
from monailabel_dr.lib.trainers.common import (
    FundusTrainTask,
    attach_publisher,
    stack_pred_label,
    trainer_config,
)
from monailabel_dr.metrics.grading import accuracy, quadratic_weighted_kappa
from monailabel_dr.networks.attention_grader import build_grader
from monailabel_dr.networks.cam_grader import N_GRADES, GraderLoss, make_targets
from monailabel_dr.transforms import LoadFundusd

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
            present = set(np.unique(lab).tolist())
            for i, name in enumerate(LESIONS):
                lesions.setdefault(name, (i + 1) in present)
        except Exception as e:  # an unreadable map must not stop training on the others
            logger.warning(f"skipping unreadable lesion map {files['lesion_map']}: {e}")
    if grade is None and not lesions:
        return None
    return make_targets(grade, lesions)


class GradingTrainer(FundusTrainTask):
    def __init__(self, model: ModelSettings, app: AppSettings):
        self.model = model
        self.app_settings = app
        config = trainer_config(model, app)
        super().__init__(
            model_dir=os.path.join(model.model_dir, model.name),
            description=f"Train the DR grader ({model.profile_name} profile, {model.image_size} px) from final grade labels",
            config=config,
            amp=app.device.startswith("cuda"),
            publish_path=model.published_path,
            load_path=model.checkpoint_override,
            key_metric_filename="model.pt",
            tracking=None,
        )

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

    def train_pre_transforms(self, context: Context):
        return [
            self._load(),
            RandFlipd(keys="image", prob=0.5, spatial_axis=0),
            RandFlipd(keys="image", prob=0.5, spatial_axis=1),
            RandRotate90d(keys="image", prob=0.5),
            RandRotated(keys="image", range_x=np.pi / 12, prob=0.3, padding_mode="zeros"),
            # random brightness and contrast, as in the CAM paper's augmentation
            RandScaleIntensityd(keys="image", factors=0.15, prob=0.5),
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.5),
            *self._normalise(),
            EnsureTyped(keys="label", data_type="tensor", dtype=torch.float32, track_meta=False),
        ]

    def val_pre_transforms(self, context: Context):
        return [
            self._load(),
            *self._normalise(),
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
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.lesion_net.load_state_dict(state.get("model", state))
            net.freeze_lesion_branch()
        return net

    def optimizer(self, context: Context):
        t = self.model.train
        lr = float(context.request.get("learning_rate", t.get("learning_rate", 1e-3)))
        wd = float(t.get("weight_decay", 0.0))
        params = [p for p in context.network.parameters() if p.requires_grad]
        if str(t.get("optimizer", "adamw")).lower() == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=float(t.get("momentum", 0.9)), weight_decay=wd)
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


    def loss_function(self, context: Context):
        return GraderLoss()

    def lr_scheduler_handler(self, context: Context):
        gamma = float(self.model.train.get("lr_gamma", 1.0))
        if gamma >= 1.0:
            return None
        sched = torch.optim.lr_scheduler.ExponentialLR(context.optimizer, gamma=gamma)
        return LrScheduleHandler(sched, print_lr=True, epoch_level=True)

    def train_key_metric(self, context: Context):
        return {"train_kappa": kappa_metric()}

    def train_additional_metrics(self, context: Context):
        return {"train_acc": accuracy_metric()}

    val_key = "val_kappa"   # the validation metric that selects the published model (and early stopping)

    def val_key_metric(self, context: Context):
        return {"val_kappa": kappa_metric()}

    def val_additional_metrics(self, context: Context):
        return {"val_acc": accuracy_metric()}

    def partition_datalist(self, context: Context, shuffle=False):
        # Too few images for a validation split: train on all and select by training kappa.
        if len(context.datalist) < 5:
            context.request["val_split"] = 0.0
        return super().partition_datalist(context, shuffle=shuffle)

    def finalize(self, context: Context):
        attach_publisher(self, context)
        patience = int(context.request.get("early_stop_patience", 0) or 0)
        if patience > 0 and context.evaluator:
            stopper = EarlyStopping(patience=patience, score_function=stopping_fn_from_metric(self.val_key),
                                    trainer=context.trainer)
            context.evaluator.add_event_handler(Events.EPOCH_COMPLETED, stopper)
