"""Import existing annotations into a datastore: a grades CSV and the IDRiD lesion layout.

Both go through :class:`FundusDatastore` (``add_image`` / ``save_label``), so an
import is validated exactly like a REST upload and the datastore JSON stays in sync.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile

import numpy as np

from monailabel_dr.fundus import io
from monailabel_dr.fundus.labels import GRADE_LABEL_SUFFIX, GradeLabel, write_grade_label
from monailabel_dr.fundus.lesions import LESIONS, label_map_from_masks

logger = logging.getLogger(__name__)

_IMAGE_COLUMNS = ("image", "image name", "image_id", "id", "filename", "file")
_GRADE_COLUMNS = ("grade", "retinopathy grade", "dr_grade", "level", "icdr")


def _strip_ext(name: str) -> str:
    base = os.path.basename(name.strip())
    ext = io.file_extension(base)
    return base[: -len(ext)] if ext in io.IMAGE_EXTENSIONS else base


def read_grades_csv(path: str) -> dict[str, int]:
    """CSV with an image column and a grade column (header names as in IDRiD/Kaggle accepted).

    A file without a header is read as ``image,grade`` rows.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    header = [c.strip().lower() for c in rows[0]]
    img_col = next((header.index(c) for c in _IMAGE_COLUMNS if c in header), None)
    grade_col = next((header.index(c) for c in _GRADE_COLUMNS if c in header), None)
    if img_col is None or grade_col is None:
        if header[1:2] and header[1].strip().isdigit():
            img_col, grade_col, data = 0, 1, rows
        else:
            raise ValueError(f"{path}: need columns image,grade (found header {rows[0]})")
    else:
        data = rows[1:]
    grades: dict[str, int] = {}
    for n, r in enumerate(data, start=2):
        try:
            g = int(str(r[grade_col]).strip())
        except (ValueError, IndexError) as e:
            raise ValueError(f"{path}, row {n}: grade {r[grade_col:grade_col + 1]} is not an integer 0-4") from e
        if not 0 <= g <= 4:
            raise ValueError(f"{path}, row {n}: grade {g} outside 0-4")
        grades[_strip_ext(r[img_col])] = g
    return grades


def import_grades(datastore, csv_path: str, images_dir: str | None = None) -> dict:
    """Save a final grade label for every CSV row whose image is in the datastore.

    With ``images_dir``, images not yet in the datastore are added from there first.
    Lesion flags already saved in an image's grade label are kept.
    """
    from monailabel_dr.fundus.labels import read_grade_label

    grades = read_grades_csv(csv_path)
    done, missing = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        for image_id, grade in sorted(grades.items()):
            if not datastore.get_image_uri(image_id) and images_dir:
                src = _find_image(images_dir, image_id)
                if src:
                    datastore.add_image(image_id, src, {"source": os.path.realpath(src)})
            if not datastore.get_image_uri(image_id):
                missing.append(image_id)
                continue
            lesions = {}
            existing = datastore.final_label_files(image_id).get("grade")
            if existing:
                lesions = read_grade_label(existing).lesions
            p = write_grade_label(os.path.join(tmp, image_id + GRADE_LABEL_SUFFIX),
                                  GradeLabel(grade=grade, lesions=lesions, extra={"source": os.path.basename(csv_path)}))
            datastore.save_label(image_id, p, "final", {"source": "import grades"})
            done += 1
    if missing:
        logger.warning(f"{len(missing)} CSV rows name images not in the datastore, e.g. {missing[:5]}")
    return {"grades_imported": done, "missing_images": missing}


def _find_image(folder: str, image_id: str) -> str | None:
    for ext in io.IMAGE_EXTENSIONS:
        for e in (ext, ext.upper()):
            p = os.path.join(folder, image_id + e)
            if os.path.isfile(p):
                return p
    return None


def idrid_masks(root: str, image_id: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per-lesion bool masks of the IDRiD layout ``masks/<LES>/<ID>_<LES>.png`` (missing file = empty)."""
    out = {}
    for les in LESIONS:
        p = os.path.join(root, "masks", les, f"{image_id}_{les}.png")
        if os.path.isfile(p):
            m = io.read_label(p) > 0
            if m.shape != shape:
                raise ValueError(f"{p}: mask is {m.shape[::-1]} but the image is {shape[::-1]}")
            out[les] = m
        else:
            out[les] = np.zeros(shape, dtype=bool)
    return out


def import_idrid(datastore, root: str, limit: int | None = None) -> dict:
    """Add IDRiD images and their lesion masks (as one final label map, MA=1 HE=2 EX=3 SE=4).

    Lesion presence (including lesions hidden under another in the label map) is also saved
    in the label info, so the grader's lesion head sees the exact image-level labels.
    """
    img_dir = os.path.join(root, "images")
    if not os.path.isdir(img_dir):
        raise ValueError(f"{root}: no images/ folder (expected the IDRiD layout images/NAME.jpg, masks/<LES>/NAME_<LES>.png)")
    names = sorted(n for n in os.listdir(img_dir) if io.file_extension(n) in io.IMAGE_EXTENSIONS)
    if limit:
        names = names[:limit]
    added = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            image_id = _strip_ext(name)
            src = os.path.join(img_dir, name)
            if not datastore.get_image_uri(image_id):
                datastore.add_image(image_id, src, {"source": "IDRiD"})
            h, w = datastore.image_size(image_id)
            masks = idrid_masks(root, image_id, (h, w))
            p = io.write_label(os.path.join(tmp, image_id + ".png"), label_map_from_masks(masks))
            presence = {les: bool(m.any()) for les, m in masks.items()}
            datastore.save_label(image_id, p, "final", {"source": "IDRiD import", "lesion_presence": presence})
            added += 1
    return {"idrid_images": added}


def import_lesion_presence(datastore, answers_dir: str, threshold: float | None = None) -> dict:
    """Lesion-presence flags from ``/infer/lesion_seg`` answers (``<id>_lesion_seg.json``, as ``monailabel-dr
    infer lesion_seg --all --output DIR`` writes them) into the images' grade labels, keeping their grades.

    These are a model's predictions, not annotations: the label records ``lesions_source`` (the answers'
    model and checkpoint) so they are never mistaken for a grader's flags. A lesion is present when the
    answer found a component of it (``presence_probability >= threshold`` instead, with ``threshold``).
    Used to give TWLR's vision-language grader lesion targets on photographs that carry grades only.
    """
    import json

    from monailabel_dr.fundus.labels import read_grade_label

    done, missing = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        for image_id in sorted(datastore.list_images()):
            existing = datastore.final_label_files(image_id).get("grade")
            p = os.path.join(answers_dir, f"{image_id}_lesion_seg.json")
            if not existing:
                continue
            if not os.path.isfile(p):
                missing.append(image_id)
                continue
            with open(p) as f:
                answer = json.load(f)
            lesions = {}
            for les in LESIONS:
                st = answer["lesions"][les]
                lesions[les] = bool(st["present"]) if threshold is None else st["presence_probability"] >= threshold
            g = read_grade_label(existing)
            extra = dict(g.extra or {})
            extra["lesions_source"] = {"kind": "lesion_seg predictions", "model": answer.get("model"),
                                       "rule": "a component found" if threshold is None else f"presence >= {threshold}"}
            out = write_grade_label(os.path.join(tmp, image_id + GRADE_LABEL_SUFFIX),
                                    GradeLabel(grade=g.grade, lesions=lesions, extra=extra))
            datastore.save_label(image_id, out, "final", {"source": "import lesion presence (lesion_seg predictions)"})
            done += 1
    if missing:
        logger.warning(f"{len(missing)} graded images have no lesion_seg answer in {answers_dir}, e.g. {missing[:5]}")
    return {"lesion_presence_imported": done, "missing_answers": missing}
