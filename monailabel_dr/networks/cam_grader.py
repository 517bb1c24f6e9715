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

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from monailabel_dr.fundus.lesions import GRADES, LESIONS
from monailabel_dr.networks.settings import typed

N_GRADES = len(GRADES)
N_LESIONS = len(LESIONS)
N_OUTPUTS = N_GRADES + 1 + N_LESIONS
REFERABLE_INDEX = N_GRADES
LESION_SLICE = slice(N_GRADES + 1, N_GRADES + 1 + N_LESIONS)


@dataclass
class CAMGraderConfig:
    in_channels: int = 3
    channels: Sequence[int] = (16, 32, 64, 96)
    strides: Sequence[int] = (2, 2, 2, 1)
    convs_per_stage: int = 1
    cam_channels: int = 128
    dropout: float = 0.2

    @classmethod
    def from_dict(cls, d: dict) -> "CAMGraderConfig":
        # "attention": the lesion-attention grader's block (networks/attention_grader.py build_grader)
        return typed(cls, d, "grading network", ignore=("attention",))

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


class GraderLoss(nn.Module):
    """Cross-entropy on grades + BCE on referable DR + BCE on lesion presence.

    Entries marked -1 in the target are ignored, so images with only a grade or
    only lesion labels both contribute.

    Options for imbalanced, ordinal grades (none is in the CAM paper; all off by default):

    - ``class_weights`` (5 values): per-grade weights of the cross-entropy (e.g. inverse square root of
      the grade frequencies, :func:`grade_class_weights`), so the few severe / proliferative eyes count;
    - ``ordinal_weight``: adds ``ordinal_weight * (E[grade] - grade)^2 / 16`` with ``E[grade]`` the
      softmax's expected grade: a wrong grade costs by its distance, as quadratic weighted kappa counts
      it, which the plain cross-entropy does not (calling a grade 4 eye grade 3 or grade 0 costs the same).
    """

    def __init__(self, grade_weight: float = 1.0, referable_weight: float = 0.5, lesion_weight: float = 0.5,
                 label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None,
                 ordinal_weight: float = 0.0):
        super().__init__()
        self.grade_weight = grade_weight
        self.referable_weight = referable_weight
        self.lesion_weight = lesion_weight
        self.label_smoothing = label_smoothing
        self.ordinal_weight = float(ordinal_weight)
        if class_weights is not None:
            w = torch.as_tensor([float(v) for v in class_weights], dtype=torch.float32)
            if w.numel() != N_GRADES or not torch.isfinite(w).all() or (w <= 0).any():
                raise ValueError(f"class_weights needs {N_GRADES} positive numbers, got {list(class_weights)}")
            self.register_buffer("class_weights", w)
        else:
            self.class_weights = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        total = logits.new_zeros(())
        grade = target[:, 0]
        known = grade >= 0
        if known.any():
            g = grade[known].long()
            gl = logits[known, :N_GRADES]
            w = None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)
            total = total + self.grade_weight * F.cross_entropy(gl, g, weight=w, label_smoothing=self.label_smoothing)
            if self.ordinal_weight > 0:
                levels = torch.arange(N_GRADES, device=logits.device, dtype=logits.dtype)
                expected = (torch.softmax(gl, dim=1) * levels).sum(1)
                sq = (expected - g.to(logits.dtype)) ** 2 / float((N_GRADES - 1) ** 2)
                sw = torch.ones_like(sq) if w is None else w[g]
                total = total + self.ordinal_weight * (sq * sw).sum() / sw.sum()
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


def grade_class_weights(grades: Sequence[int], power: float = 0.5) -> list[float]:
    """Per-grade weights ``(n_max / n_g) ** power`` from training grades (-1 = unknown is skipped), mean 1 over
    the grades present; a grade absent from training gets the largest weight. ``power`` 0.5: inverse square
    root of the frequency (1: inverse frequency)."""
    g = [int(v) for v in grades if int(v) >= 0]
    counts = [sum(1 for v in g if v == k) for k in range(N_GRADES)]
    if not g:
        return [1.0] * N_GRADES
    n_max = max(counts)
    w = [(n_max / c) ** power if c else None for c in counts]
    top = max(v for v in w if v is not None)
    w = [top if v is None else v for v in w]
    mean = sum(w[k] for k in range(N_GRADES) if counts[k]) / sum(1 for c in counts if c)
    return [round(v / mean, 6) for v in w]
