"""`lesion_sam` trainer: TP-DRSeg from the same final lesion labels as `lesion_seg`.

Data: :mod:`monailabel_dr.lib.trainers.lesion_data` (datastore label maps, or ``idrid:<folder>``
with its fixed train/validation split). Each image's field of view is cropped and resized to the
working size. When that is SAM's input size (the paper) SAM trains on whole images; when it is larger
(the CPU ``small`` profile: 1024 px working images, a 256 px SAM) training samples SAM-sized crops
centred on lesions as ``lesion_seg`` does, and validation and inference run SAM over tiles
(:mod:`monailabel_dr.networks.tp_drseg`). Each training sample is prompted with one lesion (:class:`~monailabel_dr.transforms.RandLesionPromptd`: a present lesion,
or with ``negative_prob`` any lesion so absent ones learn an empty mask), as the paper trains one
lesion class per sample.

Parameter-efficient as the paper: when SAM / CLIP weights are loaded (the ``paper`` profile) their
encoders are frozen and only the injectors, the class-specific prompt generator and SAM's mask
decoder train; profiles without weights train everything from scratch. The published model holds
only what was trained, plus ``weights_source`` naming the frozen weights it needs
(:meth:`publish_payload`). Validation prompts every lesion on the whole working image and reports
pooled Dice per lesion (``val_dice_MA`` ...) and their mean (``val_mean_dice``, the key metric).
"""

from __future__ import annotations

import logging

from monai.engines.utils import PrepareBatchExtraInput
from monailabel.tasks.train.basic_train import Context

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.lib.errors import Conflict
from monailabel_dr.lib.trainers.common import FundusTrainTask, attach_shared_handlers
from monailabel_dr.lib.trainers.lesion_data import (
    LesionLabelSource,
    LesionTrainChains,
    PooledLesionDice,
    lesion_centred_crops,
)
from monailabel_dr.lib.trainers.settings import LesionSamTrain
from monailabel_dr.networks.tp_drseg import TPDRSegInferer, TPDRSegLoss, WeightsUnavailable, build_tp_drseg
from monailabel_dr.transforms import RandLesionPromptd

logger = logging.getLogger(__name__)

class LesionSamTrainer(LesionTrainChains, LesionLabelSource, FundusTrainTask):
    settings_class = LesionSamTrain
    model_title = "TP-DRSeg"

    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app, f"Train TP-DRSeg ({model.profile_name} profile, {model.image_size} px) "
                                     "from final lesion labels",
                         val_batch_size=1, negative_prob=model.train.negative_prob)
        self._weights_source: dict | None = None
        self._trainable_keys: set[str] | None = None

    # ------------------------------------------------------------ data (pre_process, partition: LesionLabelSource;
    # the transform chains: LesionTrainChains). TP-DRSeg takes [0, 1] RGB and applies SAM's and CLIP's own
    # pixel statistics itself; no intensity shift; each crop gets a prompted lesion.
    normalise = False
    shift_intensity = False

    def sam_input_size(self) -> int:
        """SAM's input side: the profile's ``network.sam.img_size``, or the working size when that is smaller."""
        sam = (self.model.network or {}).get("sam") or {}
        return min(int(sam.get("img_size", self.model.image_size)), int(self.model.image_size))

    def _crops(self, context: Context) -> list:
        tile = self.sam_input_size()
        return lesion_centred_crops(self.model.train, context.request, tile) if tile < self.model.image_size else []

    def _train_extra(self, context: Context) -> list:
        return [RandLesionPromptd(keys="label", cls_key="cls",
                                  negative_prob=float(context.request.get("negative_prob", self.model.train.negative_prob)))]

    # ------------------------------------------------------------ model
    def network(self, context: Context):
        try:
            net = build_tp_drseg(self.model.network, image_size=self.model.image_size)
        except WeightsUnavailable as e:
            raise Conflict(f"lesion_sam ({self.model.profile_name} profile): {e}") from e
        self._weights_source = net.weights_source()
        self._trainable_keys = set(net.trainable_state_dict())
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in net.parameters())
        logger.info(f"lesion_sam: {n_train:,} of {n_all:,} parameters train; frozen weights: {self._weights_source}")
        return net

    def publish_payload(self, state: dict) -> dict:
        """The published checkpoint: the trained tensors only, and where the frozen ones come from."""
        keys = self._trainable_keys
        return {"model": {k: v for k, v in state.items() if keys is None or k in keys},
                "weights_source": self._weights_source, "profile": self.model.profile_name,
                "image_size": self.model.image_size}

    def loss_function(self, context: Context):
        return TPDRSegLoss(pos_weight=self.model.train.pos_weight)

    def lr_scheduler_handler(self, context: Context):
        if self.model.train.lr_schedule != "cosine":
            return None
        return self.cosine_schedule(context)

    # train_inferer: the base's SimpleInferer, network(image, cls=...) via the batch preparation set in finalize()
    def val_inferer(self, context: Context):
        return TPDRSegInferer()

    def train_key_metric(self, context: Context):
        return {"train_prompt_dice": PooledLesionDice()}

    def finalize(self, context: Context):
        # the prompted lesion of each sample reaches the network as network(image, cls=...)
        context.trainer.prepare_batch = PrepareBatchExtraInput({"cls": "cls"})
        attach_shared_handlers(self, context)
