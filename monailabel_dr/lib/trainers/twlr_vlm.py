"""`twlr` trainer: TWLR's stage-1 vision-language grader from final labels.

The same data as the `grading` trainer (grade labels and, from lesion label maps or label flags,
lesion presence; unknown entries masked out), so it subclasses it; what changes is the network
(:class:`monailabel_dr.networks.twlr.TWLRGrader`, images kept in [0, 1]: CLIP's own pixel statistics
are applied inside) and the loss: cross-entropy on grades + BCE on lesion presence, jointly, as the
paper trains it (the referable output is derived from the grade softmax, so it has no loss term).
"""

from __future__ import annotations

import logging

import torch
from monailabel.tasks.train.basic_train import Context

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.lib.errors import Conflict
from monailabel_dr.lib.trainers.grading import GradingTrainer
from monailabel_dr.networks.cam_grader import GraderLoss
from monailabel_dr.networks.clip_towers import WeightsUnavailable
from monailabel_dr.networks.twlr import build_twlr_grader

logger = logging.getLogger(__name__)


class TWLRVLMTrainer(GradingTrainer):
    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app)
        self.description = (f"Train TWLR's vision-language grader ({model.profile_name} profile, {model.image_size} px) "
                             "from final grade / lesion labels")

    def _normalise(self) -> list:
        return []   # TWLRGrader applies CLIP's pixel statistics to [0, 1] RGB itself

    def network(self, context: Context):
        try:
            net = build_twlr_grader(self.model.network, image_size=self.model.image_size)
        except WeightsUnavailable as e:
            raise Conflict(f"twlr ({self.model.profile_name} profile): {e}") from e
        n = sum(p.numel() for p in net.parameters() if p.requires_grad)
        logger.info(f"twlr: {n:,} trainable parameters")
        return net

    def optimizer(self, context: Context):
        t = self.model.train
        lr = float(context.request.get("learning_rate", t.get("learning_rate", 1e-4)))
        params = [p for p in context.network.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=float(t.get("weight_decay", 1e-4)))

    def loss_function(self, context: Context):
        return GraderLoss(grade_weight=1.0, referable_weight=0.0, lesion_weight=1.0)
