"""CLIP (open_clip) towers shared by the text-guided models: TP-DRSeg's explicit prior and TWLR's grader.

- :func:`build_clip`: an open_clip model by name, with an open_clip pretrained tag (``openai``) or a
  local checkpoint, or a custom from-scratch tower (``custom: {embed_dim, vision_cfg, text_cfg}``);
  no weights at all with ``load_weights=False``.
- :func:`encode_text_groups`: unit text embeddings, several phrases per class averaged.
- :func:`projected_patch_tokens`: the vision tower's patch tokens projected into the joint
  image-text space (open_clip returns them unprojected), for patch-text similarity maps.
- :func:`patch_text_similarity`: cosine similarity maps, optionally min-max normalised per map.

Nothing here knows MONAI Label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for and could not be loaded (offline, missing file)."""


@dataclass
class ClipConfig:
    model_name: str = "ViT-B-16-quickgelu"   # open_clip name; ignored when `custom` is given
    pretrained: str | None = None            # open_clip tag ("openai") or a local file, None = random
    image_size: int = 224
    custom: dict | None = None               # {embed_dim, vision_cfg, text_cfg}: a from-scratch tower


def build_clip(cfg: ClipConfig, load_weights: bool = True):
    """An open_clip CLIP model (eval mode); a custom from-scratch tower when ``cfg.custom`` is set."""
    import open_clip

    if cfg.custom:
        from open_clip.model import CLIP

        c = dict(cfg.custom)
        vision = dict(c.get("vision_cfg", {}))
        vision.setdefault("image_size", cfg.image_size)
        model = CLIP(embed_dim=int(c["embed_dim"]), vision_cfg=vision, text_cfg=dict(c.get("text_cfg", {})))
        if load_weights and cfg.pretrained:
            try:
                open_clip.load_checkpoint(model, cfg.pretrained)
            except Exception as e:
                raise WeightsUnavailable(f"CLIP weights {cfg.pretrained!r} could not be loaded: {e}") from e
        return model.eval()
    kwargs = {"force_image_size": cfg.image_size} if cfg.image_size != 224 else {}
    pretrained = cfg.pretrained if load_weights else None
    try:
        model = open_clip.create_model(cfg.model_name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if pretrained:
            raise WeightsUnavailable(
                f"CLIP weights {pretrained!r} for {cfg.model_name} could not be loaded ({type(e).__name__}: {e}). "
                "A tag such as 'openai' downloads (internet needed); offline, set clip.pretrained to a local "
                "checkpoint file, or to null to build without weights.") from e
        raise
    return model.eval()


def clip_tokenizer():
    """CLIP's BPE tokenizer (vocabulary 49408), the same for every CLIP text tower used here."""
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16")


def clip_pixel_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's (OpenAI) pixel mean and std as (1, 3, 1, 1) tensors, for [0, 1] RGB input."""
    import open_clip

    return (torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1),
            torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1))


def encode_text_groups(model, tokenizer, groups: Sequence[Sequence[str]], context_length: int = 77) -> torch.Tensor:
    """(K, D) unit text embeddings, one per group; the phrases of a group are averaged (then renormalised)."""
    flat = [t for g in groups for t in g]
    device = next(model.parameters()).device
    tokens = tokenizer(flat, context_length=context_length).to(device)
    emb = F.normalize(model.encode_text(tokens), dim=-1)
    out, i = [], 0
    for g in groups:
        out.append(F.normalize(emb[i:i + len(g)].mean(0), dim=-1))
        i += len(g)
    return torch.stack(out)


def project_tokens(visual, tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens (B, N, width) after the last block -> (B, N, D) in the joint space: the tower's own
    ``ln_post`` and ``proj``, as its pooled output gets them."""
    tokens = visual.ln_post(tokens)
    return tokens @ visual.proj if visual.proj is not None else tokens


def projected_patch_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw, D) patch tokens of the CLIP-normalised image ``x`` (at the tower's input size)."""
    v = model.visual
    h = v.transformer(v._embeds(x))
    gh, gw = v.grid_size
    return project_tokens(v, h[:, -gh * gw:]).reshape(x.shape[0], gh, gw, -1)


def patch_text_similarity(patches: torch.Tensor, text: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """patches (B, gh, gw, D); text (B, K, D) or (K, D) -> cosine similarity (B, K, gh, gw), min-max
    normalised to [0, 1] per map when ``normalise``."""
    if text.dim() == 2:
        text = text.unsqueeze(0).expand(patches.shape[0], -1, -1)
    sim = torch.einsum("bhwd,bkd->bkhw", F.normalize(patches, dim=-1), F.normalize(text, dim=-1))
    if not normalise:
        return sim
    lo = sim.amin(dim=(-2, -1), keepdim=True)
    hi = sim.amax(dim=(-2, -1), keepdim=True)
    return (sim - lo) / (hi - lo).clamp_min(1e-6)


class CachedClassTexts(nn.Module):
    """Mixin for a model with ``self.clip``, ``self._tokenizer`` and ``self.context_length``: the class text
    embeddings of ``text_groups()``, recomputed while training (the text tower may learn) and cached at
    inference (eval mode, no grad); the cache is dropped on ``train()`` / ``load_state_dict()``."""

    _text_cache: torch.Tensor | None = None

    def text_groups(self) -> list[list[str]]:
        raise NotImplementedError

    def class_text_embeddings(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return encode_text_groups(self.clip, self._tokenizer, self.text_groups(), self.context_length)
        dev = next(self.clip.parameters()).device
        if self._text_cache is None or self._text_cache.device != dev:
            self._text_cache = encode_text_groups(self.clip, self._tokenizer, self.text_groups(), self.context_length)
        return self._text_cache

    def train(self, mode: bool = True):
        self._text_cache = None
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._text_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
