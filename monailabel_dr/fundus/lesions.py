"""Lesion and grade vocabulary shared by every model, label file and viewer output."""

from __future__ import annotations

# Order matters: it is the channel order of every multi-lesion output and the
# label-map value minus one (MA=1, HE=2, EX=3, SE=4).
LESIONS: tuple[str, ...] = ("MA", "HE", "EX", "SE")

LESION_NAMES: dict[str, str] = {
    "MA": "Microaneurysms",
    "HE": "Haemorrhages",
    "EX": "Hard exudates",
    "SE": "Soft exudates",
}

# Label-map values (0 = background) used in every label map written for viewers.
LESION_VALUES: dict[str, int] = {name: i + 1 for i, name in enumerate(LESIONS)}

# RGB colours (0-255) in /info (label_colors) and nrrd segment fields: MA red, HE green, EX yellow, SE blue
# (the project's convention, as in the figures of bench/twlr_sequence_figure.py).
LESION_COLORS: dict[str, tuple[int, int, int]] = {
    "MA": (255, 0, 0),
    "HE": (64, 255, 64),
    "EX": (255, 255, 0),
    "SE": (0, 170, 255),
}

# Where lesion masks overlap in a single-valued label map, the lesion painted last wins:
# EX, then SE, then HE, then MA, so the smaller and rarer lesions stay visible.
PAINT_ORDER: tuple[str, ...] = ("EX", "SE", "HE", "MA")


def label_map_from_masks(masks: dict, shape: tuple[int, int] | None = None):
    """One uint8 label map (0 background, MA=1 HE=2 EX=3 SE=4) from per-lesion bool masks, painted in
    ``PAINT_ORDER``; a lesion missing from ``masks`` is empty (``shape`` needed when ``masks`` is empty)."""
    import numpy as np

    if shape is None:
        shape = next(iter(masks.values())).shape
    lab = np.zeros(shape, dtype=np.uint8)
    for les in PAINT_ORDER:
        if les in masks:
            lab[np.asarray(masks[les], bool)] = LESION_VALUES[les]
    return lab


# International Clinical Diabetic Retinopathy (ICDR) severity scale.
GRADES: tuple[str, ...] = (
    "No DR",
    "Mild NPDR",
    "Moderate NPDR",
    "Severe NPDR",
    "Proliferative DR",
)
REFERABLE_MIN_GRADE = 2  # referable DR = ICDR grade >= 2 (moderate NPDR or worse)


def is_referable(grade: int) -> bool:
    return int(grade) >= REFERABLE_MIN_GRADE
