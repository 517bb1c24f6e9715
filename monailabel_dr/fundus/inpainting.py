"""Inpainting backends for TWLR's severity regression: fill a masked region of a fundus image.

- ``telea`` / ``ns``: OpenCV's fast-marching (Telea 2004) and Navier-Stokes inpainting (no weights);
- ``unet``: a learned inpainter (:mod:`monailabel_dr.networks.inpainter`), given as a torch module;
- ``external``: a TorchScript inpainter from a path (e.g. an exported LaMa), called with the same
  (image, mask) -> image contract as ``unet``.

Every backend returns a copy of the image in which only the masked pixels changed.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np
import torch

BACKENDS = ("ns", "telea", "unet", "external")


def opencv_inpaint(image: np.ndarray, mask: np.ndarray, method: str = "ns", radius: int = 5) -> np.ndarray:
    """(H, W, 3) uint8 RGB, (H, W) bool -> inpainted copy (OpenCV ``cv2.inpaint``)."""
    flag = {"ns": cv2.INPAINT_NS, "telea": cv2.INPAINT_TELEA}[method]
    out = cv2.inpaint(np.ascontiguousarray(image), mask.astype(np.uint8), int(radius), flag)
    keep = ~mask.astype(bool)
    out[keep] = image[keep]
    return out


def network_inpaint(network: torch.nn.Module, image: np.ndarray, mask: np.ndarray, device: str = "cpu") -> np.ndarray:
    """A torch inpainter: input (1, 4, H, W) = RGB in [0, 1] with the hole zeroed, plus the mask; output
    (1, 3, H, W) RGB in [0, 1]; only the masked pixels are taken from it."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255)
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    with torch.no_grad():
        y = network(torch.cat([x * (1 - m), m], dim=1).to(device)).float().cpu().clamp(0, 1)
    filled = (y[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    out = image.copy()
    out[mask.astype(bool)] = filled[mask.astype(bool)]
    return out


def make_inpainter(backend: str, radius: int = 5, network: torch.nn.Module | None = None,
                   device: str = "cpu") -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    if backend in ("ns", "telea"):
        return lambda img, m: opencv_inpaint(img, m, backend, radius)
    if backend in ("unet", "external"):
        if network is None:
            raise ValueError(f"the {backend} inpainting backend needs a network")
        return lambda img, m: network_inpaint(network, img, m, device)
    raise ValueError(f"inpainting backend must be one of {BACKENDS}, not {backend!r}")
