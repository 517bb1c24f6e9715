"""What every trainer of the app shares: publishing, resuming and the metric glue."""

from __future__ import annotations

import json
import logging
import os

import torch
from ignite.engine import Events
from monai.handlers import LrScheduleHandler, from_engine
from monai.inferers import SimpleInferer
from monai.utils import set_determinism
from monailabel.tasks.train.basic_train import BasicTrainTask
from monailabel.tasks.train.handler import PublishStatsAndModel

from monailabel_dr.lib.trainers.settings import TrainSettings

logger = logging.getLogger(__name__)


def stack_pred_label(output) -> tuple[torch.Tensor, torch.Tensor]:
    """Ignite output transform for MONAI's decollated engine output (list of dicts)."""
    if isinstance(output, dict):
        return output["pred"], output["label"]
    preds, labels = from_engine(["pred", "label"])(output)
    return torch.stack([torch.as_tensor(p) for p in preds]), torch.stack([torch.as_tensor(t) for t in labels])


class AtomicPublish(PublishStatsAndModel):
    """MONAI Label's publisher, with two changes.

    - The served file and the train stats are replaced atomically (the stock handler copies over both
      in place, so an /infer arriving mid-copy could read half a checkpoint, and ``/info`` or an
      ``/infer`` reading the stats mid-copy got HTTP 500, seen under load on 2026-12-07), and the model is
      written through the task's
      ``publish_payload(state_dict)`` when it has one (TP-DRSeg publishes only what it trained).
    - Without validation images the *latest* weights are published each epoch: the stock rule
      (best training metric) selects by a metric measured on random augmented patches, which is
      noise, and can publish an early epoch that never saw a correction.
    """

    def __init__(self, *args, network=None, export=None, resumed_from=None, split=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.network = network
        self.resumed_from = resumed_from   # the checkpoint this run started from (None: from scratch), in the stats
        self.split = split                 # how train / validation were split (grade trainers), in the stats
        # export(state_dict) -> what the published file holds; default {"model": state_dict}
        self.export = export or (lambda state: {"model": state})
        self._exported_from = None  # (mtime, size) of the run checkpoint last exported

    def iteration_completed(self):
        publish_path, self._publish_path = self._publish_path, None
        stats_path, self._stats_path = self._stats_path, None   # no in-place copy: written atomically below
        try:
            stats = super().iteration_completed()
        finally:
            self._publish_path, self._stats_path = publish_path, stats_path
        if stats is not None and self._stats_path:
            stats["resumed_from"] = self.resumed_from
            if self.split is not None:
                stats["split"] = self.split
            tmp = f"{self._stats_path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(stats, f, indent=2)
            os.replace(tmp, self._stats_path)
        if not publish_path:
            return stats
        if self.evaluator is None and self.network is not None:
            net = self.network.module if hasattr(self.network, "module") else self.network
            self._record = self._make_record(complete=False)
            self._write(publish_path, self.export(net.state_dict()))
            logger.info(f"Latest model published (no validation set): {publish_path}")
            return stats
        best = os.path.join(self.output_dir, self._key_metric_filename)
        if not os.path.exists(best):
            return stats
        st = os.stat(best)
        if self._exported_from != (st.st_mtime_ns, st.st_size) or not os.path.exists(publish_path):
            state = torch.load(best, map_location="cpu", weights_only=True)
            self._record = self._make_record(complete=False)   # the evaluator's metrics are the new best's
            self._write(publish_path, self.export(state.get("model", state)))
            self._exported_from = (st.st_mtime_ns, st.st_size)
            logger.info(f"New model published: {best} => {publish_path}")
        return stats

    # ------------------------------------------------------------ the validation record (lib/checkpoints.py)
    def _make_record(self, complete: bool) -> dict:
        from monailabel_dr.lib.checkpoints import make_record

        return make_record(self.trainer, self.evaluator, self.run_id, self.resumed_from, self.split, complete)

    def _write(self, publish_path: str, payload: dict) -> None:
        from monailabel_dr.lib.checkpoints import write_checkpoint

        write_checkpoint(publish_path, payload, self._record)

    def finished(self, engine=None) -> None:
        """The run ended (all epochs, or early stopping): the published file's record says so."""
        publish_path = self._publish_path
        record = getattr(self, "_record", None)
        if not publish_path or record is None or not os.path.exists(publish_path):
            return
        ckpt = torch.load(publish_path, map_location="cpu", weights_only=True)
        record = dict(record, complete=True, epochs_run=int(self.trainer.state.epoch))
        self._record = record
        self._write(publish_path, {k: v for k, v in ckpt.items()} if isinstance(ckpt, dict) else {"model": ckpt})
        logger.info(f"training finished: {publish_path} marked complete (epoch {record['epoch']} weights)")


def attach_publisher(task, context) -> None:
    """Use in a BasicTrainTask.finalize(): publish after every validation (or epoch)."""
    if context.local_rank != 0:
        return
    start = task.load_path(context.output_dir, context.pretrained)   # what _load_checkpoint loads
    publisher = AtomicPublish(
        task._stats_path, task._publish_path, task._key_metric_filename, context.start_ts,
        context.run_id, context.output_dir, context.trainer, context.evaluator, network=context.network,
        export=getattr(task, "publish_payload", None),
        resumed_from=start if start and os.path.exists(start) else None,
        split=getattr(context, "split_info", None),
    )
    (context.evaluator or context.trainer).add_event_handler(Events.EPOCH_COMPLETED, publisher)
    context.trainer.add_event_handler(Events.COMPLETED, publisher.finished)


class EMAWeights:
    """Validation and the best-model checkpoint on an exponential moving average of the weights.

    After every training iteration the average is updated (``torch.optim.swa_utils.AveragedModel`` with
    ``get_ema_multi_avg_fn(decay)``, buffers included so the BatchNorm statistics follow the averaged
    weights); while the evaluator runs, the network holds the averaged weights, so the validation figures,
    the key-metric checkpoint (MONAI Label's CheckpointSaver, evaluator EPOCH_COMPLETED) and therefore the
    published model are the average's; when the evaluator completes, the training weights are put back and
    training goes on from them. The trainer's own final / interval checkpoints keep the training weights.
    """

    def __init__(self, network: torch.nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.network = network.module if hasattr(network, "module") else network
        self.average = AveragedModel(self.network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self._training_state: dict | None = None

    def attach(self, trainer, evaluator) -> None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        evaluator.add_event_handler(Events.STARTED, self.swap_in)
        evaluator.add_event_handler(Events.COMPLETED, self.swap_out)
        evaluator.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    def update(self, engine=None) -> None:
        self.average.update_parameters(self.network)

    def swap_in(self, engine=None) -> None:
        if self._training_state is None:
            self._training_state = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        self.network.load_state_dict(self.average.module.state_dict())

    def swap_out(self, engine=None) -> None:
        if self._training_state is not None:
            self.network.load_state_dict(self._training_state)
            self._training_state = None

    def failed(self, engine, e: BaseException) -> None:
        # ignite hands an exception to its EXCEPTION_RAISED handlers instead of raising it: raise it again
        self.swap_out(engine)
        raise e


def attach_shared_handlers(task, context) -> None:
    """Use in a BasicTrainTask.finalize(): the handlers every trainer of the app has (EMA weights when the
    profile's ``train.ema_decay`` > 0, then :func:`attach_publisher`)."""
    decay = float(task.model.train.ema_decay)
    if decay > 0:
        if context.evaluator is None:
            logger.warning(f"train.ema_decay={decay} needs a validation set (the average is what validation "
                           "selects and publishes); without one the training weights are published")
        else:
            EMAWeights(context.network, decay).attach(context.trainer, context.evaluator)
    attach_publisher(task, context)


def resume_path(task, output_dir: str, pretrained: bool = True) -> str | None:
    """Fine-tuning starts from the model being served (published), then the run's own best, then --conf <model>_checkpoint."""
    if pretrained and task._publish_path and os.path.exists(task._publish_path):
        return task._publish_path
    own = os.path.join(output_dir, task._key_metric_filename)
    if os.path.exists(own):
        return own
    return task._load_path if pretrained else None


def cpu_bf16(train, device: str) -> bool:
    """Whether training forward passes run under bfloat16 autocast: the profile asks for it
    (``train.cpu_precision: bf16``), training runs on the CPU, and the CPU computes bf16 natively (oneDNN:
    AVX512-BF16 or AMX). Elsewhere bf16 would be emulated, several times slower than float32, so the run
    stays float32 and says so in the log."""
    if getattr(train, "cpu_precision", "fp32") != "bf16" or not str(device).startswith("cpu"):
        return False
    if not native_cpu_bf16():
        logger.warning("train.cpu_precision=bf16 asked, but this CPU has no native bfloat16 (AVX512-BF16 / AMX): "
                       "training in float32")
        return False
    logger.info("training forward passes under bfloat16 autocast (train.cpu_precision=bf16); validation in float32")
    return True


def native_cpu_bf16() -> bool:
    """The CPU computes bfloat16 natively through oneDNN (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class CPUAutocastInferer(SimpleInferer):
    """The training forward pass under ``torch.autocast("cpu", bfloat16)``, its outputs back in float32 so the
    loss and the training metrics are computed in float32 (backward follows the autocast graph). MONAI's
    ``SupervisedTrainer(amp=True)`` autocasts on CUDA only, and this app uses it there."""

    def __call__(self, inputs, network, *args, **kwargs):
        if not torch.is_tensor(inputs) or inputs.device.type != "cpu":
            return super().__call__(inputs, network, *args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = super().__call__(inputs, network, *args, **kwargs)
        return _to_float32(out)


def _to_float32(out):
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    return out


def trainer_config(model, app, **overrides) -> dict:
    """The MONAI Label train config (shown in /info, overridable per request) from a model's typed train
    settings (``model.train``, lib/trainers/settings.py)."""
    t = model.train
    cfg = {
        "name": "train_01",  # reusing a run name resumes it (fine-tuning)
        "pretrained": True,
        "device": app.device,
        "max_epochs": t.max_epochs,
        # seeds torch, numpy, random and every MONAI random transform; a negative seed leaves runs unseeded
        "seed": t.seed,
        "early_stop_patience": -1,
        "val_split": t.val_split,
        "train_batch_size": t.batch_size,
        "val_batch_size": t.batch_size,
        "learning_rate": t.learning_rate,
        "multi_gpu": True,
        "gpus": "all",
        "dataset": "CacheDataset",
        "dataloader": "DataLoader",
        "tracking": "None",
        "tracking_uri": "",
        "tracking_experiment_name": "",
    }
    cfg.update(overrides)
    return cfg


class FundusTrainTask(BasicTrainTask):
    """BasicTrainTask base of the app's trainers.

    - Runs are reproducible: the request's ``seed`` is applied before the network, the optimiser
      and the transform chains are built (MONAI's Compose draws its random state from it).
    - Fine-tuning resumes from the served model (:func:`resume_path`).
    - Defaults shared by the trainers (a trainer overrides what differs): AdamW over the trainable
      parameters with the request's / profile's ``learning_rate`` and the profile's ``weight_decay``
      (their one default is in ``settings.TrainSettings``), whole-image :class:`SimpleInferer` for training and validation, and
      :meth:`cosine_schedule` for those that anneal per epoch.
    """

    settings_class: type[TrainSettings] = TrainSettings   # what config.parse_conf types the profile's train block as

    def __init__(self, model, app, description: str, **config_overrides):
        """The one set-up of every trainer: its folder under ``model_dir``, the MONAI Label config from the
        typed train settings (:func:`trainer_config`, plus a trainer's ``config_overrides``), AMP on CUDA,
        publishing to the served checkpoint, resuming from ``--conf <model>_checkpoint``, no MLflow."""
        self.model = model
        self.app_settings = app
        super().__init__(
            model_dir=os.path.join(model.model_dir, model.name),
            description=description,
            config=trainer_config(model, app, **config_overrides),
            amp=app.device.startswith("cuda"),
            publish_path=model.published_path,
            load_path=model.checkpoint_override,
            key_metric_filename="model.pt",
            val_interval=model.train.val_interval,
            tracking=None,
        )

    def learning_rate(self, context) -> float:
        return float(context.request.get("learning_rate", self.model.train.learning_rate))

    def optimizer(self, context):
        params = [p for p in context.network.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.learning_rate(context), weight_decay=self.model.train.weight_decay)

    @staticmethod
    def cosine_schedule(context) -> LrScheduleHandler:
        """Cosine annealing over the run's epochs, stepped per epoch."""
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(context.optimizer, T_max=max(1, int(context.max_epochs)))
        return LrScheduleHandler(sched, print_lr=True, epoch_level=True)

    def train_inferer(self, context):
        return CPUAutocastInferer() if cpu_bf16(self.model.train, self.app_settings.device) else SimpleInferer()

    def val_inferer(self, context):
        return SimpleInferer()

    def load_path(self, output_dir, pretrained=True):
        return resume_path(self, output_dir, pretrained)

    # settings a trainer accepts besides MONAI Label's (lib/params.py TRAIN_PARAMS)
    train_params: dict = {}

    def check_request(self, request: dict) -> dict:
        """The train request checked: every setting typed and in range, a near-miss key refused (422)."""
        from monailabel_dr.lib.errors import check_id
        from monailabel_dr.lib.params import check_train_request

        out = check_train_request(dict(request or {}), f"trainer '{self.model.name}'", self.train_params)
        # the run name becomes <model_dir>/<name>: no paths (e.g. "../../x") out of the model dir
        if out.get("name") is not None:
            check_id(str(out["name"]), "train run name")
        return out

    def __call__(self, request, datastore):
        return super().__call__(self.check_request(request), datastore)

    # ---- MONAI Label's multi-GPU (DDP) path, also on CPU processes with the gloo backend
    def _device(self, context):
        if context.multi_gpu and not torch.cuda.is_available():
            return torch.device("cpu")   # the stock method asks CUDA for rank-th GPU
        return super()._device(context)

    def _create_network_and_optimizer(self, context):
        if not (context.multi_gpu and context.device.type == "cpu"):
            return super()._create_network_and_optimizer(context)
        network = self.network(context).to(context.device)
        context.network = network
        optimizer = self.optimizer(context)
        # CPU modules take device_ids=None (the stock method passes [device.index], which CPU DDP refuses)
        ddp = torch.nn.parallel.DistributedDataParallel(network, find_unused_parameters=self._find_unused_parameters)
        return ddp, optimizer

    def train(self, rank, world_size, request, datalist):
        seed = request.get("seed", 0)
        seed = None if seed is None or int(seed) < 0 else int(seed) + int(rank)
        set_determinism(seed=seed)
        try:
            return super().train(rank, world_size, request, datalist)
        finally:
            set_determinism(seed=None)  # do not leave the server process seeded
