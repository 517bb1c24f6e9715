"""What 3D Slicer's MONAI Label module needs from the app, and what it sends back.

The module (MONAILabel 0.8.5, ``plugins/slicer/MONAILabel``) works like this:

- it lists the models of ``/info/`` whose ``type`` is segmentation, detection, deepgrow,
  deepedit or scribbles, and reads each model's ``labels`` ({name: value}); it creates one
  empty segment per name of the app-level ``labels`` list when it opens an image;
- ``/infer/{model}?image=ID`` with ``result_extension=.nrrd``: the label map is read with
  SimpleITK and label value *k* becomes the *k*-th name of the model's labels sorted by
  value, so a model's values must be 1..N without gaps;
- "Submit Label" exports the non-background segments to a label map **by position**
  (the *k*-th exported segment gets value *k*, whatever its name) on the photograph's
  grid, saves it as ``.nii.gz`` (the module's default) or ``.nrrd`` / ``.seg.nrrd``, and
  sends ``label_info`` = ``[{"name": segment name, "idx": ...}, ...]`` in that order.

So the app's segment list (:func:`segment_labels`) is the lesion vocabulary in value
order, and a saved label map is translated to lesion values by segment name
(:func:`lesion_value_map`): from the file's own Slicer segment fields when it has them,
else from ``label_info``. Slicer colours segments from its own anatomy colour table by
name (MA/HE/EX/SE are not in it); ``label_colors`` in ``/info`` and the ``Segment*_Color``
fields of the app's ``.nrrd`` outputs carry the app's colours for other clients and for
loading the file as a segmentation.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from monailabel_dr.fundus.io import label_values
from monailabel_dr.fundus.lesions import LESION_COLORS, LESION_NAMES, LESION_VALUES, LESIONS
from monailabel_dr.lib.errors import BadInput

# Model types 3D Slicer's MONAI Label module shows (plugins/slicer/MONAILabel/MONAILabel.py).
SLICER_MODEL_TYPES = ("segmentation", "detection", "deepgrow", "deepedit", "scribbles")
_BACKGROUND_NAMES = ("background", "")


def lesion_code(name: str) -> str | None:
    """'MA' for 'MA', 'ma', 'Microaneurysms', 'microaneurysm'...; None for other names."""
    key = str(name).strip().lower()
    for code in LESIONS:
        full = LESION_NAMES[code].lower()
        if key in (code.lower(), full, full.rstrip("s")):
            return code
    return None


def label_colors(labels: Mapping[str, int] | None) -> dict[str, list[int]]:
    """RGB (0-255) of the lesion names among a model's labels."""
    out = {}
    for name in labels or {}:
        code = lesion_code(name)
        if code is not None:
            out[str(name)] = list(LESION_COLORS[code])
    return out


def segment_labels(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The app-level ``labels`` of ``/info``: the segments Slicer creates for an image.

    The lesion vocabulary in label-value order when a lesion segmentation model is served
    (Slicer's export then gives MA=1, HE=2, EX=3, SE=4), else the labels of the
    segmentation models in value order (e.g. the CAM levels of a grading-only server).
    Classification labels (grades) are never segments.
    """
    seg = [m for m in models.values() if m.get("type") in SLICER_MODEL_TYPES and isinstance(m.get("labels"), dict)]
    if any(all(lesion_code(n) for n in m["labels"]) and m["labels"] for m in seg):
        return list(LESIONS)
    merged: list[str] = []
    for m in seg:
        for name, _ in sorted(m["labels"].items(), key=lambda kv: kv[1]):
            if name not in merged and str(name).lower() not in _BACKGROUND_NAMES:
                merged.append(name)
    return merged


def _names_from_label_info(label_info: Any, present: set[int] | None = None) -> tuple[dict[int, str], str] | None:
    """``label_info`` -> ({label value: segment name}, the rule used).

    An entry's ``idx`` is the value of that segment in the label map (what a client says it means is
    taken): ``[{"name": "EX", "idx": 3}]`` names value 3. 3D Slicer sends ``idx`` = the segment's place
    in its whole segment list, 1-based, and exports the k-th *exported* segment as value k, so the two
    agree unless Slicer skipped segments (background or scribbles) before a lesion. Values follow
    ``idx`` when the ``idx`` are distinct positive integers and every value in the map is one of them;
    otherwise, when every value is at most the number of entries, they follow the position (Slicer
    after skipped segments); else None (the values are refused by name later).
    """
    if isinstance(label_info, str):
        try:
            label_info = json.loads(label_info)
        except json.JSONDecodeError:
            return None
    if not isinstance(label_info, list) or not label_info:
        return None
    if not all(isinstance(e, Mapping) and isinstance(e.get("name"), str) for e in label_info):
        return None
    present = set(present or ())
    idx = [e.get("idx") for e in label_info]
    ints = all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in idx) and len(set(idx)) == len(idx)
    if ints and present <= set(idx):
        return {int(i): str(e["name"]) for i, e in zip(idx, label_info)}, "label_info: idx is the segment's value"
    by_position = {k: str(e["name"]) for k, e in enumerate(label_info, start=1)}
    if not present or max(present) <= len(label_info):
        return by_position, "label_info by position (3D Slicer exports the k-th segment as value k)"
    return by_position, "label_info by position"


def _names_from_nrrd(path: str) -> dict[int, str] | None:
    """Segment names of a Slicer segmentation .nrrd (``Segment{k}_Name`` / ``_LabelValue``)."""
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception:
        return None
    names: dict[int, str] = {}
    k = 0
    while f"Segment{k}_Name" in header:
        try:
            value = int(str(header.get(f"Segment{k}_LabelValue", k + 1)).strip())
        except ValueError:
            return None
        names[value] = str(header[f"Segment{k}_Name"])
        k += 1
    return names or None


def lesion_value_map(label_path: str, ext: str, label_info: Mapping[str, Any] | None,
                     present: set[int] | None = None) -> tuple[dict[int, str], str] | None:
    """{value in the file: segment name} and where it came from, or None (values are lesion values already).
    ``present``: the non-zero values in the map (they choose the ``label_info`` rule)."""
    if ext == ".nrrd":
        names = _names_from_nrrd(label_path)
        if names:
            return names, "segment fields of the file"
    return _names_from_label_info((label_info or {}).get("label_info"), present)


def to_lesion_values(label: np.ndarray, names: Mapping[int, str], source: str,
                     values: np.ndarray | None = None) -> np.ndarray:
    """Translate a label map's values to lesion values (MA 1, HE 2, EX 3, SE 4) by segment name.

    Values without a name, or named something that is not a lesion, are refused (422) when
    they occur in the map; unused segments (e.g. empty ones Slicer exports too) are ignored.
    ``values``: the map's distinct values when the caller has them already (``io.label_values``).
    """
    present = [int(v) for v in (label_values(label) if values is None else values) if v != 0]
    lut: dict[int, int] = {}
    bad = []
    for v in present:
        name = names.get(v)
        if name is not None and name.strip().lower() in _BACKGROUND_NAMES:
            lut[v] = 0
            continue
        code = lesion_code(name) if name is not None else None
        if code is None:
            bad.append(f"{v} ({name!r})" if name is not None else f"{v} (no segment)")
        else:
            lut[v] = LESION_VALUES[code]
    if bad:
        raise BadInput(
            f"label map values {', '.join(bad)} are not lesion segments (names from {source}); "
            f"name segments {', '.join(LESIONS)} or {', '.join(LESION_NAMES[c] for c in LESIONS)}"
        )
    out = np.zeros(label.shape, np.uint8)
    for v, target in lut.items():
        out[label == v] = target
    return out
