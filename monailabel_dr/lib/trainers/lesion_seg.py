"""`lesion_seg` trainer: Lesion-Net from final lesion labels, or straight from an IDRiD-layout folder.

Data: :mod:`monailabel_dr.lib.trainers.lesion_data` (datastore label maps, or ``idrid:<folder>``
with its fixed train/validation split).

Each image's field of view is cropped and resized to the profile's working size (cached), then
``patch_size`` crops are sampled with MONAI's ``RandCropByLabelClassesd`` centred on MA / HE /
EX / SE / anywhere in the field of view in the profile's ratios, so microaneurysms (a few pixels)
are seen in most batches. Everything outside the field of view is ignored by the loss.
Validation runs on the whole working-size images and reports pooled Dice per lesion
(``val_dice_MA`` ...) and their mean (``val_mean_dice``, the key metric).
"""

from __future__ import annotations

import logging

import torch
from ignite.engine import Events
from monai.handlers import EarlyStopHandler, LrScheduleHandler
from monailabel.tasks.train.basic_train import Context

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.lib.checkpoints import PREPROCESS_KEY
from monailabel_dr.lib.trainers.common import (
    FundusTrainTask,
    attach_shared_handlers,
)
from monailabel_dr.lib.trainers.lesion_data import (
    LesionLabelSource,
    LesionTrainChains,
    PooledLesionDice,
    lesion_centred_crops,
)
from monailabel_dr.lib.trainers.settings import LesionSegTrain
from monailabel_dr.networks.lesion_net import LesionLoss, build_lesion_net

logger = logging.getLogger(__name__)

class LesionSegTrainer(LesionTrainChains, LesionLabelSource, FundusTrainTask):
    settings_class = LesionSegTrain
    model_title = "Lesion-Net"

    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app, f"Train Lesion-Net ({model.profile_name} profile, {model.image_size} px) "
                                     "from final lesion labels", val_batch_size=1)
        self._loss: LesionLoss | None = None

    # ------------------------------------------------------------ data (pre_process, partition: LesionLabelSource;
    # the transform chains: LesionTrainChains, with Lesion-Net's intensity standardisation and shift)
    def _crops(self, context: Context) -> list:
        return lesion_centred_crops(self.model.train, context.request,
                                    int(context.request.get("patch_size", self.model.train.patch_size)))

    # ------------------------------------------------------------ model
    def network(self, context: Context):
        return build_lesion_net(self.model.network)

    def publish_payload(self, state: dict) -> dict:
        """The weights and the preprocessing they were trained with: an infer task (or an attention grader's
        lesion branch) of another preprocessing refuses the file instead of serving meaningless maps."""
        return {"model": state, PREPROCESS_KEY: dict(self.model.options.get("preprocess") or {"method": "none"})}

    def loss_function(self, context: Context):
        t = self.model.train
        self._loss = LesionLoss(kind=t.loss, lam=t.lam, pos_weight=t.pos_weight, smooth=t.dice_smooth,
                                bce_weight=t.bce_weight)
        if t.loss_schedule == "paper" and self._loss.kind == "dual_dice":
            self._loss.use_dual = False  # pixel Dice until the learning rate first drops
        return self._loss

    def _paper_schedule(self) -> bool:
        return self.model.train.loss_schedule == "paper"

    def lr_scheduler_handler(self, context: Context):
        if self._paper_schedule():
            return None  # plateau-driven, attached to the evaluator in finalize()
        return self.cosine_schedule(context)

    def train_handlers(self, context: Context):
        handlers = super().train_handlers(context)
        if self._paper_schedule():
            handlers.append(_SwitchToDualOnLrDrop(self))
        return handlers

    def train_key_metric(self, context: Context):
        return {"train_mean_dice": PooledLesionDice()}

    def finalize(self, context: Context):
        attach_shared_handlers(self, context)
        if self._paper_schedule():
            self._attach_paper_schedule(context)

    def _attach_paper_schedule(self, context: Context) -> None:
        """The paper's schedule, counted in validations (``val_interval`` epochs each): the learning
        rate is divided by 10 when the validation mean Dice has not improved for ``plateau_patience``
        validations (paper: 4), and training stops after ``early_stop_patience`` (paper: 10). Without
        a validation set the learning rate stays constant and the pixel Dice is used throughout."""
        t = self.model.train
        if context.evaluator is None:
            logger.warning("paper schedule without a validation set: constant learning rate, pixel Dice only")
            return
        score = lambda engine: engine.state.metrics.get("val_mean_dice", 0.0)  # noqa: E731
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            context.optimizer, mode="max", factor=0.1, patience=t.plateau_patience)
        LrScheduleHandler(plateau, print_lr=True, epoch_level=True, step_transform=score).attach(context.evaluator)
        EarlyStopHandler(patience=t.early_stop_patience, score_function=score,
                         trainer=context.trainer).attach(context.evaluator)


class _SwitchToDualOnLrDrop:
    """The paper's schedule: train with the pixel Dice, switch to the dual Dice when the lr first drops."""

    def __init__(self, task: LesionSegTrainer):
        self.task = task
        self.initial_lr = None

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine):
        lr = engine.optimizer.param_groups[0]["lr"]
        if self.initial_lr is None:
            self.initial_lr = lr
        loss = self.task._loss
        if loss is not None and not loss.use_dual and lr < self.initial_lr:
            loss.use_dual = True
            logger.info(f"epoch {engine.state.epoch}: learning rate dropped to {lr:g}; switching to the dual Dice loss")
