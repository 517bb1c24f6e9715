"""TWLR (Luo et al., 2025): text-guided grading, then iterative saliency-guided inpainting ("severity
regression"). ``../shared/papers/TWLR_summary.md`` (the abstract only) and ``../shared/METHODS.md`` §4.

**Stage 1, :class:`TWLRGrader`**: an open_clip vision-language model. Each ICDR grade and each lesion
is a class whose embedding is the average of several knowledge-rich text descriptions
(``configs/twlr_descriptions.yaml``). Grade logits and lesion-presence logits are scaled cosine
similarities between the image embedding and those class embeddings (plus a learnable bias per
class, which the lesion BCE needs for its threshold). Outputs use the grader layout of
:mod:`monailabel_dr.networks.cam_grader` (5 grades, referable, 4 lesions), the referable logit being
the log-odds of P(grade >= 2) under the grade softmax, so the grading loss and JSON are shared.
Lesion saliency (:meth:`TWLRGrader.saliency`): patch-text cosine similarity of the projected patch
tokens with each lesion's embedding (``patch_text``), or Grad-CAM on the patch-token grid of the
last block's input (``gradcam``, MONAI's ``GradCAM`` on :attr:`TWLRGrader.token_grid`).

**Stage 2**: METHODS.md §4's loop, an image-processing loop beside the other fundus operations
(:func:`monailabel_dr.fundus.severity_regression.severity_regression`); :func:`grading_probe` is the
grader's side of it.

Nothing here knows MONAI Label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from monailabel_dr.fundus.lesions import LESIONS, REFERABLE_MIN_GRADE
from monailabel_dr.networks.cam_grader import N_GRADES, CAMGrader, CAMGraderConfig, split_outputs
from monailabel_dr.networks.clip_towers import (
    CachedClassTexts,
    ClipConfig,
    build_clip,
    clip_pixel_stats,
    clip_tokenizer,
    patch_text_similarity,
    project_tokens,
)
from monailabel_dr.networks.settings import typed

DEFAULT_DESCRIPTIONS = Path(__file__).resolve().parents[1] / "configs" / "twlr_descriptions.yaml"
SALIENCY_METHODS = ("patch_text", "gradcam")


@dataclass
class TWLRConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    grade_texts: list = field(default_factory=list)     # [[phrases of grade 0], ..., [grade 4]]
    lesion_texts: list = field(default_factory=list)    # [[phrases of MA], ..., [SE]]
    logit_scale: float = 1.0 / 0.07                     # CLIP's initial temperature
    train_text: bool = True                              # the text tower trains (False: frozen class embeddings)
    conv_tower: dict | None = None                       # CPU profiles: ConvImageTower's trunk instead of a ViT

    @classmethod
    def from_dict(cls, d: dict) -> "TWLRConfig":
        d = dict(d)
        path = d.pop("descriptions_file", None) or DEFAULT_DESCRIPTIONS
        with open(path) as f:
            texts = yaml.safe_load(f) or {}
        grades = texts.get("grades") or {}
        lesions = texts.get("lesions") or {}
        d.setdefault("grade_texts", [_phrases(grades.get(g, grades.get(str(g))), f"grade {g}") for g in range(N_GRADES)])
        d.setdefault("lesion_texts", [_phrases(lesions.get(les), les) for les in LESIONS])
        d["clip"] = typed(ClipConfig, d.pop("clip", None), "twlr network.clip")
        if d.get("conv_tower"):   # ConvImageTower's trunk: a CAM grader's settings and its pooling
            typed(CAMGraderConfig, d["conv_tower"], "twlr network.conv_tower", ignore=("pool",))
        return typed(cls, d, "twlr network")


class ConvImageTower(nn.Module):
    """CLIP's image tower in the from-scratch CPU profiles (``network.conv_tower``): the CAM grader's
    convolutional trunk (:class:`monailabel_dr.networks.cam_grader.CAMGrader`, MONAI ``Convolution``
    blocks, a stride-8 map) whose every location is projected linearly (no bias) into the joint
    image-text space; the image embedding is their average. So the projected locations are the
    "patch tokens" of patch-text saliency, and their mean is exactly the pooled embedding.

    ``pool`` (in ``network.conv_tower``): ``mean`` (default) averages the location embeddings;
    ``attention`` weights them by a learned softmax over locations (attention-based multiple-instance
    pooling, Ilse et al., ICML 2018: a tanh layer and a linear score per location), so a few small
    lesions are not averaged away over a large photograph. Either way the image embedding is a convex
    combination of the patch tokens that patch-text saliency reads.

    The tower is fully convolutional. In training mode an input smaller than ``image_size`` (both
    sides multiples of the stride) is taken as it is: a crop at the working resolution
    (``train.crop`` of the TWLR trainer); anything else is resized to ``image_size`` as CLIP does.

    Why not open_clip's own towers here: a from-scratch 2-layer ViT did not learn lesion presence on
    phantoms (the figures: docs/results.md, "Measurements behind the configs' defaults"), and open_clip's timm towers have output
    stride 32 (a 4x4 saliency grid at 128 px). The ``paper`` profile keeps CLIP ViT-B/16 with weights.
    """

    def __init__(self, trunk: dict, embed_dim: int, image_size: int):
        super().__init__()
        trunk = dict(trunk)
        self.pool = str(trunk.pop("pool", "mean"))
        if self.pool not in ("mean", "attention"):
            raise ValueError(f"conv_tower.pool must be mean or attention, not {self.pool!r}")
        cfg = CAMGraderConfig.from_dict(trunk)
        self.stride = cfg.total_stride
        grader = CAMGrader(cfg)
        self.features, self.cam_conv = grader.features, grader.cam_conv   # its linear head is not used
        self.proj = nn.Linear(cfg.cam_channels, int(embed_dim), bias=False)
        hidden = max(16, int(embed_dim) // 2)
        self.attention = (nn.Sequential(nn.Linear(int(embed_dim), hidden), nn.Tanh(), nn.Linear(hidden, 1))
                          if self.pool == "attention" else None)
        self.image_size = (int(image_size), int(image_size))
        if int(image_size) % cfg.total_stride:
            raise ValueError(f"image_size {image_size} is not a multiple of the conv tower's stride {cfg.total_stride}")
        g = int(image_size) // cfg.total_stride
        self.grid_size = (g, g)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_conv(self.features(x))

    def project(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w, D) location embeddings in the joint space."""
        return self.proj(fmap.permute(0, 2, 3, 1))

    def pool_tokens(self, patch: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) location embeddings -> (B, D) image embedding."""
        if self.attention is None:
            return patch.mean(dim=(1, 2))
        z = patch.flatten(1, 2)
        return (torch.softmax(self.attention(z), dim=1) * z).sum(1)

    def takes_as_is(self, image: torch.Tensor) -> bool:
        """A training crop at the working resolution (see the class doc)."""
        h, w = image.shape[-2:]
        s = self.image_size[0]
        return self.training and h <= s and w <= s and h % self.stride == 0 and w % self.stride == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_tokens(self.project(self.feature_map(x)))


def _phrases(v, what: str) -> list[str]:
    if not v:
        raise ValueError(f"no text description for {what} in the TWLR descriptions file")
    return [v] if isinstance(v, str) else [str(t) for t in v]


class TWLRGrader(CachedClassTexts, nn.Module):
    """Stage 1: grade and lesion presence by image-text similarity. Input (B, 3, S, S) RGB in [0, 1],
    S = ``clip.image_size``; output logits (B, 10) in the grader layout."""

    def __init__(self, config: TWLRConfig | dict, load_weights: bool = True):
        super().__init__()
        self.config = config if isinstance(config, TWLRConfig) else TWLRConfig.from_dict(config)
        cfg = self.config
        clip_cfg = cfg.clip
        if cfg.conv_tower:
            if not clip_cfg.custom:
                raise ValueError("network.conv_tower needs a custom (from-scratch) CLIP: clip.custom")
            # open_clip's CLIP always builds a ViT; a one-block stub keeps that cheap, then it is replaced
            custom = dict(clip_cfg.custom)
            custom["vision_cfg"] = {"layers": 1, "width": 16, "head_width": 16, "patch_size": clip_cfg.image_size}
            clip_cfg = ClipConfig(**{**clip_cfg.__dict__, "custom": custom})
        self.clip = build_clip(clip_cfg, load_weights)
        if cfg.conv_tower:
            self.clip.visual = ConvImageTower(cfg.conv_tower, int(clip_cfg.custom["embed_dim"]), clip_cfg.image_size)
        self.clip_pretrained = bool(load_weights and cfg.clip.pretrained)
        self._tokenizer = clip_tokenizer()
        self.context_length = int(getattr(self.clip, "context_length", 77))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale)))
        self.grade_bias = nn.Parameter(torch.zeros(N_GRADES))
        self.lesion_bias = nn.Parameter(torch.zeros(len(LESIONS)))
        self.token_grid = nn.Identity()   # the Grad-CAM target layer: patch tokens as (B, C, gh, gw)
        mean, std = clip_pixel_stats()
        self.register_buffer("clip_mean", mean, persistent=False)
        self.register_buffer("clip_std", std, persistent=False)
        for p in self.clip.transformer.parameters() if not cfg.train_text else ():
            p.requires_grad_(False)

    # ---- text ------------------------------------------------------------------------------------
    def text_groups(self) -> list[list[str]]:
        return [*self.config.grade_texts, *self.config.lesion_texts]

    def class_embeddings(self) -> torch.Tensor:
        """(5 + 4, D): the grade classes, then the lesion classes. Cached at inference."""
        return self.class_text_embeddings()

    # ---- image -----------------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embedding (B, D) and projected patch tokens (B, gh, gw, D). The patch tokens entering the
        last block (a conv tower: its last feature map) pass through :attr:`token_grid` as a (B, C, gh, gw)
        map (Grad-CAM's target)."""
        v = self.clip.visual
        s = self.config.clip.image_size
        if image.shape[-2:] != (s, s) and not (isinstance(v, ConvImageTower) and v.takes_as_is(image)):
            image = F.interpolate(image, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        if isinstance(v, ConvImageTower):
            patch = v.project(self.token_grid(v.feature_map((image - self.clip_mean) / self.clip_std)))
            return v.pool_tokens(patch), patch
        x = v._embeds((image - self.clip_mean) / self.clip_std)
        blocks = v.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x)
        gh, gw = v.grid_size
        b, n, c = x.shape
        prefix, patches = x[:, : n - gh * gw], x[:, n - gh * gw:]
        grid = self.token_grid(patches.transpose(1, 2).reshape(b, c, gh, gw))
        x = torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)
        x = blocks[-1](x)
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        patch = project_tokens(v, x[:, n - gh * gw:]).reshape(b, gh, gw, -1)
        return pooled, patch

    def logits_from(self, pooled: torch.Tensor) -> torch.Tensor:
        sims = F.normalize(pooled, dim=-1) @ self.class_embeddings().T * self.logit_scale.exp().clamp(max=100.0)
        grade = sims[:, :N_GRADES] + self.grade_bias
        lesion = sims[:, N_GRADES:] + self.lesion_bias
        # referable DR (grade >= 2) as the log-odds of the grade softmax: not a separately learned head
        referable = (torch.logsumexp(grade[:, REFERABLE_MIN_GRADE:], 1) - torch.logsumexp(grade[:, :REFERABLE_MIN_GRADE], 1))
        return torch.cat([grade, referable[:, None], lesion], dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.encode_image(image)
        return self.logits_from(pooled)

    def saliency(self, image: torch.Tensor, method: str = "patch_text") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-lesion saliency (B, 4, gh, gw) in [0, 1] (min-max per map) and the logits (B, 10)."""
        if method not in SALIENCY_METHODS:
            raise ValueError(f"saliency method must be one of {SALIENCY_METHODS}, not {method!r}")
        if method == "gradcam":
            from monai.visualize import GradCAM

            cam = GradCAM(nn_module=self, target_layers="token_grid")
            maps = []
            with torch.enable_grad():
                for k in range(len(LESIONS)):
                    maps.append(cam(image, class_idx=N_GRADES + 1 + k, layer_idx=-1))
            gh, gw = self.clip.visual.grid_size
            sal = torch.cat(maps, dim=1)
            sal = F.interpolate(sal, size=(gh, gw), mode="area")   # GradCAM upsamples to the input; back to the grid
            lo = sal.amin(dim=(-2, -1), keepdim=True)
            sal = (sal - lo) / (sal.amax(dim=(-2, -1), keepdim=True) - lo).clamp_min(1e-6)
            with torch.no_grad():
                return sal.detach(), self(image)
        with torch.no_grad():
            pooled, patch = self.encode_image(image)
            text = self.class_embeddings()[N_GRADES:]
            return patch_text_similarity(patch, text, normalise=True), self.logits_from(pooled)


def build_twlr_grader(network_config: dict, load_weights: bool = True, image_size: int | None = None) -> TWLRGrader:
    """The stage-1 model of a profile's ``network`` block; ``image_size`` (the working size) is CLIP's input."""
    cfg = TWLRConfig.from_dict(network_config)
    if image_size is not None and int(image_size) != cfg.clip.image_size:
        if cfg.clip.pretrained and load_weights and not cfg.clip.custom:
            raise ValueError(f"image_size {image_size} differs from the pretrained CLIP's input size {cfg.clip.image_size}")
        cfg.clip.image_size = int(image_size)
    return TWLRGrader(cfg, load_weights=load_weights)


# ------------------------------------------------------------------------------------------------
# Stage 2's view of the grader (the loop itself is monailabel_dr.fundus.severity_regression)


def grading_probe(grader, method: str = "patch_text", device: str = "cpu"):
    """The ``grade_fn`` of :func:`monailabel_dr.fundus.severity_regression.severity_regression` for a
    :class:`TWLRGrader` (or anything with its ``saliency(x, method) -> (saliency, logits)``): one working
    image (S, S, 3) uint8 -> (grade probabilities, lesion probabilities, lesion saliency (m, S, S) at S)."""
    if method not in SALIENCY_METHODS:
        raise ValueError(f"saliency must be one of {SALIENCY_METHODS}, got {method!r}")

    def grade_fn(img: np.ndarray):
        s = img.shape[0]
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).to(device)
        sal, logits = grader.saliency(x, method)
        out = split_outputs(logits.float().cpu())
        sal = F.interpolate(sal.float().cpu(), size=(s, s), mode="bilinear", align_corners=False)[0].numpy()
        return out["grade"][0].numpy(), out["lesions"][0].numpy(), sal

    return grade_fn
