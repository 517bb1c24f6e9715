"""Lesion-attention grader: the multi-task network of Lesion-Net (Wei et al.), on the CAM grader.

The lesion maps of a (pre-trained, frozen) Lesion-Net feed two 3x3 convolutions that give one
weight map per feature channel of the grader's last feature maps; the weighted features go
through global average pooling and the grader's linear head:

    A = sigmoid(conv3x3(relu(conv3x3(S))))     S: lesion probability maps pooled to the feature grid
    F' = F * A          (the paper, default)   or   F * (1 + A)   (``mode: "F(1+A)"``)
    logits = W GAP(F') + b

Lesion maps are computed at the lesion network's own working size (the grader's input is
resized for it) and max-pooled to the feature grid, so small lesions are not averaged away.
Because the head is still GAP + linear, the CAM infer task works unchanged on F'.

This module knows nothing of MONAI Label.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from monailabel_dr.networks.cam_grader import CAMGrader, CAMGraderConfig
from monailabel_dr.networks.lesion_net import build_lesion_net

MODES = ("FA", "F(1+A)")


class LesionAttentionGrader(nn.Module):
    def __init__(self, grader: dict, lesion: dict, lesion_size: int, mode: str = "FA", mid_channels: int = 16):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
        self.grader = CAMGrader(CAMGraderConfig.from_dict(grader))
        self.lesion_net = build_lesion_net(lesion)   # one Lesion-Net or an ensemble of them
        self.lesion_size = int(lesion_size)
        self.mode = mode
        m = self.lesion_net.config.out_channels
        k = self.grader.config.cam_channels
        self.attention = nn.Sequential(
            nn.Conv2d(m, mid_channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, k, 3, padding=1), nn.Sigmoid(),
        )
        self.lesion_frozen = False

    # --------------------------------------------------------------- lesion branch
    def freeze_lesion_branch(self) -> None:
        """Train only the grader and the attention convs (the paper trains the grader with Lesion-Net fixed)."""
        for p in self.lesion_net.parameters():
            p.requires_grad_(False)
        self.lesion_frozen = True
        self.lesion_net.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lesion_frozen:
            self.lesion_net.eval()  # keep batch-norm statistics of the frozen branch
        return self

    def lesion_maps(self, x: torch.Tensor) -> torch.Tensor:
        xs = x if x.shape[-1] == self.lesion_size else F.interpolate(
            x, size=(self.lesion_size, self.lesion_size), mode="bilinear", align_corners=False)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lesion_frozen):
            return torch.sigmoid(self.lesion_net(xs))

    # --------------------------------------------------------------- grader
    @property
    def lesion_channels(self) -> int:
        return int(self.lesion_net.config.out_channels)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted features F' of an RGB batch (B, 3, S, S), whose lesion maps the branch computes from
        the same pixels resized to its working size, or of (B, 3 + m, S, S): RGB followed by the m lesion
        probability maps already computed from the photograph at the branch's working size and max-pooled
        to S (:class:`monailabel_dr.transforms.LesionMapsd`, which the trainer caches and the infer tasks
        run). Max-pooling nests (lesion size / S and S / feature grid are integers), so both give the
        same S when the RGB is the same."""
        m = self.lesion_channels
        if x.shape[1] == 3 + m:
            rgb, maps = x[:, :3], x[:, 3:]
        else:
            rgb, maps = x, None
        f = self.grader.feature_maps(rgb)
        s = F.adaptive_max_pool2d(self.lesion_maps(rgb) if maps is None else maps, f.shape[-2:])
        a = self.attention(s)
        return f * a if self.mode == "FA" else f * (1 + a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.feature_maps(x)
        return self.grader.fc(self.grader.dropout(F.adaptive_avg_pool2d(a, 1).flatten(1)))

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.feature_maps(x)
        logits = self.grader.fc(self.grader.dropout(F.adaptive_avg_pool2d(a, 1).flatten(1)))
        return logits, torch.einsum("ck,bkhw->bchw", self.grader.fc.weight, a)

    @property
    def cam_layer(self) -> str:
        return "grader.cam_conv"


def build_grader(network_config: dict) -> nn.Module:
    """The grading network of a profile: the CAM grader, or with an ``attention`` block
    (``{"lesion": <lesion_seg network>, "lesion_size": S, "mode": "FA", "mid_channels": 16}``,
    resolved by :func:`monailabel_dr.config.parse_conf`) the lesion-attention grader."""
    att = network_config.get("attention")
    if not att:
        return CAMGrader(CAMGraderConfig.from_dict(network_config))
    return LesionAttentionGrader(grader=network_config, lesion=att["lesion"], lesion_size=att["lesion_size"],
                                 mode=att.get("mode", "FA"), mid_channels=int(att.get("mid_channels", 16)))
