"""Where the lesion models (Lesion-Net, TP-DRSeg) get their training images from, shared by their trainers.

- server / datastore: every image with a final lesion label map (values 1-4, e.g. saved from
  3D Slicer or written by ``monailabel-dr import --idrid``); with ``label_tag: original`` in the
  request, the ``original``-tag label maps instead (e.g. TWLR pseudo-labels written by
  ``monailabel-dr twlr-pseudolabels --to-datastore``);
- ``dataset: "idrid:<folder>"`` in the request (``monailabel-dr train <model> --dataset
  idrid:<folder>``): the per-lesion masks of that folder, exact multi-label, split into
  train/validation by :func:`monailabel_dr.fundus.idrid.idrid_split` (ids ending in a multiple
  of 5 validate);
- and, with either, ``negatives_source: "grades:<folder>"`` (images/ and grades.csv, e.g. graded_dr):
  its grade-0 photographs (eyes without DR) as training images with empty lesion masks, from the
  training patients of the grading trainer's patient split only (its validation patients, on which
  the grade-0 false-positive figure is measured, are never seen); ``negatives_max`` caps how many
  (evenly spaced in id order). An option of the recipe, not yet measured (issue 18).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from ignite.metrics import Metric
from monai.transforms import (
    ClassesToIndicesd,
    DeleteItemsd,
    EnsureTyped,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import Context

from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.lib.checkpoints import THRESHOLD_PREFIX
from monailabel_dr.metrics.overlap import dice_from_counts
from monailabel_dr.lib.errors import BadInput, Conflict, check_tag
from monailabel_dr.lib.trainers.common import stack_pred_label
from monailabel_dr.lib.trainers.settings import LesionCrops
from monailabel_dr.transforms import (
    FOV_KEY,
    GEOMETRY_KEY,
    SOURCE_INFO_KEY,
    LoadFundusd,
    LoadLesionTargetsd,
    preprocessing_transforms,
)


def idrid_items(folder: str) -> list[dict]:
    from monailabel_dr.fundus.idrid import idrid_image_path, idrid_split, list_idrid

    ids = list_idrid(folder)
    if not ids:
        raise BadInput(f"{folder}: no images/ in the IDRiD layout (images/NAME.jpg, masks/<LES>/NAME_<LES>.png)")
    _, val = idrid_split(ids)
    val = set(val)
    items = []
    for image_id in ids:
        masks = {}
        for les in LESIONS:
            for ext in (".png", ".tif"):
                p = os.path.join(folder, "masks", les, f"{image_id}_{les}{ext}")
                if os.path.isfile(p):
                    masks[les] = p
                    break
        items.append({"image": idrid_image_path(folder, image_id), "masks": masks, "id": image_id,
                      "split": "val" if image_id in val else "train"})
    return items


def negative_items(source: str, max_n: int = 0) -> list[dict]:
    """Training items of the grade-0 photographs of ``grades:<folder>`` (see the module docstring)."""
    import math

    from monailabel_dr.fundus.patients import patient_split
    from monailabel_dr.lib.importers import _find_image, read_grades_csv

    kind, _, folder = str(source).partition(":")
    if kind != "grades" or not folder:
        raise BadInput(f"negatives_source {source!r}: use grades:<folder> (images/ and grades.csv)")
    folder = os.path.realpath(os.path.expanduser(folder))
    try:
        grades = read_grades_csv(os.path.join(folder, "grades.csv"))
    except (OSError, ValueError) as e:
        raise BadInput(f"negatives_source {source!r}: {e}") from e
    ids = sorted(grades)
    train, _ = patient_split(ids, [grades[i] for i in ids], val_fraction=0.2)
    healthy = [i for i in sorted(train) if grades[i] == 0 and _find_image(os.path.join(folder, "images"), i)]
    if max_n and len(healthy) > max_n:
        step = math.ceil(len(healthy) / max_n)
        healthy = healthy[::step][:max_n]
    return [{"image": _find_image(os.path.join(folder, "images"), i), "masks": {}, "id": f"negative:{i}",
             "split": "train"} for i in healthy]


CROP_INDICES_KEY = "label_cls_indices"


def lesion_centred_crops(train: LesionCrops, request: dict, size: int, label_key: str = "label") -> list:
    """MONAI transforms sampling ``samples_per_image`` crops of ``size`` px per image, centred on MA / HE /
    EX / SE / anywhere in the field of view in the ratios ``class_ratios`` (so that microaneurysms, a few
    pixels each, are seen in most batches). ``data[label_key]``: (m + 1, S, S) lesion targets with the
    field of view last (``LoadLesionTargetsd``). Drop ``<label_key>_cls_indices`` (``CROP_INDICES_KEY``
    for "label") afterwards. ``train``: the typed settings (their ``class_ratios`` were checked on load)."""
    ratios = list(train.class_ratios)
    n = int(request.get("samples_per_image", train.samples_per_image))
    return [
        ClassesToIndicesd(keys=label_key, num_classes=len(LESIONS) + 1, indices_postfix="_cls_indices"),
        RandCropByLabelClassesd(keys=["image", label_key], label_key=label_key, spatial_size=(size, size), ratios=ratios,
                                num_classes=len(LESIONS) + 1, num_samples=n, indices_key=f"{label_key}_cls_indices",
                                allow_smaller=True),
    ]


class LesionTrainChains:
    """The transform chains of the trainers that learn (image, lesion targets) pairs at the working size,
    Lesion-Net and TP-DRSeg: load -> [lesion-centred crops] -> drop bookkeeping keys -> flips, 90-degree
    rotations, intensity scale [and shift], gamma -> [the trainer's extra steps] -> tensors. Validation
    loads whole images. A trainer sets ``normalise`` / ``shift_intensity`` and may override
    :meth:`_crops` and :meth:`_train_extra`."""

    normalise = True           # standardise intensities (Lesion-Net); TP-DRSeg takes [0, 1] RGB
    shift_intensity = True     # RandShiftIntensityd after the scale (Lesion-Net's recipe)
    drop_keys = (GEOMETRY_KEY, SOURCE_INFO_KEY, FOV_KEY, CROP_INDICES_KEY, "id", "split")

    def _load(self) -> list:
        return [
            LoadFundusd(keys="image", size=self.model.image_size, max_pixels=self.app_settings.max_image_pixels,
                        min_side=self.app_settings.min_image_side),
            LoadLesionTargetsd(keys="label"),
            # the profile's deterministic preprocessing (e.g. local contrast), as the infer task applies it
            # (lib/infers/base.py pre_transforms): without it a profile's `preprocess` would be served only
            *preprocessing_transforms(self.model.options),
            *([NormalizeIntensityd(keys="image")] if self.normalise else []),
        ]

    def _crops(self, context: Context) -> list:
        return []

    def _train_extra(self, context: Context) -> list:
        return []

    def train_pre_transforms(self, context: Context):
        pair = ["image", "label"]
        return [
            *self._load(),
            *self._crops(context),
            DeleteItemsd(keys=list(self.drop_keys)),
            RandFlipd(keys=pair, prob=0.5, spatial_axis=0),
            RandFlipd(keys=pair, prob=0.5, spatial_axis=1),
            RandRotate90d(keys=pair, prob=0.5),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            *([RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)] if self.shift_intensity else []),
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
            *self._train_extra(context),
            EnsureTyped(keys=pair, track_meta=False),
        ]

    def val_pre_transforms(self, context: Context):
        return [*self._load(), DeleteItemsd(keys=list(self.drop_keys)), EnsureTyped(keys=["image", "label"], track_meta=False)]

    def train_post_transforms(self, context: Context):
        return None

    def val_post_transforms(self, context: Context):
        return None


class LesionLabelSource:
    """Mixin for a BasicTrainTask: ``pre_process`` and ``partition_datalist`` for lesion label maps, and
    the validation metrics of a model whose evaluator outputs (B, 4, S, S) lesion logits."""

    model_title = "the lesion model"

    def pre_process(self, request, datastore: Datastore):
        dataset = request.get("dataset_source") or ""
        if dataset:
            kind, _, folder = str(dataset).partition(":")
            if kind != "idrid" or not folder:
                raise BadInput(f"dataset {dataset!r}: use idrid:<folder>")
            return idrid_items(os.path.realpath(os.path.expanduser(folder))) + self._negatives(request)
        tag = check_tag(str(request.get("label_tag") or "final"))  # "original": e.g. TWLR pseudo-labels
        items = []
        finder = getattr(datastore, "final_label_files", None)
        for image_id in sorted(datastore.list_images()):
            files = finder(image_id, tag) if finder else {}
            if "lesion_map" in files:
                items.append({"image": datastore.get_image_uri(image_id), "label": files["lesion_map"], "id": image_id})
        if not items:
            raise Conflict(f"no {tag} lesion label maps to train {self.model_title} on: save label maps (values 1-4) "
                           "from 3D Slicer / PUT /datastore/label, or `monailabel-dr import --idrid FOLDER`")
        return items + self._negatives(request)

    def _negatives(self, request) -> list[dict]:
        # only lesion_seg's settings (LesionSegTrain) have negatives; the other lesion trainers train without
        t = self.model.train
        source = request.get("negatives_source") or getattr(t, "negatives_source", None)
        n_max = getattr(t, "negatives_max", 0)
        if not source:
            if n_max:   # a recipe with negatives (e.g. cpu_negatives) must not silently train without
                raise BadInput(f"this {self.model_title} profile trains with real negatives (negatives_max "
                               f"{n_max}): give negatives_source, e.g. --params "
                               "'{\"negatives_source\": \"grades:<folder with images/ and grades.csv>\"}'")
            return []
        return negative_items(str(source), int(request.get("negatives_max", n_max) or 0))

    def partition_datalist(self, context: Context, shuffle=False):
        if any("split" in d for d in context.datalist):
            train = [d for d in context.datalist if d.get("split") != "val"]
            val = [d for d in context.datalist if d.get("split") == "val"]
            return train, val
        if len(context.datalist) < 3:
            context.request["val_split"] = 0.0
        return super().partition_datalist(context, shuffle=shuffle)

    def val_key_metric(self, context: Context):
        return {"val_mean_dice": PooledLesionDice()}

    def val_additional_metrics(self, context: Context):
        metrics = {f"val_dice_{les}": PooledLesionDice(i) for i, les in enumerate(LESIONS)}
        # per-lesion operating thresholds of these weights, stored with them in the published record
        metrics["val_operating"] = OperatingThresholds()
        return metrics


class PooledLesionDice(Metric):
    """Pooled Dice 2TP / (2TP + FP + FN) over an epoch, per channel or their mean, inside the field of view.

    Output: logits (B, m, H, W) and targets (B, m + 1, H, W) whose last channel is the field of
    view (LoadLesionTargetsd). Targets are soft coverages read as lesion where >= 0.5; predictions
    are lesion where sigmoid(logit) >= 0.5. The mean is over channels with any positive pixel
    (truth or prediction) in the epoch.
    """

    def __init__(self, lesion: int | None = None, output_transform=stack_pred_label):
        self.lesion = lesion
        super().__init__(output_transform=output_transform)

    def reset(self):
        self.tp = self.fp = self.fn = None

    def update(self, output):
        logits, target = output
        fov = target[:, -1:] > 0.5
        pred = (torch.sigmoid(logits.float()) >= 0.5) & fov
        truth = (target[:, :-1] >= 0.5) & fov
        dims = (0, 2, 3)
        tp = (pred & truth).sum(dims).cpu().numpy()
        fp = (pred & ~truth).sum(dims).cpu().numpy()
        fn = (~pred & truth).sum(dims).cpu().numpy()
        if self.tp is None:
            self.tp, self.fp, self.fn = np.zeros_like(tp), np.zeros_like(fp), np.zeros_like(fn)
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn

    def compute(self):
        if self.tp is None:
            return 0.0
        dice = dice_from_counts(self.tp, self.fp, self.fn)   # NaN: no truth and no prediction (metrics/overlap.py)
        if self.lesion is not None:   # the key metric needs a number: undefined counts as 0
            v = dice[self.lesion]
            return 0.0 if np.isnan(v) else float(v)
        return float(np.nanmean(dice)) if np.any(~np.isnan(dice)) else 0.0


THRESHOLD_BINS = 1000


class OperatingThresholds(Metric):
    """Per-lesion operating thresholds on the validation images: for each lesion, the threshold whose
    pooled Dice over the epoch is highest (:func:`monailabel_dr.metrics.lesions.best_dice_threshold`
    on 1000-bin probability histograms inside the field of view, the evaluation's histograms).

    ``compute`` returns ``{"val_threshold_<LES>": t, "val_dice_at_threshold_<LES>": dice}``; ignite
    puts each key into the evaluator's metrics, so the checkpoint record of the weights published
    after this validation holds them (:func:`monailabel_dr.lib.checkpoints.operating_thresholds`
    reads them back for serving and evaluation). Same input as :class:`PooledLesionDice`.
    """

    def __init__(self, output_transform=stack_pred_label):
        super().__init__(output_transform=output_transform)

    def reset(self):
        self.hist = None   # (m, 2, bins): [negative, positive] pixel counts

    def update(self, output):
        logits, target = output
        fov = target[:, -1] > 0.5
        probs = torch.sigmoid(logits.float())
        n = THRESHOLD_BINS
        hist = np.zeros((probs.shape[1], 2, n), np.int64)
        for i in range(probs.shape[1]):
            p = probs[:, i][fov]
            t = (target[:, i] >= 0.5)[fov]
            bins = torch.clamp((p * n).long(), max=n - 1) + n * t.long()
            hist[i] = torch.bincount(bins, minlength=2 * n).cpu().numpy().reshape(2, n)
        self.hist = hist if self.hist is None else self.hist + hist

    def compute(self):
        from monailabel_dr.metrics.lesions import best_dice_threshold

        out = {}
        for i, les in enumerate(LESIONS):
            t, d = (0.5, float("nan")) if self.hist is None else best_dice_threshold(self.hist[i, 1], self.hist[i, 0])
            out[f"{THRESHOLD_PREFIX}{les}"] = t
            out[f"val_dice_at_threshold_{les}"] = 0.0 if np.isnan(d) else d
        return out
