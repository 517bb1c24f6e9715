"""CAM grader: the DR grading network of the CAM paper, built from MONAI blocks.

Gondal et al. (CAM paper, ``../shared/papers/CAM_weakly_supervised_DR_lesions.md``):
- a VGG-style CNN (the o_O architecture) with batch norm in every convolution;
- strides removed early so the last feature map keeps a high resolution
  (32x32 at 512 px input in the paper);
- one extra 3x3, stride-1 convolution (1024 kernels in the paper) before
- global average pooling and a single linear layer, so that the class
  activation map of output c is ``CAM_c = sum_k w_k^c A_k``.

Outputs (one linear layer over the pooled features, so every output has a CAM):
``[0:5]`` ICDR grade logits, ``[5]`` referable-DR logit (the paper's binary
RDR classifier), ``[6:10]`` lesion-presence logits in ``LESIONS`` order.

This module knows nothing of MONAI Label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from monailabel_dr.fundus.lesions import GRADES, LESIONS

N_GRADES = len(GRADES)
N_LESIONS = len(LESIONS)
N_OUTPUTS = N_GRADES + 1 + N_LESIONS
REFERABLE_INDEX = N_GRADES
LESION_SLICE = slice(N_GRADES + 1, N_GRADES + 1 + N_LESIONS)

# Target vector layout used by the trainer: grade, referable, 4 lesion flags; -1 = unknown.
N_TARGETS = 2 + N_LESIONS


@dataclass
class CAMGraderConfig:
    in_channels: int = 3
    channels: Sequence[int] = (16, 32, 64, 96)
    strides: Sequence[int] = (2, 2, 2, 1)
    convs_per_stage: int = 1
    cam_channels: int = 128
    dropout: float = 0.2
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "CAMGraderConfig":
        known = {k: d[k] for k in ("in_channels", "channels", "strides", "convs_per_stage", "cam_channels", "dropout") if k in d}
        return cls(**known)

    @property
    def total_stride(self) -> int:
        s = 1
        for v in self.strides:
            s *= int(v)
        return s


class CAMGrader(nn.Module):
    """VGG-style grader with a GAP + linear head (CAM-ready)."""

    def __init__(self, config: CAMGraderConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = CAMGraderConfig()
        elif isinstance(config, dict):
            config = CAMGraderConfig.from_dict(config)
        if len(config.channels) != len(config.strides):
            raise ValueError("channels and strides must have the same length")
        self.config = config

        layers: list[nn.Module] = []
        cin = config.in_channels
        for cout, stride in zip(config.channels, config.strides):
            for i in range(config.convs_per_stage):
                layers.append(
                    Convolution(
                        spatial_dims=2,
                        in_channels=cin,
                        out_channels=cout,
                        strides=int(stride) if i == 0 else 1,
                        kernel_size=3,
                        act="RELU",
                        norm="BATCH",
                    )
                )
                cin = cout
        self.features = nn.Sequential(*layers)
        # The paper's added 3x3 stride-1 convolution before GAP (with batch norm).
        self.cam_conv = Convolution(
            spatial_dims=2,
            in_channels=cin,
            out_channels=config.cam_channels,
            strides=1,
            kernel_size=3,
            act="RELU",
            norm="BATCH",
        )
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.fc = nn.Linear(config.cam_channels, N_OUTPUTS)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature maps A_k, shape (B, K, h, w)."""
        return self.cam_conv(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.feature_maps(x)
        pooled = F.adaptive_avg_pool2d(a, 1).flatten(1)
        return self.fc(self.dropout(pooled))

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, N_OUTPUTS) and class activation maps (B, N_OUTPUTS, h, w).

        CAM_c = sum_k w_k^c A_k (the bias is a constant offset and is left out, as in
        Zhou et al.); averaging CAM_c over the map plus the bias gives logit c
        exactly (dropout is inactive in eval mode).
        """
        a = self.feature_maps(x)
        logits = self.fc(self.dropout(F.adaptive_avg_pool2d(a, 1).flatten(1)))
        cams = torch.einsum("ck,bkhw->bchw", self.fc.weight, a)
        return logits, cams


def split_outputs(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Probabilities from raw logits: grade softmax, referable and lesion sigmoids."""
    return {
        "grade": torch.softmax(logits[..., :N_GRADES], dim=-1),
        "referable": torch.sigmoid(logits[..., REFERABLE_INDEX]),
        "lesions": torch.sigmoid(logits[..., LESION_SLICE]),
    }


def make_targets(grade: int | None, lesions: dict[str, bool | int | None] | None) -> list[float]:
    """Target vector [grade, referable, MA, HE, EX, SE]; -1 marks an unknown entry."""
    from monailabel_dr.fundus.lesions import is_referable

    t = [-1.0] * N_TARGETS
    if grade is not None:
        t[0] = float(int(grade))
        t[1] = 1.0 if is_referable(int(grade)) else 0.0
    for i, name in enumerate(LESIONS):
        v = (lesions or {}).get(name)
        if v is not None:
            t[2 + i] = 1.0 if bool(v) else 0.0
    return t


class GraderLoss(nn.Module):
    """Cross-entropy on grades + BCE on referable DR + BCE on lesion presence.

    Entries marked -1 in the target are ignored, so images with only a grade or
    only lesion labels both contribute.
    """

    def __init__(self, grade_weight: float = 1.0, referable_weight: float = 0.5, lesion_weight: float = 0.5,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.grade_weight = grade_weight
        self.referable_weight = referable_weight
        self.lesion_weight = lesion_weight
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        total = logits.new_zeros(())
        grade = target[:, 0]
        known = grade >= 0
        if known.any():
            total = total + self.grade_weight * F.cross_entropy(
                logits[known, :N_GRADES], grade[known].long(), label_smoothing=self.label_smoothing
            )
        ref = target[:, 1]
        known = ref >= 0
        if known.any():
            total = total + self.referable_weight * F.binary_cross_entropy_with_logits(
                logits[known, REFERABLE_INDEX], ref[known]
            )
        les = target[:, 2:]
        known = les >= 0
        if known.any():
            total = total + self.lesion_weight * F.binary_cross_entropy_with_logits(
                logits[:, LESION_SLICE][known], les[known]
            )
        return total
