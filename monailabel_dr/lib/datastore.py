"""Local datastore for fundus photographs: MONAI Label's LocalDatastore plus validation.

Everything is checked *before* a file is copied or the datastore JSON changes:
ids (no path traversal), file types, decodability, image size limits, a field
of view, and label content (grade JSON schema; label maps of the image's size
with values 0-4).  Problems raise 4xx errors from :mod:`.errors`.

Final labels of different kinds live side by side in ``labels/final``:
``ID.grade.json`` (grade / lesion presence) and ``ID.png|.nrrd|.nii.gz`` (lesion
label map).  MONAI Label's model keeps one label per tag, pointing at the last one
saved; :meth:`final_label_files` finds every kind on disk, so saving a lesion map
never hides an image's grade from the grading trainer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from monailabel_dr.fundus import geometry, io
from monailabel_dr.fundus.labels import GRADE_LABEL_SUFFIX, LabelFormatError, parse_grade_label
from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.lib import slicer
from monailabel_dr.lib.errors import BadInput, Conflict, InvalidId, NotFound, UnsupportedType, check_id, check_tag

logger = logging.getLogger(__name__)

IMAGE_PATTERNS = [f"*{e}" for e in io.IMAGE_EXTENSIONS] + [f"*{e.upper()}" for e in io.IMAGE_EXTENSIONS]
LABEL_MAP_EXTENSIONS = io.LABEL_EXTENSIONS  # .png, .nrrd, .nii.gz
# Patterns MONAI Label lists images and labels by (``*.grade.json`` for grade labels; never
# ``*.json``, which would register ``datastore_v2.json`` itself as an image).
DATASTORE_PATTERNS = IMAGE_PATTERNS + ["*.nrrd", f"*{GRADE_LABEL_SUFFIX}"]


class FundusDatastore(LocalDatastore):
    def __init__(self, path: str, max_pixels: int = io.DEFAULT_MAX_PIXELS, min_side: int = io.DEFAULT_MIN_SIDE,
                 auto_reload: bool = False, read_only: bool = False):
        self.max_pixels = int(max_pixels)
        self.min_side = int(min_side)
        self._saved: dict[str, tuple[str, str]] = {}   # image id -> (tag, kind) of its last saved label
        self._saved_lock = threading.Lock()
        # Requests run in worker threads (lib/offload.py): every read and write of the in-memory index and of
        # datastore_v2.json holds this lock (MONAI Label's FileLock serialises processes, but its readers take
        # no lock and its JSON is rewritten in place, so a listing or a training subprocess could see a dict
        # changing size or a half-written file).
        self._mutex = getattr(self, "_mutex", None) or threading.RLock()
        super().__init__(path, extensions=DATASTORE_PATTERNS, auto_reload=auto_reload, read_only=read_only)

    # ----------------------------------------------------------------- images
    def validate_image_file(self, filename: str) -> np.ndarray:
        """Decode and check an image file; returns the decoded array (display orientation)."""
        ext = io.file_extension(filename)
        if ext not in io.IMAGE_EXTENSIONS:
            raise UnsupportedType(
                f"unsupported image type '{ext or os.path.basename(filename)}'; accepted: {', '.join(io.IMAGE_EXTENSIONS)}"
            )
        try:
            img = io.read_image(filename, max_pixels=self.max_pixels, min_side=self.min_side)
            geometry.detect_fov(io.to_rgb_float(img))
        except io.FundusIOError as e:
            raise BadInput(str(e)) from e
        return img

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:
            check_id(image_id, "image")
        else:
            image_id, _ = self._to_id(os.path.basename(image_filename))
            check_id(image_id, "image")
        if image_id in self._datastore.objects:
            raise Conflict(f"image '{image_id}' already exists; delete it first or upload under another id")
        img = self.validate_image_file(image_filename)
        info = dict(image_info or {})
        info.update({"height": int(img.shape[0]), "width": int(img.shape[1]),
                     "channels": 1 if img.ndim == 2 else int(img.shape[2])})
        return super().add_image(image_id, image_filename, info)

    def get_image_uri(self, image_id: str) -> str:
        from monailabel_dr.lib.errors import is_valid_id

        if not is_valid_id(str(image_id)):
            return ""
        return super().get_image_uri(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        try:
            check_id(str(label_id), "label")
            check_tag(str(label_tag))
        except InvalidId:
            return ""
        return super().get_label_uri(label_id, label_tag)

    # Requests on ids that are not in the datastore: 400 for ids with a path in them, 404 for unknown
    # ones (MONAI Label's LocalDatastore raises exceptions the server turns into HTTP 500).
    def _known_image(self, image_id: str) -> str:
        check_id(image_id, "image")
        if image_id not in self._datastore.objects:
            raise NotFound(f"image '{image_id}' is not in the datastore")
        return image_id

    def _known_label(self, label_id: str, label_tag: str) -> str:
        check_id(label_id, "label")
        check_tag(label_tag)
        if self._datastore.label(label_id, label_tag) is None:
            raise NotFound(f"no '{label_tag}' label for '{label_id}' in the datastore")
        return label_id

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        return super().update_image_info(self._known_image(image_id), info)

    def remove_image(self, image_id: str) -> None:
        return super().remove_image(self._known_image(image_id))

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        return super().update_label_info(self._known_label(label_id, label_tag), label_tag, info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        return super().remove_label(self._known_label(label_id, label_tag), label_tag)

    def image_size(self, image_id: str) -> tuple[int, int]:
        info = self.get_image_info(image_id)
        if "height" in info and "width" in info:
            return int(info["height"]), int(info["width"])
        img = io.read_image(self.get_image_uri(image_id), max_pixels=self.max_pixels, min_side=1)
        return int(img.shape[0]), int(img.shape[1])

    # ----------------------------------------------------------------- labels
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_id(image_id, "image")
        check_tag(label_tag)
        if image_id not in self._datastore.objects:
            raise NotFound(f"image '{image_id}' is not in the datastore")
        ext = io.file_extension(label_filename)
        tmpdir = tempfile.mkdtemp(prefix="mldr_label_")
        try:
            if ext in (".json", GRADE_LABEL_SUFFIX) or label_filename.lower().endswith(GRADE_LABEL_SUFFIX):
                try:
                    with open(label_filename, encoding="utf-8") as f:
                        label = parse_grade_label(json.load(f))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise BadInput(f"grade label is not valid JSON: {e}") from e
                except LabelFormatError as e:
                    raise BadInput(str(e)) from e
                clean = os.path.join(tmpdir, image_id + GRADE_LABEL_SUFFIX)
                with open(clean, "w", encoding="utf-8") as f:
                    json.dump(label.to_json(), f, indent=1)
                info = dict(label_info or {})
                info["kind"] = "grade"
                info["grade"] = label.grade
                return self._saved_as(self._store_label(image_id, clean, label_tag, info, "grade"), image_id, label_tag, "grade")
            if ext not in LABEL_MAP_EXTENSIONS:
                raise UnsupportedType(
                    f"unsupported label type '{ext}'; accepted: a grade label (.json) or a label map "
                    f"({', '.join(LABEL_MAP_EXTENSIONS)}); jpg is refused because it is lossy"
                )
            h, w = self.image_size(image_id)
            try:
                # shape=: a Slicer segmentation cropped to its extent is placed back on the image grid
                lab = io.read_label(label_filename, shape=(h, w))
            except (io.FundusIOError, ValueError, OSError) as e:
                raise BadInput(f"label map cannot be read: {e}") from e
            if lab.shape != (h, w):
                raise BadInput(f"label map is {lab.shape[1]}x{lab.shape[0]} but image '{image_id}' is {w}x{h} (width x height)")
            # 3D Slicer numbers exported segments by position: translate by segment name (lib/slicer.py)
            values = io.label_values(lab)
            named = slicer.lesion_value_map(label_filename, ext, label_info, present={int(v) for v in values if v != 0})
            if named is not None:
                lab = slicer.to_lesion_values(lab, *named, values=values)
                values = io.label_values(lab)
            if values.min() < 0 or values.max() > len(LESIONS):
                raise BadInput(
                    f"label map values must be 0 (background) or 1-{len(LESIONS)} "
                    f"({', '.join(f'{i + 1}={n}' for i, n in enumerate(LESIONS))}); found {values.tolist()[:10]}"
                )
            # Store the normalised map (display orientation, identity geometry), not the raw upload.
            clean = io.write_label(os.path.join(tmpdir, image_id + ext), lab.astype(np.uint8))
            info = dict(label_info or {})
            info["kind"] = "lesion_map"
            return self._saved_as(self._store_label(image_id, clean, label_tag, info, "lesion_map"), image_id, label_tag, "lesion_map")
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _store_label(self, image_id: str, clean: str, tag: str, info: dict[str, Any], kind: str) -> str:
        """Put a validated label file in place and index it (what LocalDatastore.save_label does, but the file
        is replaced atomically, and a lesion map saved with another extension than the image's previous one
        removes the previous one, so the last write wins whatever the client's format)."""
        with self._mutex, FileLock(self._lock_file):
            obj = self._datastore.objects.get(image_id)
            if obj is None:   # removed by another request meanwhile
                raise NotFound(f"image '{image_id}' is not in the datastore")
            folder = self._datastore.label_path(tag)
            os.makedirs(folder, exist_ok=True)
            _, ext = self._to_id(os.path.basename(clean))
            name = self._filename(image_id, ext)
            tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}.{threading.get_ident()}")
            shutil.copyfile(clean, tmp)
            os.replace(tmp, os.path.join(folder, name))
            if kind == "lesion_map":
                for other in LABEL_MAP_EXTENSIONS:
                    if other != ext and os.path.isfile(os.path.join(folder, image_id + other)):
                        os.remove(os.path.join(folder, image_id + other))
            info = dict(info)
            info.update({"ts": int(time.time()), "name": name})
            obj.labels[tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        logger.info(f"label saved: {image_id} ({tag}, {kind}) -> {name}")
        return image_id

    def _update_datastore_file(self, lock=True):
        """datastore_v2.json written to a temporary file and renamed over the old one: never half-written."""
        def write():
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            tmp = f"{self._datastore_config_path}.tmp{os.getpid()}.{threading.get_ident()}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self._datastore_config_path)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        with self._mutex:
            if lock:
                with FileLock(self._lock_file):
                    write()
            else:
                write()

    def _saved_as(self, label_id: str, image_id: str, tag: str, kind: str) -> str:
        with self._saved_lock:
            self._saved[image_id] = (tag, kind)
        return label_id

    def last_saved(self, image_id: str) -> tuple[str, str] | None:
        """(tag, kind) of the label last saved for ``image_id`` through this datastore, if any: MONAI Label's
        ``on_save_label(image_id, label_id)`` callback is told neither (the retrain-on-correction counter needs both)."""
        with self._saved_lock:
            return self._saved.get(image_id)

    def final_label_files(self, image_id: str, tag: str = DefaultLabelTag.FINAL) -> dict[str, str]:
        """Every kind of label of an image present on disk: {"grade": path, "lesion_map": path}."""
        folder = self._datastore.label_path(tag)
        found: dict[str, str] = {}
        p = os.path.join(folder, image_id + GRADE_LABEL_SUFFIX)
        if os.path.isfile(p):
            found["grade"] = os.path.realpath(p)
        for ext in LABEL_MAP_EXTENSIONS:
            p = os.path.join(folder, image_id + ext)
            if os.path.isfile(p):
                found["lesion_map"] = os.path.realpath(p)
                break
        return found


def _serialised(method):
    import functools

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._mutex:
            return method(self, *args, **kwargs)

    return locked


# Every method that reads or changes the in-memory index runs under the datastore's lock (see __init__).
for _name in ("add_image", "remove_image", "remove_label", "update_image_info", "update_label_info", "refresh",
              "datalist", "json", "status", "get_labeled_images", "get_unlabeled_images", "list_images",
              "get_image_info", "get_label_info", "get_labels_by_image_id", "get_label_by_image_id",
              "_init_from_datastore_file", "_reconcile_datastore"):
    setattr(FundusDatastore, _name, _serialised(getattr(FundusDatastore, _name)))
