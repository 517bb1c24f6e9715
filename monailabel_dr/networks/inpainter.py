"""The learned inpainter of TWLR's stage 2: a MONAI ``BasicUNet`` taking the image with its hole zeroed
plus the hole mask (4 channels) and giving the RGB image (3 channels, sigmoid); the caller keeps its
output inside the hole only. Trained self-supervised (random holes in healthy-looking regions, L1 +
optional SSIM): ``lib/trainers/twlr_inpainter.py``. Nothing here knows MONAI Label."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.nets import BasicUNet


class UNetInpainter(nn.Module):
    def __init__(self, features=(16, 32, 64, 128, 256, 16)):
        super().__init__()
        self.unet = BasicUNet(spatial_dims=2, in_channels=4, out_channels=3, features=tuple(int(f) for f in features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.unet(x))


def build_inpainter(network_config: dict | None) -> UNetInpainter:
    return UNetInpainter(**(network_config or {}))


class HoleLoss(nn.Module):
    """L1 inside the hole (where the network is judged; elsewhere its output is discarded), plus
    ``ssim_weight`` x MONAI's SSIM loss on the composited image (the hole filled, the rest kept)."""

    def __init__(self, ssim_weight: float = 0.0):
        super().__init__()
        self.ssim_weight = float(ssim_weight)
        if self.ssim_weight > 0:
            from monai.losses import SSIMLoss

            self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0, win_size=7)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred (B, 3, H, W); target (B, 4, H, W): the true RGB and the hole mask."""
        rgb, hole = target[:, :3], target[:, 3:4]
        l1 = ((pred - rgb).abs() * hole).sum() / (hole.sum() * 3).clamp_min(1)
        if self.ssim_weight <= 0:
            return l1
        composite = rgb * (1 - hole) + pred * hole
        return l1 + self.ssim_weight * self.ssim(composite, rgb)
