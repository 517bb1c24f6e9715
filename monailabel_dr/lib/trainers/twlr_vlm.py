"""`twlr` trainer: TWLR's stage-1 vision-language grader from final labels.

The same data as the `grading` trainer (grade labels and, from lesion label maps or label flags,
lesion presence; unknown entries masked out), so it subclasses it; what changes is the network
(:class:`monailabel_dr.networks.twlr.TWLRGrader`, images kept in [0, 1]: CLIP's own pixel statistics
are applied inside) and the loss: cross-entropy on grades + BCE on lesion presence, jointly, as the
paper trains it (the referable output is derived from the grade softmax, so it has no loss term).

From a lesion dataset (``dataset: "idrid:<folder>"``, ``monailabel-dr train twlr --dataset
idrid:<folder>``: real photographs with lesion masks but no grades), each training sample is a random
lesion-removed counterfactual of a photograph with its derived image-level targets
(:mod:`monailabel_dr.fundus.counterfactual`: lesion presence, and an ICDR grade proxy 0-2); the
validation images (IDRiD split) get ``val_variants`` fixed counterfactuals each.

The published model is the best validation ``val_grade_lesion``: the mean of the grade's quadratic
weighted kappa and the mean lesion-presence ROC AUC. Stage 2 leans on both (grades stop the loop,
lesion presence and its saliency drive it), and on a few validation images kappa alone is a noisy
selector (on 7 phantoms it picked the epoch-1 model, whose saliency was noise).
"""

from __future__ import annotations

import logging
import os

import torch
from ignite.metrics import EpochMetric
from monai.metrics import compute_roc_auc
from monai.transforms import DeleteItemsd
from monailabel.tasks.train.basic_train import Context

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.fundus.counterfactual import RandLesionRemovald
from monailabel_dr.fundus.holes import SeededPerItemd
from monailabel_dr.lib.errors import BadInput, Conflict
from monailabel_dr.lib.trainers.common import FundusTrainTask, stack_pred_label
from monailabel_dr.lib.trainers.grading import GradingTrainer, _kappa, kappa_metric
from monailabel_dr.lib.trainers.lesion_data import idrid_items, lesion_centred_crops
from monailabel_dr.lib.trainers.settings import TWLRTrain
from monailabel_dr.networks.cam_grader import LESION_SLICE, N_LESIONS, GraderLoss
from monailabel_dr.networks.clip_towers import WeightsUnavailable
from monailabel_dr.networks.twlr import build_twlr_grader
from monailabel_dr.transforms import FOV_KEY, LoadLesionTargetsd

logger = logging.getLogger(__name__)


def grade_lesion_score(y_pred: torch.Tensor, y: torch.Tensor) -> float:
    """(kappa + mean lesion-presence AUC) / 2; the AUC over the lesions whose known labels (>= 0) hold both
    classes (kappa alone when none does)."""
    aucs = []
    for j in range(N_LESIONS):
        t = y[:, 2 + j]
        known = t >= 0
        if 0 < float(t[known].sum()) < int(known.sum()):
            aucs.append(float(compute_roc_auc(y_pred[known][:, LESION_SLICE][:, j], t[known])))
    k = _kappa(y_pred, y)
    return k if not aucs else 0.5 * (k + sum(aucs) / len(aucs))


class TWLRVLMTrainer(GradingTrainer):
    settings_class = TWLRTrain
    val_key = "val_grade_lesion"
    _selection = "kappa"   # TWLR publishes on its own key metric (val_key); no smoothed selection

    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app)
        self.description = (f"Train TWLR's vision-language grader ({model.profile_name} profile, {model.image_size} px) "
                             "from final grade / lesion labels")

    def _normalise(self) -> list:
        return []   # TWLRGrader applies CLIP's pixel statistics to [0, 1] RGB itself

    # ------------------------------------------------------------ data: datastore labels or a lesion dataset
    @staticmethod
    def _from_dataset(context_or_request) -> bool:
        request = getattr(context_or_request, "request", context_or_request)
        return bool(request.get("dataset_source"))

    def pre_process(self, request, datastore):
        dataset = request.get("dataset_source") or ""
        if not dataset:
            return super().pre_process(request, datastore)
        kind, _, folder = str(dataset).partition(":")
        if kind != "idrid" or not folder:
            raise BadInput(f"dataset {dataset!r}: use idrid:<folder>")
        items = idrid_items(os.path.realpath(os.path.expanduser(folder)))
        n_var = int(request.get("val_variants", self.model.train.val_variants))
        out = [d for d in items if d["split"] != "val"]
        for d in items:   # fixed counterfactuals of each validation image (seeded by their ids)
            if d["split"] == "val":
                out += [{**d, "id": f"{d['id']}#cf{k}"} for k in range(max(1, n_var))]
        logger.info(f"twlr: {len(out)} items from {folder} (lesion-removed counterfactuals)")
        return out

    def partition_datalist(self, context: Context, shuffle=False):
        if any("split" in d for d in context.datalist):   # the dataset's own train / validation split
            return ([d for d in context.datalist if d.get("split") != "val"],
                    [d for d in context.datalist if d.get("split") == "val"])
        return super().partition_datalist(context, shuffle=shuffle)

    def _counterfactual(self, crops: list | None = None):
        return [LoadLesionTargetsd(keys="lesions", masks_key="masks"),
                *(crops or []),
                RandLesionRemovald(keys="image", lesions_key="lesions", label_key="label",
                                   settings=self.model.train.counterfactual)]

    def train_pre_transforms(self, context: Context):
        chain = super().train_pre_transforms(context)
        if self._from_dataset(context):   # load -> [lesion-centred crops] -> counterfactual -> the usual augmentation
            crop = self.model.train.crop
            crops = []
            if crop:   # crops at the working resolution (the conv tower takes them as they are in training)
                crops = [*lesion_centred_crops(crop, context.request, crop.size, label_key="lesions"),
                         DeleteItemsd(keys=["lesions_cls_indices", FOV_KEY])]
            chain = [chain[0], *self._counterfactual(crops), *chain[1:]]
        return chain

    def val_pre_transforms(self, context: Context):
        chain = super().val_pre_transforms(context)
        if self._from_dataset(context):
            chain = [chain[0], SeededPerItemd(self._counterfactual(), key="id"), *chain[1:]]
        return chain

    def network(self, context: Context):
        try:
            net = build_twlr_grader(self.model.network, image_size=self.model.image_size)
        except WeightsUnavailable as e:
            raise Conflict(f"twlr ({self.model.profile_name} profile): {e}") from e
        n = sum(p.numel() for p in net.parameters() if p.requires_grad)
        logger.info(f"twlr: {n:,} trainable parameters")
        return net

    def optimizer(self, context: Context):
        return FundusTrainTask.optimizer(self, context)   # AdamW, not the grading trainer's SGD option

    def val_key_metric(self, context: Context):
        return {self.val_key: EpochMetric(grade_lesion_score, output_transform=stack_pred_label, check_compute_fn=False)}

    def val_additional_metrics(self, context: Context):
        return {**super().val_additional_metrics(context), "val_kappa": kappa_metric()}

    def loss_function(self, context: Context):
        return GraderLoss(grade_weight=1.0, referable_weight=0.0, lesion_weight=1.0)
