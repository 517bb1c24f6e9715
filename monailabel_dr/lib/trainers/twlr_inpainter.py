"""`twlr_inpainter` trainer: TWLR's learned U-Net inpainter (stage 2, ``backend=unet``), self-supervised.

Data: every image of the datastore (no labels needed), or ``dataset_source: "idrid:<folder>"``
(``monailabel-dr train twlr_inpainter --dataset idrid:<folder>``: the folder's images and lesion
masks with the fixed IDRiD train/validation split of :mod:`monailabel_dr.lib.trainers.lesion_data`).
Known lesions (a final lesion label map in the datastore, or the IDRiD masks) are kept out of the
holes, dilated by ``holes.lesion_margin``, so the network learns to paint healthy retina only; images
without a lesion map are used whole (their lesions are unknown, and cover a small part of any hole).

Each image's field of view is cropped and resized to the profile's working size (cached), then
``samples_per_image`` crops of ``crop_size`` centred on field-of-view pixels are sampled (MONAI
``RandCropByPosNegLabeld`` on the FOV mask), flipped / rotated, and given a random hole of blobs and
strokes (:class:`monailabel_dr.fundus.holes.RandHoleMaskd`). The network sees the crop with the hole
zeroed plus the hole mask; the loss is :class:`~monailabel_dr.networks.inpainter.HoleLoss` (L1 in the
hole + ``ssim_weight`` x SSIM on the composite).

Validation: ``val_samples_per_image`` crops per held-out image with holes fixed per image
(``val_seed``), scored by PSNR inside the holes (``val_psnr``, the key metric; per-crop mean, dB),
next to the OpenCV Navier-Stokes baseline on the same holes (``val_psnr_ns``, computed once), so
the training log and ``/info`` train stats show whether the network beats it. The best model is
published to the model's serve path (``twlr_inpainter.pt``), which ``twlr_inpaint`` loads.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from ignite.engine import Events
from ignite.metrics import Metric
from monai.transforms import (
    EnsureTyped,
    FgBgToIndicesd,
    MapTransform,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    SelectItemsd,
)
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import Context

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.fundus.holes import InpaintingPaird, RandHoleMaskd, SeededPerItemd, hole_psnr
from monailabel_dr.fundus.inpainting import opencv_inpaint
from monailabel_dr.lib.checkpoints import checkpoint_state
from monailabel_dr.lib.errors import BadInput, Conflict
from monailabel_dr.lib.trainers.common import FundusTrainTask, attach_shared_handlers, stack_pred_label
from monailabel_dr.lib.trainers.lesion_data import LesionLabelSource
from monailabel_dr.lib.trainers.settings import InpainterTrain
from monailabel_dr.networks.inpainter import HoleLoss, build_inpainter
from monailabel_dr.transforms import FOV_KEY, LoadFundusd, LoadLesionTargetsd

logger = logging.getLogger(__name__)

AVOID_KEY = "lesions"
HOLE_KEY = "hole"
_FOV_INDICES = (f"{FOV_KEY}_fg_indices", f"{FOV_KEY}_bg_indices")


class KnownLesionsd(MapTransform):
    """``data[key]`` from :class:`LoadLesionTargetsd` ((m + 1, S, S): lesion coverages, then the FOV) ->
    ``data[out_key]`` (1, S, S): 1 wherever any lesion covers any part of a pixel (coverage > 0, so a
    microaneurysm shrunk below half a working pixel still counts); zeros when the image has no lesion
    label. Hand-written: selecting channels and taking their union has no MONAI transform."""

    def __init__(self, key: str = "label", out_key: str = AVOID_KEY, fov_key: str = FOV_KEY):
        super().__init__(keys=key, allow_missing_keys=True)
        self.key, self.out_key, self.fov_key = key, out_key, fov_key

    def __call__(self, data):
        d = dict(data)
        lab = d.pop(self.key, None)
        if lab is None:
            d[self.out_key] = torch.zeros_like(torch.as_tensor(d[self.fov_key]), dtype=torch.float32)
        else:
            d[self.out_key] = (torch.as_tensor(lab)[:-1] > 0).any(0, keepdim=True).float()
        return d


class HolePSNR(Metric):
    """Mean over crops of the PSNR inside the hole (dB; :func:`monailabel_dr.fundus.holes.hole_psnr`).
    Output: the network's RGB (B, 3, H, W) and the target (B, 4, H, W) = true RGB + the hole."""

    def __init__(self, output_transform=stack_pred_label):
        super().__init__(output_transform=output_transform)

    def reset(self):
        self.values: list[float] = []

    def update(self, output):
        pred, target = output
        self.values += hole_psnr(pred.detach().float().clamp(0, 1), target[:, :3], target[:, 3:4])

    def compute(self):
        return float(np.mean(self.values)) if self.values else 0.0


class NavierStokesPSNR(Metric):
    """The OpenCV Navier-Stokes baseline (``cv2.inpaint``, the twlr_inpaint default backend) scored like
    :class:`HolePSNR` on the same holes. The validation holes are fixed, so it is computed in the
    first validation only and then reported as is (and logged once)."""

    def __init__(self, radius: int = 5, output_transform=stack_pred_label):
        self.radius = int(radius)
        self.value: float | None = None
        super().__init__(output_transform=output_transform)

    def reset(self):
        self.values: list[float] = []

    def update(self, output):
        if self.value is not None:
            return
        _, target = output
        rgb = target[:, :3].detach().float().cpu()
        hole = target[:, 3:4].detach().float().cpu()
        filled = []
        for im, h in zip(rgb, hole):
            u8 = (im.permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
            m = h[0].numpy() > 0.5
            u8 = np.ascontiguousarray(u8 * ~m[..., None])   # the network's view: the hole's pixels are unknown
            out = opencv_inpaint(u8, m, "ns", self.radius)
            filled.append(torch.from_numpy(out).permute(2, 0, 1).float() / 255)
        self.values += hole_psnr(torch.stack(filled), rgb, hole)

    def compute(self):
        if self.value is None:
            self.value = float(np.mean(self.values)) if self.values else 0.0
            logger.info(f"twlr_inpainter: OpenCV Navier-Stokes baseline (radius {self.radius}) on the "
                        f"{len(self.values)} held-out holes: PSNR {self.value:.2f} dB (computed once)")
        return self.value


class TWLRInpainterTrainer(LesionLabelSource, FundusTrainTask):
    settings_class = InpainterTrain
    model_title = "the TWLR inpainter"

    def __init__(self, model: ModelSettings, app: AppSettings):
        t = model.train
        super().__init__(model, app, f"Train TWLR's U-Net inpainter ({model.profile_name} profile, {model.image_size} px) "
                                     "self-supervised on random holes in healthy retina (every datastore image; "
                                     "or dataset_source idrid:<folder>)",
                         crop_size=t.crop_size, samples_per_image=t.samples_per_image,
                         val_samples_per_image=t.val_samples_per_image, ssim_weight=t.ssim_weight)
        self.holes = t.holes

    def info(self):
        i = super().info()
        i["state"] = checkpoint_state(self.model.serve_path)
        i["served_by"] = "twlr_inpaint with backend=unet"
        return i

    # ------------------------------------------------------------ data
    def pre_process(self, request, datastore: Datastore):
        # sizes are checked here, not at start-up: a global `--conf image_size` must not stop the app
        if self.model.image_size % 16:
            raise BadInput(f"twlr_inpainter: image_size {self.model.image_size} must be a multiple of 16 (the U-Net's "
                           "four poolings); set --conf twlr_inpainter_image_size")
        self._crop_size(request)
        if request.get("dataset_source"):
            return super().pre_process(request, datastore)   # idrid:<folder> (lesion_data)
        finder = getattr(datastore, "final_label_files", None)
        items = []
        for image_id in sorted(datastore.list_images()):
            item = {"image": datastore.get_image_uri(image_id), "id": image_id}
            files = finder(image_id) if finder else {}
            if "lesion_map" in files:
                item["label"] = files["lesion_map"]
            items.append(item)
        if not items:
            raise Conflict("no images in the datastore to train the TWLR inpainter on (it needs no labels): "
                           "add fundus photographs, or train with dataset_source idrid:<folder>")
        logger.info(f"twlr_inpainter: {len(items)} images, {sum('label' in d for d in items)} with a lesion map")
        return items

    def _load(self) -> list:
        return [
            LoadFundusd(keys="image", size=self.model.image_size, max_pixels=self.app_settings.max_image_pixels,
                        min_side=self.app_settings.min_image_side),
            LoadLesionTargetsd(keys="label"),
            KnownLesionsd(key="label"),
            FgBgToIndicesd(keys=FOV_KEY),   # cached: crop centres are drawn from the FOV's pixels
        ]

    def _crop_size(self, request: dict) -> int:
        try:
            c = int(request.get("crop_size", self.model.train.crop_size))
        except (TypeError, ValueError) as e:
            raise BadInput("twlr_inpainter: crop_size must be an integer") from e
        if c % 16 or not 16 <= c <= self.model.image_size:
            raise BadInput(f"twlr_inpainter: crop_size must be a multiple of 16 within 16..{self.model.image_size} "
                           f"(image_size), got {c}")
        return c

    def _crop(self, request: dict, n: int) -> RandCropByPosNegLabeld:
        c = self._crop_size(request)
        return RandCropByPosNegLabeld(keys=["image", FOV_KEY, AVOID_KEY], label_key=FOV_KEY, spatial_size=(c, c),
                                      pos=1.0, neg=0.0, num_samples=n, fg_indices_key=_FOV_INDICES[0],
                                      bg_indices_key=_FOV_INDICES[1])

    def _holes(self) -> RandHoleMaskd:
        return RandHoleMaskd(keys="image", hole_key=HOLE_KEY, fov_key=FOV_KEY, avoid_key=AVOID_KEY, settings=self.holes)

    def _pair(self) -> list:
        return [InpaintingPaird(keys="image", hole_key=HOLE_KEY, target_key="label"),
                SelectItemsd(keys=["image", "label"]),
                EnsureTyped(keys=["image", "label"], track_meta=False)]

    def train_pre_transforms(self, context: Context):
        keys = ["image", FOV_KEY, AVOID_KEY]
        n = int(context.request.get("samples_per_image", self.model.train.samples_per_image))
        return [
            *self._load(),
            self._crop(context.request, n),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandRotate90d(keys=keys, prob=0.5),
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),   # keeps [0, 1] and the black border
            self._holes(),
            *self._pair(),
        ]

    def val_pre_transforms(self, context: Context):
        n = int(context.request.get("val_samples_per_image", self.model.train.val_samples_per_image))
        seed = int(context.request.get("val_seed", self.model.train.val_seed))
        return [
            *self._load(),
            # the same crops and holes for an image in every validation and run (cached once)
            SeededPerItemd([self._crop(context.request, n), self._holes()], key="id", seed=seed),
            *self._pair(),
        ]

    def train_post_transforms(self, context: Context):
        return None

    def val_post_transforms(self, context: Context):
        return None

    # ------------------------------------------------------------ model
    def network(self, context: Context):
        net = build_inpainter(self.model.network)
        logger.info(f"twlr_inpainter: {sum(p.numel() for p in net.parameters()):,} parameters")
        return net

    def loss_function(self, context: Context):
        return HoleLoss(ssim_weight=float(context.request.get("ssim_weight", self.model.train.ssim_weight)))

    def lr_scheduler_handler(self, context: Context):
        return self.cosine_schedule(context)

    def train_key_metric(self, context: Context):
        return {"train_psnr": HolePSNR()}

    def val_key_metric(self, context: Context):
        return {"val_psnr": HolePSNR()}

    def val_additional_metrics(self, context: Context):
        radius = self.model.train.baseline_radius
        return {"val_psnr_ns": NavierStokesPSNR(radius)}

    def finalize(self, context: Context):
        attach_shared_handlers(self, context)
        if context.evaluator is not None:
            context.evaluator.add_event_handler(Events.EPOCH_COMPLETED, _log_against_baseline, context.trainer)


def _log_against_baseline(evaluator, trainer) -> None:
    m = evaluator.state.metrics
    net, ns = m.get("val_psnr"), m.get("val_psnr_ns")
    if net is None or ns is None:
        return
    verdict = "beats" if net > ns else "does not beat"
    logger.info(f"twlr_inpainter epoch {trainer.state.epoch}: hole PSNR {net:.2f} dB, {verdict} OpenCV "
                f"Navier-Stokes ({ns:.2f} dB) on the same held-out holes")
