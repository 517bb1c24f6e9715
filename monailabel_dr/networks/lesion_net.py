"""Lesion-Net (Wei et al., ``../shared/papers/Lesion-Net.md``) and its losses.

- Contracting path: a MONAI ResNet (widths and depths from the profile; the paper
  used Inception-v3, METHODS.md allows any MONAI/torchvision backbone). Its
  feature maps sit at strides 2 (stem), 4, 8, 16 and 32.
- Expansive path of adjustable length, "Lesion-Net-Xs" for X in {32, 16, 8, 4, 2}:
  starting from the stride-32 map, at each kept stride a 1x1 convolution maps the
  features to the lesion channels, a parameter-free bilinear x2 upsampling
  enlarges them, and the result is concatenated with the next finer feature map
  (U-Net-style merge); a final 1x1 convolution gives one logit map per lesion,
  bilinearly upsampled to the input size. Per-lesion sigmoid outputs: a pixel may
  carry several lesions.
- Image-level presence P_j = global max of map j.
- Dual Dice loss: lambda * Dice_pixel + (1 - lambda) * Dice_image (lambda = 0.8),
  with the paper's schedule as an option (pixel Dice until the learning rate
  first drops); weighted BCE and focal loss as alternatives.

This module knows nothing of MONAI Label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from monai.networks.nets import ResNet
from monai.networks.nets.basic_unet import Down, TwoConv

from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.networks.settings import typed

N_LESIONS = len(LESIONS)
VALID_CUTS = (32, 16, 8, 4, 2)


BACKBONES = ("resnet", "unet_encoder")


@dataclass
class LesionNetConfig:
    in_channels: int = 3
    backbone: str = "resnet"                      # contracting path: "resnet" or "unet_encoder"
    widths: Sequence[int] = (32, 64, 128, 256)   # resnet: block widths of layer1..layer4;
    #                                              unet_encoder: 6 widths, strides 1, 2, 4, 8, 16, 32
    depths: Sequence[int] = (1, 1, 1, 1)         # resnet: blocks per layer
    cut: int = 8                                  # Lesion-Net-<cut>s
    expansive_width: int | None = None            # None: the 1x1 convs map to the lesion channels
    out_channels: int = N_LESIONS
    dropout: float = 0.0                          # channel dropout (Dropout2d) on the output head's input
    members: int = 1                              # > 1: an ensemble of that many Lesion-Nets (LesionEnsemble)

    @classmethod
    def from_dict(cls, d: dict) -> "LesionNetConfig":
        return typed(cls, d, "lesion_seg network")


class UNetEncoder(nn.Module):
    """The contracting path of MONAI's BasicUNet (TwoConv, then Down blocks: max-pool + two 3x3
    conv, instance norm, LeakyReLU), one more Down so it reaches stride 32."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        if len(widths) != 6:
            raise ValueError(f"unet_encoder needs 6 widths (strides 1..32), got {list(widths)}")
        act, norm = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}), ("instance", {"affine": True})
        self.conv_0 = TwoConv(2, in_channels, widths[0], act, norm, True)
        self.downs = nn.ModuleList(Down(2, widths[i], widths[i + 1], act, norm, True) for i in range(5))
        self.channels = {2**i: int(w) for i, w in enumerate(widths)}

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        f = {1: self.conv_0(x)}
        for i, down in enumerate(self.downs):
            f[2 ** (i + 1)] = down(f[2**i])
        return f


class LesionNet(nn.Module):
    def __init__(self, config: LesionNetConfig | dict | None = None):
        super().__init__()
        cfg = LesionNetConfig.from_dict(config) if isinstance(config, dict) else (config or LesionNetConfig())
        if int(cfg.cut) not in VALID_CUTS:
            raise ValueError(f"cut must be one of {VALID_CUTS} (Lesion-Net-Xs), got {cfg.cut}")
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {cfg.backbone!r}")
        if int(cfg.members) != 1:
            raise ValueError(f"a LesionNet is one network (members 1, got {cfg.members}): build_lesion_net "
                             "builds an ensemble")
        self.config = cfg
        m = cfg.out_channels
        if cfg.backbone == "resnet":
            self.backbone = ResNet(
                block="basic",
                layers=list(cfg.depths),
                block_inplanes=list(cfg.widths),
                spatial_dims=2,
                n_input_channels=cfg.in_channels,
                conv1_t_size=7,
                conv1_t_stride=2,
                feed_forward=False,
                num_classes=1,
            )
            self.backbone.avgpool = nn.Identity()
            # channels of the feature maps at strides 2, 4, 8, 16, 32
            stem = self.backbone.bn1.num_features
            chans = {2: stem, 4: cfg.widths[0], 8: cfg.widths[1], 16: cfg.widths[2], 32: cfg.widths[3]}
        else:
            self.backbone = UNetEncoder(cfg.in_channels, cfg.widths)
            chans = self.backbone.channels
        self.levels = [s for s in (32, 16, 8, 4, 2) if s >= cfg.cut]  # coarse -> fine, ending at the cut
        # At every kept stride but the finest: a 1x1 conv adjusts the number of maps -- to the lesion
        # channels (expansive_width None, the reading of METHODS.md) or to expansive_width maps
        # followed by batch norm + ReLU (the paper: "a 1x1 convolution to adjust the number of
        # feature maps") -- then x2 bilinear and concatenation with the next finer map.
        self.reduce = nn.ModuleDict()
        width = cfg.expansive_width or m
        in_ch = chans[32]
        for coarse, fine in zip(self.levels[:-1], self.levels[1:]):
            conv = nn.Conv2d(in_ch, width, kernel_size=1)
            self.reduce[str(coarse)] = (
                conv if cfg.expansive_width is None else nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            )
            in_ch = width + chans[fine]
        # Not in the paper: optional channel dropout before the output head (``dropout`` > 0), for
        # MC-dropout uncertainty (lib/activelearning). Parameter-free, so checkpoints load either way;
        # 0 (default) is an Identity and leaves the network exactly as before.
        if not 0.0 <= float(cfg.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
        self.dropout = nn.Dropout2d(float(cfg.dropout)) if cfg.dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(in_ch, m, kernel_size=1)

    def features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.config.backbone == "unet_encoder":
            return self.backbone(x)
        b = self.backbone
        f2 = b.act(b.bn1(b.conv1(x)))
        f4 = b.layer1(b.maxpool(f2))
        f8 = b.layer2(f4)
        f16 = b.layer3(f8)
        f32 = b.layer4(f16)
        return {2: f2, 4: f4, 8: f8, 16: f16, 32: f32}

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """The expansive path's last merged map (B, C, h, w) at stride ``cut``: the output head's input."""
        f = self.features(x)
        y = f[32]
        for coarse, fine in zip(self.levels[:-1], self.levels[1:]):
            y = self.reduce[str(coarse)](y)
            y = F.interpolate(y, size=f[fine].shape[-2:], mode="bilinear", align_corners=False)
            y = torch.cat([y, f[fine]], dim=1)
        return y

    def head_output(self, y: torch.Tensor, size) -> torch.Tensor:
        """Per-lesion logits at ``size`` from a (possibly dropped-out) head input."""
        return F.interpolate(self.head(y), size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-lesion logits (B, m, H, W) at the input size."""
        return self.head_output(self.dropout(self.head_input(x)), x.shape[-2:])


def presence_from_probs(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Image-level presence P_j = global max of map j (inside `mask` when given): (B, m)."""
    if mask is not None:
        probs = probs * mask
    return torch.amax(probs, dim=(-2, -1))


class LesionLoss(nn.Module):
    """Segmentation losses of the paper and its comparisons, restricted to the field of view.

    kind: ``dual_dice`` (default: lambda*Dice_pixel + (1-lambda)*Dice_image), ``dice`` (pixel Dice only),
    ``wbce`` (BCE with per-lesion positive weights), ``focal`` (alpha 0.8, gamma 2 as in the paper's comparison).
    ``use_dual`` can be switched by the trainer for the paper's schedule.
    Dice terms are computed over the whole mini-batch per lesion (MONAI DiceLoss with batch=True), as the paper's
    batch-level formulation.
    """

    def __init__(self, kind: str = "dual_dice", lam: float = 0.8, pos_weight: Sequence[float] | None = None,
                 focal_alpha: float = 0.8, focal_gamma: float = 2.0, smooth: float = 1.0, bce_weight: float = 0.0):
        super().__init__()
        if kind not in ("dual_dice", "dice", "wbce", "focal"):
            raise ValueError(f"unknown loss {kind!r}")
        self.kind = kind
        self.lam = float(lam)
        self.use_dual = kind == "dual_dice"
        # Laplace smoothing (default 1): with MONAI's 1e-5 the Dice of a lesion absent from the batch
        # saturates at 1 and gives no gradient, so absent-lesion maps are never pushed down (measured:
        # they hovered around 0.5 and a correction was learned in only some runs).
        self.pixel_dice = DiceLoss(sigmoid=False, batch=True, smooth_nr=smooth, smooth_dr=smooth)
        self.image_dice = DiceLoss(sigmoid=False, batch=True, smooth_nr=smooth, smooth_dr=smooth)
        self.register_buffer("pos_weight", torch.as_tensor(pos_weight if pos_weight is not None else [1.0] * N_LESIONS,
                                                           dtype=torch.float32))
        self.focal = FocalLoss(alpha=focal_alpha, gamma=focal_gamma, use_softmax=False)
        # Not in the paper (which fine-tunes an ImageNet network on 12K images): an optional pixel BCE
        # term. From a random start every map sits near 0.5, so the Dice of a lesion absent from the
        # batch has a vanishing gradient however it is smoothed; BCE pushes such maps down.
        self.bce_weight = float(bce_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """target: (B, m + 1, H, W): m lesion masks, then the field-of-view mask (1 inside)."""
        target = target.to(logits.dtype)
        fov = target[:, -1:]
        truth = target[:, :-1]
        if self.kind == "wbce":
            w = fov * (1 + (self.pos_weight.view(1, -1, 1, 1) - 1) * truth)
            return F.binary_cross_entropy_with_logits(logits, truth, weight=w, reduction="sum") / fov.sum().clamp_min(1)
        if self.kind == "focal":
            return self.focal(logits * fov, truth * fov)
        probs = torch.sigmoid(logits) * fov
        truth = truth * fov
        loss = self.pixel_dice(probs, truth)
        if self.use_dual:
            p_img = presence_from_probs(probs)[..., None]           # (B, m, 1)
            t_img = torch.amax(truth, dim=(-2, -1))[..., None]
            loss = self.lam * loss + (1 - self.lam) * self.image_dice(p_img, t_img)
        if self.bce_weight > 0:
            # ``pos_weight`` also weights this term's lesion pixels. Why (measured on IDRiD): MA covers ~0.2 %
            # of a crop, so an unweighted BCE settles every MA logit near the base rate (sigmoid ~0.002);
            # there the sigmoid is saturated and the Dice gradient through it vanishes, and MA was never
            # learned (docs/results.md). A positive weight w lifts that resting point ~w-fold.
            w = fov * (1 + (self.pos_weight.view(1, -1, 1, 1) - 1) * truth)
            bce = F.binary_cross_entropy_with_logits(logits, truth, weight=w, reduction="sum")
            loss = loss + self.bce_weight * bce / (fov.sum().clamp_min(1) * logits.shape[1])
        return loss


def build_lesion_net(network_config: dict) -> "LesionNet | LesionEnsemble":
    """The network of a profile's ``network`` block: one Lesion-Net, or with ``members`` > 1 an ensemble of them."""
    cfg = LesionNetConfig.from_dict(network_config)
    if int(cfg.members) < 1:
        raise ValueError(f"members must be >= 1, got {cfg.members}")
    return LesionNet(cfg) if int(cfg.members) == 1 else LesionEnsemble(cfg)


def member_config(network_config: dict) -> dict:
    """The ``network`` block of one member of an ensemble profile (``members`` 1)."""
    return {**dict(network_config), "members": 1}


class LesionEnsemble(nn.Module):
    """``members`` Lesion-Nets of the same configuration, trained one after the other from different seeds
    (lib/trainers/lesion_seg.py), served as one network: the logit of their mean sigmoid probability, so every
    caller keeps treating the output as logits (the same rule as :class:`FlipTTAInferer`'s flips).

    Averaging probabilities, not logits: a member that is confident and wrong moves the mean by at most
    ``1 / members``, and the mean of calibrated probabilities stays a probability. Not in the Lesion-Net paper
    (one network); a deep ensemble (Lakshminarayanan et al. 2017) against the run-to-run spread of training
    from scratch on 44 images (docs/results.md). The state dict holds ``members.<k>.*``: a member's own
    checkpoint loads into ``members[k]``.
    """

    def __init__(self, config: LesionNetConfig | dict):
        super().__init__()
        cfg = LesionNetConfig.from_dict(config) if isinstance(config, dict) else config
        self.config = cfg
        one = LesionNetConfig.from_dict(member_config(vars(cfg)))
        self.members = nn.ModuleList(LesionNet(one) for _ in range(int(cfg.members)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-lesion logits (B, m, H, W) of the members' mean probability."""
        probs = sum(torch.sigmoid(m(x).float()) for m in self.members) / len(self.members)
        return torch.logit(probs, eps=1e-6)


# --------------------------------------------------------------------------- test-time flips

TTA_MODES = {"none": ((),), "hflip": ((), (-1,)), "flips": ((), (-1,), (-2,), (-2, -1))}


class FlipTTAInferer:
    """Test-time flips for a network giving per-pixel logits: the sigmoid probabilities of the image and
    of its flipped copies (``TTA_MODES[mode]``, flipped back) are averaged, and their logit returned, so
    callers keep treating the output as logits.

    Hand-written rather than MONAI's ``TestTimeAugmentation``, which draws random invertible transforms
    per call to estimate uncertainty (a different purpose: results would vary between two identical
    requests); this is the deterministic flip average of segmentation ensembles. The flipped copies go
    through the network in one batch. A ``monai.inferers.Inferer``-style callable: ``(inputs, network)``.
    """

    def __init__(self, mode: str = "none"):
        if mode not in TTA_MODES:
            raise ValueError(f"test-time augmentation {mode!r}: use one of {sorted(TTA_MODES)}")
        self.mode = mode

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        flips = TTA_MODES[self.mode]
        if len(flips) == 1:
            return network(inputs, *args, **kwargs)
        batch = torch.cat([torch.flip(inputs, d) if d else inputs for d in flips])
        logits = network(batch, *args, **kwargs)
        n = inputs.shape[0]
        probs = sum(torch.sigmoid(torch.flip(logits[k * n:(k + 1) * n], d) if d else logits[k * n:(k + 1) * n])
                    for k, d in enumerate(flips)) / len(flips)
        eps = torch.finfo(probs.dtype).eps
        return torch.logit(probs.clamp(eps, 1 - eps))
