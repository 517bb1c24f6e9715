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

**Stage 2, :func:`severity_regression`**: METHODS.md §4's loop (see its docstring), with the
inpainting backend passed in (:mod:`monailabel_dr.fundus.inpainting`).

Nothing here knows MONAI Label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from monailabel_dr.fundus.lesions import GRADES, LESIONS, REFERABLE_MIN_GRADE
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
        clip = ClipConfig(**(d.pop("clip", None) or {}))
        return cls(clip=clip, **d)


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
    phantoms (lesion AUC 0.39-0.61 on 60 fresh phantoms after 30 epochs on 88 images; 0.45-0.57 after
    400 steps on 300; it could only overfit 16 images), and open_clip's timm towers have output
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
# Stage 2: iterative severity regression


@dataclass
class RegressionSettings:
    """METHODS.md §4's defaults."""
    tau: float = 0.5                 # a lesion is inpainted while its presence probability is above tau
    threshold: float = 0.5           # on the min-max normalised saliency
    dilation: int = 3                # px at the loop's working resolution
    t_max: int = 8
    min_new_fraction: float = 0.0005  # a new region under this fraction of the field of view is "tiny"
    patience: int = 2                # stop when the grade has not dropped for this many steps
    saliency: str = "patch_text"

    @classmethod
    def from_dict(cls, d: dict | None) -> "RegressionSettings":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown severity-regression settings {sorted(unknown)}")
        s = cls(**d)
        s.tau, s.threshold, s.min_new_fraction = float(s.tau), float(s.threshold), float(s.min_new_fraction)
        s.dilation, s.t_max, s.patience = int(s.dilation), int(s.t_max), int(s.patience)
        if not 0 < s.tau < 1 or not 0 < s.threshold < 1:
            raise ValueError("tau and threshold must lie in (0, 1)")
        if s.dilation < 0 or not 1 <= s.t_max <= 50 or s.patience < 1:
            raise ValueError("dilation >= 0, 1 <= t_max <= 50 and patience >= 1 are required")
        if s.saliency not in SALIENCY_METHODS:
            raise ValueError(f"saliency must be one of {SALIENCY_METHODS}")
        return s


@dataclass
class Step:
    grade_probabilities: list[float]
    lesion_probabilities: dict[str, float]
    grade: int
    new_area: int = 0
    new_area_per_lesion: dict[str, int] = field(default_factory=dict)


@dataclass
class Regression:
    images: list[np.ndarray]          # (S, S, 3) uint8, step 0 = the input
    masks: list[np.ndarray]           # per step >= 1: (S, S) uint8 label of the newly inpainted region (1-4)
    steps: list[Step]
    weak: np.ndarray                  # (4, S, S) bool: union of the regions removed per lesion
    stop_reason: str
    score: np.ndarray | None = None   # (4, S, S) float: the weak masks as a ranking (see severity_regression)


def severity_regression(grader: TWLRGrader, image: np.ndarray, fov: np.ndarray,
                        inpaint: Callable[[np.ndarray, np.ndarray], np.ndarray],
                        settings: RegressionSettings, device: str = "cpu") -> Regression:
    """METHODS.md §4's loop on one working image (S, S, 3) uint8 with its field of view (S, S) bool.

    Each step: grade the current image; the lesions whose presence probability is above ``tau`` give
    saliency maps (min-max normalised, upsampled to S); each is thresholded, dilated by ``dilation``
    px and restricted to the field of view; their union minus what was already removed is the new
    region, which alone is inpainted; then the image is regraded. A pixel of the new region is
    credited to the lesion with the highest saliency there (the weak mask of that lesion).

    ``Regression.score`` ranks the weak-mask pixels for threshold-free metrics (AUC-PR): a pixel removed
    at step t (1-based) for lesion k scores 0.5 + 0.5 (t_max - t + max(s, 0.01)) / t_max, s being its
    normalised saliency for k then; others score 0. So earlier removal ranks higher, saliency breaks
    ties within a step, and ``score > 0.5`` is exactly the weak mask.

    Stops when: the grade is 0 (``healthy``), no lesion is above tau (``no_lesion_above_tau``), the new
    region is under ``min_new_fraction`` of the field of view (``tiny_region``), the grade has not
    dropped for ``patience`` steps (``no_grade_drop``), ``t_max`` steps were taken (``t_max``). A step
    whose regrade is a higher grade than before is undone and ends the loop (``grade_increased``), so
    the recorded grades never increase.
    """
    s = image.shape[0]
    fov = fov.astype(bool)
    fov_area = max(int(fov.sum()), 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * settings.dilation + 1,) * 2) if settings.dilation else None
    removed = np.zeros((s, s), bool)
    weak = np.zeros((len(LESIONS), s, s), bool)
    score = np.zeros((len(LESIONS), s, s), np.float32)

    def grade(img: np.ndarray) -> tuple[Step, torch.Tensor]:
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).to(device)
        sal, logits = grader.saliency(x, settings.saliency)
        out = split_outputs(logits.float().cpu())
        gp = out["grade"][0].numpy()
        step = Step(grade_probabilities=[round(float(p), 4) for p in gp], grade=int(gp.argmax()),
                    lesion_probabilities={les: round(float(p), 4) for les, p in zip(LESIONS, out["lesions"][0].numpy())})
        sal = F.interpolate(sal.float().cpu(), size=(s, s), mode="bilinear", align_corners=False)[0].numpy()
        return step, sal

    current = image.copy()
    step, sal = grade(current)
    images, masks, steps = [current], [], [step]
    stalled = 0
    reason = "t_max"
    for t in range(1, settings.t_max + 1):
        if step.grade == 0:
            reason = "healthy"
            break
        active = [k for k, les in enumerate(LESIONS) if step.lesion_probabilities[les] > settings.tau]
        if not active:
            reason = "no_lesion_above_tau"
            break
        region = np.zeros((s, s), bool)
        for k in active:
            m = (sal[k] >= settings.threshold).astype(np.uint8)
            if kernel is not None:
                m = cv2.dilate(m, kernel)
            region |= m.astype(bool)
        new = region & fov & ~removed
        if new.sum() < settings.min_new_fraction * fov_area:
            reason = "tiny_region"
            break
        owner = np.asarray(active)[np.argmax(sal[active], axis=0)]
        candidate = inpaint(current, new)
        next_step, next_sal = grade(candidate)
        if next_step.grade > step.grade:
            reason = "grade_increased"
            break
        label = np.zeros((s, s), np.uint8)
        for k in active:
            part = new & (owner == k)
            weak[k] |= part
            label[part] = k + 1
            score[k][part] = 0.5 + 0.5 * (settings.t_max - t + np.maximum(sal[k][part], 0.01)) / settings.t_max
        next_step.new_area = int(new.sum())
        next_step.new_area_per_lesion = {LESIONS[k]: int((label == k + 1).sum()) for k in active}
        removed |= new
        stalled = stalled + 1 if next_step.grade >= step.grade else 0
        current, step, sal = candidate, next_step, next_sal
        images.append(current)
        masks.append(label)
        steps.append(step)
        if stalled >= settings.patience:
            reason = "no_grade_drop"
            break
    else:
        reason = "t_max"
    if reason == "t_max" and step.grade == 0:
        reason = "healthy"
    return Regression(images=images, masks=masks, steps=steps, weak=weak, stop_reason=reason, score=score)


def grade_names(steps: Sequence[Step]) -> list[str]:
    return [GRADES[st.grade] for st in steps]
