"""`lesion_seg` trainer: Lesion-Net from final lesion labels, or straight from an IDRiD-layout folder.

Data: :mod:`monailabel_dr.lib.trainers.lesion_data` (datastore label maps, or ``idrid:<folder>``
with its fixed train/validation split).

Each image's field of view is cropped and resized to the profile's working size (cached), then
``patch_size`` crops are sampled with MONAI's ``RandCropByLabelClassesd`` centred on MA / HE /
EX / SE / anywhere in the field of view in the profile's ratios, so microaneurysms (a few pixels)
are seen in most batches. Everything outside the field of view is ignored by the loss.
Validation runs on the whole working-size images and reports pooled Dice per lesion
(``val_dice_MA`` ...) and their mean (``val_mean_dice``, the key metric).

An ensemble profile (``network.members`` K > 1, :class:`~monailabel_dr.networks.lesion_net.LesionEnsemble`)
trains its members one after the other, each exactly as a single-network run of the profile with the seed
``seed + k`` (its own run folder ``<name>_member<k>``, its own validation-selected weights, published to
``lesion_seg.member<k>.pt`` beside the served file, from which a later run fine-tunes it), then
:meth:`LesionSegTrainer.combine` validates the ensemble on the same validation images, chooses its
per-lesion operating thresholds there, and publishes it. The served file changes only then.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil

import numpy as np
import torch
from ignite.engine import Events
from monai.handlers import EarlyStopHandler, LrScheduleHandler
from monailabel.tasks.train.basic_train import Context

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.lib.checkpoints import (
    PREPROCESS_KEY,
    check_members,
    check_preprocess,
    load_weights,
    read_record,
    write_checkpoint,
)
from monailabel_dr.lib.errors import BadInput
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
from monailabel_dr.networks.lesion_net import LesionLoss, build_lesion_net, member_config

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
        # an ensemble profile trains one member per run (__call__)
        return build_lesion_net(member_config(self.model.network) if self.members > 1 else self.model.network)

    # ------------------------------------------------------------ ensembles (network.members > 1)
    @property
    def members(self) -> int:
        return int(self.model.network.get("members", 1) or 1)

    def member_path(self, k: int) -> str:
        """Where member ``k`` of an ensemble profile is published: beside the served file."""
        root, ext = os.path.splitext(self.model.published_path)
        return f"{root}.member{k}{ext}"

    def __call__(self, request, datastore):
        if self.members == 1:
            return super().__call__(request, datastore)
        request = self.check_request(request)
        seed = request.get("seed", self._config.get("seed"))
        name = str(request.get("name") or self._config.get("name"))
        served, stats = self._publish_path, []
        try:
            for k in range(self.members):
                self._publish_path = self.member_path(k)   # what this member run publishes (and resumes from)
                run = dict(request, name=f"{name}_member{k}")
                if seed is not None and int(seed) >= 0:    # a negative seed: unseeded runs
                    run["seed"] = int(seed) + k
                logger.info(f"ensemble member {k + 1} of {self.members}: seed {run.get('seed', seed)}, "
                            f"publishing to {self._publish_path}")
                stats.append(super().__call__(run, datastore))
        finally:
            self._publish_path = served
        record = self.combine([self.member_path(k) for k in range(self.members)], request, datastore)
        return {"members": stats, "ensemble": record}

    def combine(self, member_files: list[str], request: dict, datastore) -> dict:
        """Put ``member_files`` (checkpoints of this profile's single network, e.g. the member runs) into the
        profile's ensemble, validate it on the trainer's validation images at the working size (the metrics of
        every validation: pooled Dice per lesion, their mean, the per-lesion operating thresholds), and publish
        it with that record to the served path. Returns the record."""
        if len(member_files) != self.members:
            raise BadInput(f"the '{self.model.profile_name}' profile is an ensemble of {self.members} networks; "
                           f"{len(member_files)} member checkpoint(s) given")
        preprocess = dict(self.model.options.get("preprocess") or {"method": "none"})
        ensemble = build_lesion_net(self.model.network)
        for k, path in enumerate(member_files):
            if not os.path.isfile(path):
                raise BadInput(f"ensemble member {k}: no checkpoint at {path}")
            try:
                check_preprocess(path, preprocess, f"the '{self.model.profile_name}' profile")
                check_members(path, 1, "an ensemble member")
                load_weights(ensemble.members[k], path, "cpu")
            except Exception as e:
                raise BadInput(f"ensemble member {k} ({path}) does not fit the '{self.model.profile_name}' "
                               f"profile's network: {type(e).__name__}: {str(e)[:300]}") from e
        device = torch.device(self.app_settings.device)
        ensemble = ensemble.to(device).eval()
        req = {**self._config, **self.check_request(dict(request or {}))}
        context = Context()
        context.request, context.local_rank = req, 0
        context.datalist = self.pre_process(req, datastore)
        train, val = self.partition_datalist(context)
        metrics = self.val_metrics_of(ensemble, val, device)
        members = [read_record(p) or {} for p in member_files]
        record = {
            "metric": "val_mean_dice" if metrics else None,
            "value": round(float(metrics["val_mean_dice"]), 4) if metrics else None,
            "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
            "epoch": max(int(m.get("epoch") or 0) for m in members),
            "epochs_run": max(int(m.get("epochs_run") or 0) for m in members),
            "max_epochs": max(int(m.get("max_epochs") or 0) for m in members),
            "complete": all(bool(m.get("complete")) for m in members),
            "n_train": len(train), "n_val": len(val),
            "trained_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "run": "ensemble", "resumed_from": None,
            "split": members[0].get("split"),
            "members": [{"checkpoint": os.path.realpath(p), "run": m.get("run"), "epoch": m.get("epoch"),
                         "metric": m.get("metric"), "value": m.get("value")} for p, m in zip(member_files, members)],
        }
        # members given from elsewhere are kept beside the served file too, where a later run (saved corrections)
        # fine-tunes each from its own weights instead of starting it from scratch
        for k, path in enumerate(member_files):
            if os.path.realpath(path) != os.path.realpath(self.member_path(k)):
                os.makedirs(os.path.dirname(self.member_path(k)) or ".", exist_ok=True)
                tmp = f"{self.member_path(k)}.tmp{os.getpid()}"
                shutil.copyfile(path, tmp)
                os.replace(tmp, self.member_path(k))
        state = {k: v.detach().cpu() for k, v in ensemble.state_dict().items()}
        write_checkpoint(self.model.published_path, self.publish_payload(state), record)
        logger.info(f"ensemble of {self.members} published to {self.model.published_path}: "
                    f"val_mean_dice {record['value']}")
        return record

    def val_metrics_of(self, network, val: list[dict], device) -> dict:
        """The trainer's validation metrics (val_key_metric and val_additional_metrics) of ``network`` on the
        validation items: MONAI's SupervisedEvaluator over the trainer's validation chain, as a run's evaluator."""
        from monai.data import DataLoader, Dataset
        from monai.engines import SupervisedEvaluator
        from monai.inferers import SimpleInferer

        if not val:
            return {}
        evaluator = SupervisedEvaluator(
            device=device, val_data_loader=DataLoader(Dataset(val, self.val_pre_transforms(None)), batch_size=1),
            network=network, inferer=SimpleInferer(), key_val_metric=self.val_key_metric(None),
            additional_metrics=self.val_additional_metrics(None))
        evaluator.run()
        return {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float, np.floating))}

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
