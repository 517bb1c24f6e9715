"""The IDRiD segmentation folder layout: listing, masks and a deterministic split.

Layout (as in ``/work/shared/data/idrid_train``)::

    folder/images/<ID>.jpg                  (also .jpeg, .png, .tif, .tiff)
    folder/masks/<LES>/<ID>_<LES>.png       (also .tif, .tiff: the original IDRiD files)

with ``<LES>`` one of :data:`~monailabel_dr.fundus.lesions.LESIONS` (the optic disc
folder ``OD`` is ignored here). A missing mask file means the lesion is absent from
the image, i.e. an all-False mask (IDRiD has no HE mask for IDRiD_43 and SE masks
for only 26 of the 54 training images).

Nothing here knows about MONAI Label or torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from .io import file_extension, read_image, read_label
from .lesions import LESIONS

__all__ = [
    "IDRID_IMAGE_EXTENSIONS",
    "IDRID_MASK_EXTENSIONS",
    "idrid_image_path",
    "idrid_mask_path",
    "idrid_masks",
    "idrid_split",
    "list_idrid",
]

PathLike = str | os.PathLike[str]

# Order = preference when one id exists with several extensions.
IDRID_IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
IDRID_MASK_EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff")

_TRAILING_NUMBER = re.compile(r"(\d+)$")


def _images_dir(folder: PathLike) -> Path:
    return Path(os.fspath(folder)) / "images"


def list_idrid(folder: PathLike) -> list[str]:
    """Sorted image ids (file names without extension) of ``folder/images/*.jpg|jpeg|png|tif|tiff``.

    An id present with several extensions is listed once. Raises ``FileNotFoundError``
    when ``folder/images`` does not exist.
    """
    images = _images_dir(folder)
    if not images.is_dir():
        raise FileNotFoundError(f"no 'images' folder in {folder}")
    ids = {
        p.name[: -len(file_extension(p))]
        for p in images.iterdir()
        if p.is_file() and file_extension(p) in IDRID_IMAGE_EXTENSIONS
    }
    return sorted(ids)


def idrid_image_path(folder: PathLike, image_id: str) -> str:
    """Path of the image ``image_id`` (first existing of .jpg, .jpeg, .png, .tif, .tiff; any case)."""
    images = _images_dir(folder)
    for ext in IDRID_IMAGE_EXTENSIONS:
        for cand in (ext, ext.upper()):
            p = images / f"{image_id}{cand}"
            if p.is_file():
                return str(p)
    raise FileNotFoundError(f"no image '{image_id}' ({', '.join(IDRID_IMAGE_EXTENSIONS)}) in {images}")


def idrid_mask_path(folder: PathLike, image_id: str, lesion: str) -> str | None:
    """Path of ``masks/<lesion>/<image_id>_<lesion>.png|tif|tiff``, or None when there is none."""
    d = Path(os.fspath(folder)) / "masks" / lesion
    for ext in IDRID_MASK_EXTENSIONS:
        for cand in (ext, ext.upper()):
            p = d / f"{image_id}_{lesion}{cand}"
            if p.is_file():
                return str(p)
    return None


def _read_mask(path: str) -> np.ndarray:
    """Boolean (H, W) mask: any non-zero value is lesion.

    PNG goes through :func:`read_label` (grey / palette; 0/255 in the converted set);
    TIFF through :func:`read_image` (the original IDRiD masks: 1-bit, or RGB with the
    lesion in one channel -- any non-zero channel counts).
    """
    if file_extension(path) == ".png":
        arr = read_label(path)
    else:
        arr = read_image(path, min_side=None)
        if arr.ndim == 3:
            return np.any(arr != 0, axis=2)
    return np.asarray(arr) != 0


def _image_shape(folder: PathLike, image_id: str) -> tuple[int, int]:
    """(H, W) of the photograph from its header only (no pixel is decoded)."""
    with Image.open(idrid_image_path(folder, image_id)) as im:
        width, height = im.size
    return height, width


def idrid_masks(
    folder: PathLike,
    image_id: str,
    shape: tuple[int, int] | None = None,
    lesions: Iterable[str] = LESIONS,
) -> dict[str, np.ndarray]:
    """Boolean (H, W) mask per lesion of ``image_id`` (keys in ``lesions`` order).

    A missing mask file gives an all-False mask. ``shape`` (H, W), when given, is the
    expected shape: a mask of another shape raises ``ValueError``. Without ``shape`` the
    masks found must agree with each other; when none is found the shape is taken from
    the photograph's header.
    """
    lesions = tuple(lesions)
    found: dict[str, np.ndarray] = {}
    for les in lesions:
        path = idrid_mask_path(folder, image_id, les)
        if path is None:
            continue
        mask = _read_mask(path)
        want = tuple(shape) if shape is not None else next((m.shape for m in found.values()), None)
        if want is not None and mask.shape != want:
            raise ValueError(
                f"mask {Path(path).name} is {mask.shape[1]}x{mask.shape[0]} (WxH), "
                f"expected {want[1]}x{want[0]}"
            )
        found[les] = mask
    if shape is not None:
        full = (int(shape[0]), int(shape[1]))
    elif found:
        full = next(iter(found.values())).shape
    else:
        full = _image_shape(folder, image_id)
    return {les: found[les] if les in found else np.zeros(full, dtype=bool) for les in lesions}


def idrid_split(ids: Iterable[str], val_every: int = 5) -> tuple[list[str], list[str]]:
    """Deterministic train / validation split by the id's trailing number.

    An id whose trailing number ``n`` (``IDRiD_05`` -> 5) has ``n % val_every == 0``
    goes to validation, every other id (including ids without a trailing number) to
    training. On the 54 IDRiD training images with ``val_every=5`` this puts IDRiD_05,
    _10, ..., _50 (10 images) in validation and 44 in training. Input order is kept
    in both lists; no randomness, so the split never depends on a seed or on the
    listing order.
    """
    if int(val_every) < 1:
        raise ValueError(f"val_every must be >= 1, got {val_every}")
    train: list[str] = []
    val: list[str] = []
    for image_id in ids:
        m = _TRAILING_NUMBER.search(str(image_id))
        (val if m is not None and int(m.group(1)) % int(val_every) == 0 else train).append(image_id)
    return train, val
