"""TP-DRSeg: text-prompted SAM for DR lesion segmentation (Li et al., MICCAI 2024).

``../shared/papers/TP-DRSeg.md`` and ``../shared/METHODS.md`` §3. Built from ``segment_anything``
(image encoder, prompt encoder, mask decoder, all unchanged) and ``open_clip`` (image and text towers):

- **Explicit prior encoder**: CLIP patch tokens projected into the joint space, cosine similarity
  with the embedding of the lesion's explicit description(s) (several are averaged), min-max
  normalised per image: ``P_e`` in [0, 1] on CLIP's patch grid.
- **Prior-aligned injector** after every SAM encoder block: ``F_act = F * P_e``; q from ``F``, k and
  v from ``F_act`` (METHODS.md's reading of the paper's Eq. 2), each a 1x1 convolution with stride 4;
  ``softmax(q k^T / sqrt(d)) v``; upsampled back to the token grid and added as
  ``F' = F + gamma * attention`` with ``gamma`` initialised to 0, so a frozen pretrained SAM starts
  exactly unchanged (METHODS.md's default; the paper's Eq. 3 writes ``gamma * F + attention``, which
  cannot start unchanged).
- **Class-specific prompt generator**: ``F_p = F_e * P_e`` on the encoder output; the class picks its
  own projections (the paper's "replicate c times, keep the class channel"): a 1x1 convolution gives
  the dense embedding and a linear map over the ``H_e W_e`` positions gives ``n_sparse`` sparse tokens.
  Both go into SAM's original mask decoder, with SAM's own point/box tokens appended when a
  physician refines the result.
- **Loss** (``TPDRSegLoss``): BCE + IoU (MONAI's Jaccard-form Dice loss), inside the field of view.

Modes: ``faithful`` runs the encoder once per lesion, with that lesion's prior in every injector
(the paper). ``fast`` runs the encoder once with the union (pixel-wise max) of the requested
lesions' priors in the injectors, then the prompt generator and decoder once per lesion with each
lesion's own prior, so its masks differ from ``faithful`` wherever the injected priors differ.

Tiles: when the fundus working image is larger than SAM's input (``image_size`` > ``sam.img_size``, a
choice of the from-scratch ``small`` profile, not of the paper, whose SAM sees the whole 1024 px image),
the image is processed in SAM-sized tiles with MONAI's ``sliding_window_inference`` (overlap
``tile_overlap``, Gaussian blending); the CLIP prior is computed per tile (min-max normalised within
the tile) and training uses tile-sized crops. SAM refinement points go to the tiles that contain them
and a ``roi`` box is clipped to each tile it meets; outside the box the tiled result is set to
background.

Weights: SAM from its official checkpoint format (a local file, or the official URL when
``checkpoint: official`` and online); CLIP from an ``open_clip`` pretrained tag (``openai``) or a local
file. Every part also builds without weights (``load_weights=False``), for tests and from-scratch
profiles. This module knows nothing of MONAI Label.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import yaml
import torch.nn.functional as F
from monai.inferers import Inferer, sliding_window_inference
from monai.losses import DiceLoss

from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.networks.clip_towers import (  # noqa: F401 (WeightsUnavailable: re-exported)
    CachedClassTexts,
    ClipConfig,
    WeightsUnavailable,
    build_clip,
    clip_tokenizer,
    encode_text_groups,
    patch_text_similarity,
    projected_patch_tokens,
)
from monailabel_dr.networks.settings import typed

logger = logging.getLogger(__name__)

N_LESIONS = len(LESIONS)
DEFAULT_DESCRIPTIONS = Path(__file__).resolve().parents[1] / "configs" / "lesion_descriptions.yaml"
SAM_URLS = {"vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"}
# SAM's pixel statistics (0-255 scale), as in segment_anything's Sam; CLIP's from open_clip.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class SamConfig:
    variant: str = "vit_b"          # names the official checkpoint when checkpoint == "official"
    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256
    checkpoint: str | None = None   # local file in the official format, "official" (download), or None

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


@dataclass
class TPDRSegConfig:
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    injector: bool = True            # ablation switch (the paper's Table 3)
    injector_stride: int = 4
    injector_dim: int | None = None  # q/k width; None = embed_dim // 4
    n_sparse: int = 2                # sparse tokens per lesion (the paper leaves it open)
    tile_overlap: float = 0.25       # when the working image is larger than SAM's input (see the module doc)
    text_mode: str = "description"   # or "name": the bare-lesion-name ablation
    descriptions: dict = field(default_factory=dict)   # lesion -> [descriptions]
    names: dict = field(default_factory=dict)          # lesion -> bare name

    @classmethod
    def from_dict(cls, d: dict) -> "TPDRSegConfig":
        d = dict(d)
        # descriptions / names come from a YAML file (default: the package's lesion_descriptions.yaml)
        # unless given inline
        path = d.pop("descriptions_file", None) or DEFAULT_DESCRIPTIONS
        if not d.get("descriptions") or not d.get("names"):
            with open(path) as f:
                texts = yaml.safe_load(f) or {}
            for key in ("descriptions", "names"):
                d[key] = d.get(key) or texts.get(key, {})
        sam = typed(SamConfig, d.pop("sam", None), "lesion_sam network.sam")
        clip = typed(ClipConfig, d.pop("clip", None), "lesion_sam network.clip")
        if d.get("text_mode", "description") not in ("description", "name"):
            raise ValueError(f"text_mode must be 'description' or 'name', not {d['text_mode']!r}")
        d.update(sam=sam, clip=clip)
        return typed(cls, d, "lesion_sam network")

    def lesion_texts(self) -> list[list[str]]:
        """The text prompt(s) per lesion in LESIONS order, following text_mode."""
        out = []
        for les in LESIONS:
            if self.text_mode == "name":
                out.append([str(self.names.get(les, les))])
            else:
                texts = self.descriptions.get(les)
                if not texts:
                    raise ValueError(f"no description for lesion {les} in the lesion_sam config")
                out.append([texts] if isinstance(texts, str) else [str(t) for t in texts])
        return out


# --------------------------------------------------------------------------------------------
# building blocks from the paper


class PriorAlignedInjector(nn.Module):
    """Cross-modality interaction after one SAM encoder block (tokens as (B, H, W, C))."""

    def __init__(self, dim: int, stride: int = 4, attn_dim: int | None = None):
        super().__init__()
        d = int(attn_dim or max(dim // 4, 8))
        self.q = nn.Conv2d(dim, d, 1, stride=stride)
        self.k = nn.Conv2d(dim, d, 1, stride=stride)
        self.v = nn.Conv2d(dim, dim, 1, stride=stride)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """tokens (B, H, W, C); prior (B, 1, H, W) in [0, 1]."""
        x = tokens.permute(0, 3, 1, 2)
        act = x * prior
        q, k, v = self.q(x), self.k(act), self.v(act)
        b, d, h, w = q.shape
        att = F.scaled_dot_product_attention(q.flatten(2).transpose(1, 2), k.flatten(2).transpose(1, 2),
                                             v.flatten(2).transpose(1, 2))          # (B, h*w, C)
        att = att.transpose(1, 2).reshape(b, -1, h, w)
        att = F.interpolate(att, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return tokens + self.gamma * att.permute(0, 2, 3, 1)


class ClassSpecificPromptGenerator(nn.Module):
    """Dense and sparse prompt embeddings from the prior-weighted encoder output, per lesion class."""

    def __init__(self, dim: int, grid: int, n_classes: int = N_LESIONS, n_sparse: int = 2):
        super().__init__()
        self.dense_weight = nn.Parameter(torch.empty(n_classes, dim, dim))
        self.dense_bias = nn.Parameter(torch.zeros(n_classes, dim))
        self.sparse_weight = nn.Parameter(torch.empty(n_classes, grid * grid, n_sparse))
        self.sparse_bias = nn.Parameter(torch.zeros(n_classes, n_sparse))
        nn.init.normal_(self.dense_weight, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.sparse_weight, std=1.0 / math.sqrt(grid * grid))

    def forward(self, feats: torch.Tensor, prior: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, C, h, w) SAM encoder output; prior (B, 1, h, w); cls (B,) lesion indices.
        Returns sparse (B, n_sparse, C) and dense (B, C, h, w)."""
        fp = feats * prior
        # a 1x1 convolution whose kernel is chosen per sample (its class): einsum instead of nn.Conv2d
        dense = torch.einsum("bchw,bdc->bdhw", fp, self.dense_weight[cls]) + self.dense_bias[cls][:, :, None, None]
        sparse = torch.einsum("bcn,bnt->btc", fp.flatten(2), self.sparse_weight[cls]) + self.sparse_bias[cls][:, :, None]
        return sparse, dense


class TPDRSegLoss(nn.Module):
    """BCE + IoU loss of the paper, on logits, restricted to the field of view (mask 1 inside).

    Called with two arguments (what MONAI engines do), ``truth`` is (B, 2, H, W): the target and the
    field of view (:class:`monailabel_dr.transforms.RandLesionPromptd`'s output)."""

    def __init__(self, pos_weight: float = 1.0):
        super().__init__()
        # pos_weight > 1 weights lesion pixels in the BCE term (not in the paper, which fine-tunes a
        # pretrained SAM; from scratch the unweighted BCE parks every map below 0.5, as Lesion-Net's did)
        self.pos_weight = float(pos_weight)
        self.iou = DiceLoss(sigmoid=False, jaccard=True, smooth_nr=1.0, smooth_dr=1.0)

    def forward(self, logits: torch.Tensor, truth: torch.Tensor, fov: torch.Tensor | None = None) -> torch.Tensor:
        if fov is None and truth.shape[1] == logits.shape[1] + 1:
            truth, fov = truth[:, :-1], truth[:, -1:]
        truth = truth.to(logits.dtype)
        fov = torch.ones_like(truth) if fov is None else fov.to(logits.dtype).expand_as(truth)
        weight = fov if self.pos_weight == 1.0 else fov * (1.0 + (self.pos_weight - 1.0) * truth)
        bce = F.binary_cross_entropy_with_logits(logits, truth, weight=weight, reduction="sum") / fov.sum().clamp_min(1)
        return bce + self.iou(torch.sigmoid(logits) * fov, truth * fov)


# --------------------------------------------------------------------------------------------
# SAM and CLIP


def build_sam(cfg: SamConfig, load_weights: bool = True):
    """A segment_anything ``Sam`` of the configured size; official-format weights when asked for."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    g = cfg.grid
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
            num_heads=cfg.num_heads, mlp_ratio=4, out_chans=cfg.prompt_dim, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=cfg.window_size,
            global_attn_indexes=tuple(cfg.global_attn_indexes)),
        prompt_encoder=PromptEncoder(embed_dim=cfg.prompt_dim, image_embedding_size=(g, g),
                                     input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=cfg.prompt_dim, iou_head_depth=3,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=cfg.prompt_dim, mlp_dim=cfg.decoder_mlp_dim,
                                          num_heads=cfg.decoder_heads)),
        pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD))
    if load_weights and cfg.checkpoint:
        sam.load_state_dict(load_sam_state_dict(cfg), strict=True)
    return sam


def load_sam_state_dict(cfg: SamConfig) -> dict:
    """The official checkpoint format: a plain state dict with image_encoder./prompt_encoder./mask_decoder. keys."""
    src = str(cfg.checkpoint)
    try:
        if src == "official" or src.startswith(("http://", "https://")):
            url = SAM_URLS.get(cfg.variant) if src == "official" else src
            if url is None:
                raise WeightsUnavailable(f"no official SAM checkpoint known for variant {cfg.variant!r}")
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
        return torch.load(src, map_location="cpu", weights_only=True)
    except WeightsUnavailable:
        raise
    except Exception as e:  # offline, missing or unreadable file: say which, why and what to do
        raise WeightsUnavailable(
            f"SAM weights {src!r} could not be loaded ({type(e).__name__}: {e}). Downloading needs internet access; "
            f"offline, fetch {SAM_URLS.get(cfg.variant, 'the checkpoint')} elsewhere and set sam.checkpoint to the "
            "local file, or set it to null to build without weights.") from e


# --------------------------------------------------------------------------------------------
# the model


class TPDRSeg(CachedClassTexts, nn.Module):
    """Text-prompted lesion segmentation. Input images are (B, 3, S, S) floats in [0, 1]: the square
    working image of the fundus pipeline, S = ``sam.img_size`` or larger (then processed in tiles)."""

    def __init__(self, config: TPDRSegConfig | dict, load_weights: bool = True):
        super().__init__()
        import open_clip

        self.config = config if isinstance(config, TPDRSegConfig) else TPDRSegConfig.from_dict(config)
        cfg = self.config
        self.sam = build_sam(cfg.sam, load_weights)
        self.clip = build_clip(cfg.clip, load_weights)
        self.sam_pretrained = bool(load_weights and cfg.sam.checkpoint)
        self.clip_pretrained = bool(load_weights and cfg.clip.pretrained)
        self._tokenizer = clip_tokenizer()
        self.context_length = int(getattr(self.clip, "context_length", 77))
        self.injectors = nn.ModuleList(
            PriorAlignedInjector(cfg.sam.embed_dim, cfg.injector_stride, cfg.injector_dim) for _ in range(cfg.sam.depth)
        ) if cfg.injector else None
        self.prompt_generator = ClassSpecificPromptGenerator(cfg.sam.prompt_dim, cfg.sam.grid, N_LESIONS, cfg.n_sparse)
        self.register_buffer("clip_mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)
        self.lesion_texts = cfg.lesion_texts()
        self.freeze_pretrained()

    # ---- parameter-efficient training --------------------------------------------------------
    def freeze_pretrained(self) -> None:
        """SAM's image and prompt encoders are frozen when their pretrained weights were loaded, CLIP when
        its weights were; injectors, prompt generator and SAM's mask decoder always train."""
        for p in self.sam.image_encoder.parameters():
            p.requires_grad_(not self.sam_pretrained)
        for p in self.sam.prompt_encoder.parameters():
            p.requires_grad_(not self.sam_pretrained)
        for p in self.clip.parameters():
            p.requires_grad_(not self.clip_pretrained)

    def trainable_state_dict(self) -> dict:
        """Only what training changes (plus the prompt encoder's Fourier buffer when SAM is not pretrained)."""
        params = {n: p.requires_grad for n, p in self.named_parameters()}
        frozen = ()
        if self.sam_pretrained:
            frozen += ("sam.image_encoder.", "sam.prompt_encoder.")
        if self.clip_pretrained:
            frozen += ("clip.",)
        # trained parameters, and buffers of the parts that are not frozen
        return {k: v for k, v in self.state_dict().items()
                if params.get(k, not k.startswith(frozen))}

    def weights_source(self) -> dict:
        c = self.config
        return {"sam": c.sam.checkpoint if self.sam_pretrained else None,
                "sam_variant": c.sam.variant,
                "clip": c.clip.pretrained if self.clip_pretrained else None,
                "clip_model": c.clip.model_name if not c.clip.custom else "custom"}

    # ---- explicit prior encoder ---------------------------------------------------------------
    def encode_texts(self, groups: Sequence[Sequence[str]]) -> torch.Tensor:
        """(K, D) unit text embeddings, one per group; several texts in a group are averaged."""
        return encode_text_groups(self.clip, self._tokenizer, groups, self.context_length)

    def text_groups(self) -> list[list[str]]:
        return self.lesion_texts

    def lesion_text_embeddings(self) -> torch.Tensor:
        """(N_LESIONS, D). Constant at inference, so cached there (eval mode, no grad); training recomputes."""
        return self.class_text_embeddings()

    def clip_patch_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """(B, gh, gw, D) CLIP patch tokens projected into the joint image-text space."""
        x = F.interpolate(image, size=(self.config.clip.image_size,) * 2, mode="bilinear", align_corners=False,
                          antialias=True)
        return projected_patch_tokens(self.clip, (x - self.clip_mean) / self.clip_std)

    @staticmethod
    def explicit_prior(patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """patches (B, gh, gw, D); text (B, K, D) or (K, D) -> P_e (B, K, gh, gw), min-max normalised per map."""
        return patch_text_similarity(patches, text, normalise=True)

    # ---- SAM with injectors --------------------------------------------------------------------
    def sam_input(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(SAM_PIXEL_MEAN, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        std = torch.tensor(SAM_PIXEL_STD, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        return (image * 255.0 - mean) / std

    def encode_image(self, x: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """SAM's ImageEncoderViT forward, block by block, with an injector after each block.
        x: SAM-normalised (B, 3, S, S); prior: (B, 1, gh, gw) or None (no injection)."""
        enc = self.sam.image_encoder
        t = enc.patch_embed(x)
        if enc.pos_embed is not None:
            t = t + enc.pos_embed
        p = None
        if self.injectors is not None and prior is not None:
            p = F.interpolate(prior, size=t.shape[1:3], mode="bilinear", align_corners=False)
        for i, blk in enumerate(enc.blocks):
            t = blk(t)
            if p is not None:
                t = self.injectors[i](t, p)
        return enc.neck(t.permute(0, 3, 1, 2))

    def user_prompts(self, points=None, point_labels=None, boxes=None, n: int = 1):
        """SAM's own sparse tokens for refinement points (N, 2) in working-image pixels (x, y) with labels 1/0,
        and/or a box (4,) x0, y0, x1, y1. Returns (n, T, C) or None."""
        if points is None and boxes is None:
            return None
        dev = self.clip_mean.device
        pts = None
        if points is not None:
            coords = torch.as_tensor(points, dtype=torch.float32, device=dev).reshape(1, -1, 2)
            labels = torch.as_tensor(point_labels, dtype=torch.int64, device=dev).reshape(1, -1)
            pts = (coords, labels)
        box = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32, device=dev).reshape(1, 4)
        sparse, _ = self.sam.prompt_encoder(points=pts, boxes=box, masks=None)
        return sparse.expand(n, -1, -1)

    def decode(self, emb: torch.Tensor, prior: torch.Tensor, cls: torch.Tensor, extra_sparse=None):
        """emb (1 or K, C, g, g); prior (K, 1, gh, gw); cls (K,) -> logits (K, 1, 4g, 4g), iou (K, 1).
        With one image embedding, SAM's decoder takes all K prompts in one call; with K embeddings it is
        called per embedding (its batching repeats each image for every prompt)."""
        p = F.interpolate(prior, size=emb.shape[-2:], mode="bilinear", align_corners=False)
        sparse, dense = self.prompt_generator(emb.expand(prior.shape[0], -1, -1, -1), p, cls)
        if extra_sparse is not None:
            sparse = torch.cat([sparse, extra_sparse.to(sparse.dtype)], dim=1)
        pe = self.sam.prompt_encoder.get_dense_pe()
        if emb.shape[0] == 1:
            return self.sam.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                         dense_prompt_embeddings=dense, multimask_output=False)
        outs = [self.sam.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=pe, sparse_prompt_embeddings=sparse[i:i + 1],
                                      dense_prompt_embeddings=dense[i:i + 1], multimask_output=False)
                for i in range(emb.shape[0])]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    # ---- forward passes ------------------------------------------------------------------------
    def forward_train(self, image: torch.Tensor, cls: torch.Tensor, text_emb: torch.Tensor | None = None) -> torch.Tensor:
        """One lesion per sample (the paper's training): image (B, 3, S, S), cls (B,) -> logits (B, 1, S, S)."""
        if text_emb is None:
            text_emb = self.lesion_text_embeddings()
        prior = self.explicit_prior(self.clip_patch_embeddings(image), text_emb[cls].unsqueeze(1))   # (B, 1, gh, gw)
        emb = self.encode_image(self.sam_input(image), prior)
        logits = []
        for i in range(image.shape[0]):   # one image x one prompt per decoder call
            lg, _ = self.decode(emb[i:i + 1], prior[i:i + 1], cls[i:i + 1])
            logits.append(lg)
        return F.interpolate(torch.cat(logits), size=image.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor, lesions: Sequence[int] | None = None, texts: Sequence[str] | None = None,
                mode: str = "faithful", points=None, point_labels=None, boxes=None, cls: torch.Tensor | None = None):
        """Inference on ONE image (1, 3, S, S). Prompts: lesion indices (their configured texts) and/or free
        texts (each uses the prompt-generator class of the most similar lesion description).
        Returns logits (K, S, S), prior (K, gh, gw), the class used per prompt and the texts used.

        With ``cls`` (B,) it is :meth:`forward_train` on a batch instead (what MONAI engines call, so a
        DistributedDataParallel wrapper sees the forward)."""
        if cls is not None:
            cls = cls.reshape(-1).to(image.device)
            if self.needs_tiles(image):
                return self._tiled_train(image, cls)
            return self.forward_train(image, cls)
        if self.needs_tiles(image):
            return self._tiled(image, lesions=lesions, texts=texts, mode=mode, points=points,
                               point_labels=point_labels, boxes=boxes)
        if image.shape[0] != 1:
            raise ValueError("TPDRSeg.forward takes one image; use forward_train for batches")
        if mode not in ("faithful", "fast"):
            raise ValueError(f"mode must be 'faithful' or 'fast', not {mode!r}")
        lesions = list(lesions or [])
        texts = list(texts or [])
        if not lesions and not texts:
            raise ValueError("give at least one lesion or text prompt")
        les_emb = self.lesion_text_embeddings()
        embs, classes, used = [], [], []
        for k in lesions:
            embs.append(les_emb[k])
            classes.append(int(k))
            used.append(self.lesion_texts[k])
        if texts:
            free = self.encode_texts([[t] for t in texts])
            nearest = (free @ les_emb.T).argmax(dim=1)
            for t, e, c in zip(texts, free, nearest.tolist()):
                embs.append(e)
                classes.append(int(c))
                used.append([t])
        text = torch.stack(embs)                                   # (K, D)
        cls = torch.as_tensor(classes, device=image.device)
        k = text.shape[0]
        prior = self.explicit_prior(self.clip_patch_embeddings(image), text)[0].unsqueeze(1)   # (K, 1, gh, gw)
        x = self.sam_input(image)
        extra = self.user_prompts(points, point_labels, boxes, n=1)
        if mode == "fast":
            emb = self.encode_image(x, prior.amax(dim=0, keepdim=True))
            logits, iou = self.decode(emb, prior, cls, None if extra is None else extra.expand(k, -1, -1))
        else:
            outs = [self.decode(self.encode_image(x, prior[i:i + 1]), prior[i:i + 1], cls[i:i + 1], extra) for i in range(k)]
            logits, iou = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return {"logits": logits, "prior": prior[:, 0], "classes": classes, "texts": used, "iou": iou[:, 0]}


    # ---- tiles (working image larger than SAM's input) -------------------------------------------
    @property
    def tile(self) -> int:
        return int(self.config.sam.img_size)

    def needs_tiles(self, image: torch.Tensor) -> bool:
        return image.shape[-1] > self.tile or image.shape[-2] > self.tile

    def _tiled_train(self, image: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """forward_train over SAM-sized tiles of a batch; each tile keeps its image's prompted class."""
        def predictor(win, coords):
            b = torch.as_tensor([c[0].start for c in coords], device=cls.device)
            return self.forward_train(win, cls[b])
        return sliding_window_inference(image, self.tile, sw_batch_size=4, predictor=predictor,
                                        overlap=self.config.tile_overlap, mode="gaussian", with_coord=True)

    def _tiled(self, image: torch.Tensor, points=None, point_labels=None, boxes=None, **kwargs) -> dict:
        """:meth:`forward` over SAM-sized tiles of one image: logits and priors (K, S, S) at the working
        size; the predicted IoU averaged over the tiles. Points go to the tiles containing them, the box is
        clipped to each tile and the result is background outside it."""
        t = self.tile
        pts = None if points is None else torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
        lbl = None if point_labels is None else torch.as_tensor(point_labels).reshape(-1)
        box = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32).reshape(4)
        meta: dict = {}
        ious = []

        def predictor(win, coords):
            ys, xs = coords[0][-2], coords[0][-1]
            tp = tl = tb = None
            if pts is not None:
                inside = (pts[:, 0] >= xs.start) & (pts[:, 0] < xs.stop) & (pts[:, 1] >= ys.start) & (pts[:, 1] < ys.stop)
                if bool(inside.any()):
                    tp = (pts[inside] - torch.tensor([xs.start, ys.start])).numpy()
                    tl = lbl[inside].numpy()
            if box is not None:
                x0, y0 = max(float(box[0]), xs.start), max(float(box[1]), ys.start)
                x1, y1 = min(float(box[2]), xs.stop - 1), min(float(box[3]), ys.stop - 1)
                if x1 > x0 and y1 > y0:
                    tb = [x0 - xs.start, y0 - ys.start, x1 - xs.start, y1 - ys.start]
            out = self.forward(win, points=tp, point_labels=tl, boxes=tb, **kwargs)
            meta.update(classes=out["classes"], texts=out["texts"])
            ious.append(out["iou"])
            prior = F.interpolate(out["prior"][None], size=(t, t), mode="bilinear", align_corners=False)[0]
            return torch.cat([out["logits"], prior])[None]

        stitched = sliding_window_inference(image, t, sw_batch_size=1, predictor=predictor,
                                            overlap=self.config.tile_overlap, mode="gaussian", with_coord=True)[0]
        k = stitched.shape[0] // 2
        logits, prior = stitched[:k], stitched[k:]
        if box is not None:
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
            outside = torch.ones_like(logits[0], dtype=torch.bool)
            outside[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = False
            logits = logits.masked_fill(outside, -20.0)
        return {"logits": logits, "prior": prior, "classes": meta["classes"], "texts": meta["texts"],
                "iou": torch.stack(ious).mean(0)}


class TPDRSegInferer(Inferer):
    """MONAI inferer for validation: every lesion's logits (B, N_LESIONS, S, S), one prompted pass per
    lesion (the faithful mode, batched over images)."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        b = inputs.shape[0]
        return torch.cat([network(inputs, cls=torch.full((b,), k, dtype=torch.int64, device=inputs.device))
                          for k in range(N_LESIONS)], dim=1)


def build_tp_drseg(network_config: dict, load_weights: bool = True, image_size: int | None = None) -> TPDRSeg:
    """The model of a profile's ``network`` block. ``image_size`` is the fundus working size: larger than
    SAM's input (``sam.img_size``), the image is processed in tiles; smaller, a SAM without pretrained
    weights takes it whole (a pretrained SAM's input size is fixed: 1024 for the official checkpoints)."""
    cfg = TPDRSegConfig.from_dict(network_config)
    if image_size is not None and int(image_size) < cfg.sam.img_size:
        if cfg.sam.checkpoint and load_weights:
            raise ValueError(f"image_size {image_size} is below the pretrained SAM's input size {cfg.sam.img_size}")
        cfg.sam.img_size = int(image_size)
    if cfg.sam.img_size % cfg.sam.patch_size:
        raise ValueError(f"SAM's input size {cfg.sam.img_size} is not a multiple of its patch size {cfg.sam.patch_size}")
    if not 0.0 <= float(cfg.tile_overlap) < 1.0:
        raise ValueError(f"tile_overlap must be in [0, 1), got {cfg.tile_overlap}")
    return TPDRSeg(cfg, load_weights=load_weights)
