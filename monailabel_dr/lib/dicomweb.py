"""Fundus photographs in a DICOMweb server (Orthanc, a PACS): ``--studies http://HOST/dicom-web``.

MONAI Label's own ``DICOMWebDatastore`` assumes CT/MR volumes: it converts series to NIfTI
through GDCM and writes labels as DICOM SEG with dcmqi (downloaded from GitHub at start).
This datastore keeps MONAI Label's DICOMweb client and ids but treats every series as one 2-D
photograph:

* images: the series matching the search filter (default ``{"Modality": "OP"}``, conf
  ``dicomweb_filter``), one image instance per series; the image id is the
  SeriesInstanceUID (what OHIF's MONAI Label panel sends). Each is fetched once (WADO-RS),
  decoded with pydicom (RGB, YBR converted, exact pixels) and cached as a PNG in a local
  :class:`FundusDatastore` (same validation: size limits, a field of view). The source
  DICOM is kept next to it; series that are not usable photographs are listed under
  ``skipped`` in ``/datastore`` with the reason.
* final lesion label maps (values 1-4) are stored back in the server as DICOM SEG
  (highdicom) referencing the source photograph, and read back from it: every SEG in the
  server that references a listed image becomes that image's final lesion label (the
  newest one when several exist), so labels drawn elsewhere (OHIF, another MONAI Label
  instance) are trained on too, and a fresh cache rebuilds everything from the server.
* model proposals: with ``output=dicom_seg`` (or ``monailabel-dr preannotate``) an infer answer is
  stored in the server as a SEG with AUTOMATIC segments (:func:`monailabel_dr.dicom.seg.is_proposal`);
  such SEGs are listed per image under ``dicomweb.proposals`` in ``/datastore`` and never become a
  label. A SEG with MANUAL (or SEMIAUTOMATIC) segments is a person's label: OHIF's saved
  segmentations, a correction of a proposal. Segment names beyond MA / HE / EX / SE and their long
  names are mapped by ``--conf seg_segment_names`` (``Bleeding=HE,...``); a SEG that names no lesion is
  listed under ``dicomweb.unusable_segs`` with the reason.
* a person's SEG that arrives after the start counts as a correction for retrain on correction
  (the app's ``label_listener``); those already in the server at the start are the initial labels.
* grade labels (JSON) and ``original`` labels stay in the local cache only.

Nothing is lost when the server is down: a final lesion label is written to the cache first,
its SEG is queued in an outbox on disk, and the upload is retried (with back-off) at once,
then at every refresh and at the next start, until the server takes it; the PUT answers 200
and says ``dicomweb: pending``. Listing, inference and training work from the cache
meanwhile; ``/datastore`` reports ``dicomweb.reachable`` and the pending uploads. Adding an
image needs the server: without it the request fails with HTTP 503 and changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import pydicom
import pydicom.errors
import pydicom.misc
from filelock import FileLock
from monailabel.interfaces.datastore import DefaultLabelTag

from monailabel_dr.dicom import photo as dphoto
from monailabel_dr.dicom import seg as dseg
from monailabel_dr.dicom import web as dweb
from monailabel_dr.fundus import io
from monailabel_dr.lib.datastore import LABEL_MAP_EXTENSIONS, FundusDatastore
from monailabel_dr.lib.errors import BadInput, ClientError, Conflict, InvalidId, UnsupportedType, check_id

logger = logging.getLogger(__name__)


# The DICOMweb client's failures (monailabel_dr/dicom/web.py, which knows nothing of HTTP handlers) as the
# app's HTTP errors: still the client's exception types, so `except DicomWebUnavailable` keeps working.
class DicomWebUnavailable(ClientError, dweb.DicomWebUnavailable):
    def __init__(self, detail: str):
        ClientError.__init__(self, dweb.DicomWebUnavailable.status_code, detail)


class DicomWebError(ClientError, dweb.DicomWebError):
    def __init__(self, detail: str):
        ClientError.__init__(self, dweb.DicomWebError.status_code, detail)


class DicomWeb(dweb.DicomWeb):
    """The datastore's DICOMweb client: MONAI Label's ``DICOMwebClientX`` underneath (Orthanc's multipart
    content types), failures raised as :class:`DicomWebUnavailable` / :class:`DicomWebError` (503 / 502)."""

    def __init__(self, url: str, **kwargs):
        from monailabel.datastore.dicom import DICOMwebClientX

        super().__init__(url, client_class=DICOMwebClientX, **kwargs)

    def call(self, what, fn, *args, retries=None, **kwargs):
        with _as_http():
            return super().call(what, fn, *args, retries=retries, **kwargs)

    def store(self, datasets, retries=None):
        with _as_http():
            return super().store(datasets, retries=retries)


@contextlib.contextmanager
def _as_http():
    try:
        yield
    except ClientError:
        raise
    except dweb.DicomWebUnavailable as e:
        raise DicomWebUnavailable(e.detail) from e
    except dweb.DicomWebError as e:
        raise DicomWebError(e.detail) from e


DEFAULT_FILTER = {"Modality": "OP"}
STATE_FILE = ".dicomweb_state.json"
_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.",)


def default_cache_path(url: str) -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "monailabel-dr", "dicomweb",
                        hashlib.md5(url.encode()).hexdigest()[:16])


class FundusDICOMWebDatastore(FundusDatastore):
    def __init__(self, web: DicomWeb, cache_path: str, search_filter: dict[str, Any] | None = None,
                 refresh_s: float = 10.0, max_pixels: int = io.DEFAULT_MAX_PIXELS, min_side: int = io.DEFAULT_MIN_SIDE,
                 read_only: bool = False, segment_names: dict[str, str] | None = None):
        self._web = web
        self._segment_names = dict(segment_names or {})   # dicom/seg.py parse_segment_names
        # called as label_listener(image_id, tag, kind) for a person's SEG read from the server after the start
        self.label_listener = None
        self._started = False
        self._filter = dict(search_filter or DEFAULT_FILTER)
        self._refresh_s = float(refresh_s)
        self._cache = os.path.realpath(cache_path)
        self._dicom_dir = os.path.join(self._cache, ".dicom")     # source instances: .dicom/<series>/<sop>.dcm
        self._outbox_dir = os.path.join(self._cache, ".outbox")   # SEGs waiting for the server
        self._state_path = os.path.join(self._cache, STATE_FILE)
        for d in (self._cache, self._dicom_dir, self._outbox_dir):
            os.makedirs(d, exist_ok=True)
        # one lock for the remote sync and the local index (lib/datastore.py): a listing that refreshes from the
        # server inside an index read, and a sync that adds images, can never wait for each other
        self._sync_lock = self._mutex = threading.RLock()
        self._file_lock = FileLock(os.path.join(self._cache, ".dicomweb.lock"))
        self._last_refresh = 0.0
        self._reachable: bool | None = None
        self._last_error: str | None = None
        super().__init__(self._cache, max_pixels=max_pixels, min_side=min_side, auto_reload=False, read_only=read_only)
        with self._file_lock:   # series refused earlier are tried again at every start (limits may have changed)
            st = self._load_state()
            st["skipped"] = {}
            self._save_state(st)
        self.refresh_remote(force=True)
        self._started = True

    def name(self) -> str:
        return self._web.url

    # ================================================================== state (JSON on disk)
    def _load_state(self) -> dict:
        try:
            with open(self._state_path, encoding="utf-8") as f:
                st = json.load(f)
        except (OSError, ValueError):
            st = {}
        for k in ("images", "skipped", "labels", "segs"):
            st.setdefault(k, {})
        st.setdefault("outbox", [])
        return st

    def _save_state(self, st: dict) -> None:
        tmp = self._state_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(st, f, indent=1, sort_keys=True)
        os.replace(tmp, self._state_path)

    # ================================================================== synchronisation
    def refresh_remote(self, force: bool = False, retries: int = 1) -> bool:
        """Push queued SEGs, then mirror the server (new photographs, SEGs) into the cache.
        Returns whether the server was reachable; never raises for an unreachable server."""
        with self._sync_lock:
            if not force and time.time() - self._last_refresh < self._refresh_s:
                return bool(self._reachable)
            self._last_refresh = time.time()
            try:
                with self._file_lock:
                    st = self._load_state()
                    try:
                        self._push_outbox(st, retries=retries)
                        self._sync_images(st, retries=retries)
                        self._sync_labels(st, retries=retries)
                    finally:
                        self._save_state(st)
                self._reachable, self._last_error = True, None
            except DicomWebUnavailable as e:
                self._reachable, self._last_error = False, e.detail
                logger.warning(f"{e.detail}; serving the local cache ({self._cache})")
            except DicomWebError as e:
                self._reachable, self._last_error = True, e.detail
                logger.warning(e.detail)
            return bool(self._reachable)

    def _maybe_refresh(self) -> None:
        if time.time() - self._last_refresh >= self._refresh_s:
            self.refresh_remote()

    # ------------------------------------------------------------------ images
    def _sync_images(self, st: dict, retries: int) -> None:
        remote = {str(d.SeriesInstanceUID): str(d.StudyInstanceUID) for d in self._web.search_series(self._filter, retries=retries)
                  if "SeriesInstanceUID" in d and "StudyInstanceUID" in d}
        for series, study in sorted(remote.items()):
            if series in self._datastore.objects or series in st["skipped"]:
                continue
            try:
                self._fetch_image(st, study, series, retries=retries)
            except (BadInput, UnsupportedType, InvalidId, dphoto.DicomConversionError, io.FundusIOError) as e:
                reason = e.detail if isinstance(e, ClientError) else str(e)
                st["skipped"][series] = {"StudyInstanceUID": study, "reason": reason}
                logger.warning(f"DICOMweb series {series} skipped: {reason}")
        for series in [s for s in st["images"] if s not in remote]:
            self._forget_image(st, series)

    def _fetch_image(self, st: dict, study: str, series: str, retries: int) -> None:
        instances = self._web.retrieve_series(study, series, retries=retries)
        images = [d for d in instances if str(d.get("SOPClassUID", "")).startswith(_IMAGE_SOP_PREFIXES) and "PixelData" in d]
        if len(images) != 1:
            raise BadInput(f"series holds {len(images)} image instance(s) ({len(instances)} in all); "
                           f"one photograph per series is supported")
        ds = images[0]
        pixels = dphoto.dataset_to_array(ds)
        check_id(series, "image")
        tmpdir = tempfile.mkdtemp(prefix="mldr_dicomweb_")
        try:
            png = io.write_image(os.path.join(tmpdir, series + ".png"), pixels)
            info = {
                "source": "dicomweb",
                "StudyInstanceUID": study,
                "SeriesInstanceUID": series,
                "SOPInstanceUID": str(ds.SOPInstanceUID),
                "SOPClassUID": str(ds.SOPClassUID),
                "Modality": str(ds.get("Modality", "")),
                "PatientID": str(ds.get("PatientID", "")),
                "ImageLaterality": str(ds.get("ImageLaterality", ds.get("Laterality", "")) or ""),
                "SeriesDescription": str(ds.get("SeriesDescription", "")),
            }
            FundusDatastore.add_image(self, series, png, info)   # validates (size, field of view)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        folder = os.path.join(self._dicom_dir, series)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, str(ds.SOPInstanceUID) + ".dcm")
        ds.save_as(path, write_like_original=False)
        st["images"][series] = {"StudyInstanceUID": study, "SOPInstanceUID": str(ds.SOPInstanceUID),
                                "dicom": os.path.relpath(path, self._cache)}
        logger.info(f"DICOMweb: cached photograph {series} ({pixels.shape[1]}x{pixels.shape[0]})")

    def _forget_image(self, st: dict, series: str) -> None:
        """The series left the server: drop it from the cache; its local-only labels are moved to .orphans/."""
        if any(item["image"] == series for item in st["outbox"]):
            return   # a label for it still waits to be uploaded: keep everything until the server says more
        obj = self._datastore.objects.get(series)
        if obj is not None:
            keep = os.path.join(self._cache, ".orphans", series)
            tags = list(obj.labels)
            for tag in tags:
                for p in self._label_files(series, tag):
                    os.makedirs(os.path.join(keep, tag), exist_ok=True)
                    shutil.copy2(p, os.path.join(keep, tag, os.path.basename(p)))
            super().remove_image(series)
            for tag in tags:
                for p in self._label_files(series, tag):
                    os.unlink(p)
            self._reconcile_datastore()
        shutil.rmtree(os.path.join(self._dicom_dir, series), ignore_errors=True)
        st["images"].pop(series, None)
        st["labels"].pop(series, None)
        logger.info(f"DICOMweb: series {series} is no longer on the server; removed from the cache")

    def source_dataset(self, image_id: str) -> pydicom.Dataset:
        st = self._load_state()
        rec = st["images"].get(image_id)
        if not rec:
            raise BadInput(f"image '{image_id}' has no cached source DICOM")
        return pydicom.dcmread(os.path.join(self._cache, rec["dicom"]))

    # ------------------------------------------------------------------ labels from the server
    def _sync_labels(self, st: dict, retries: int) -> None:
        remote_segs = self._web.search_series({"Modality": "SEG"}, retries=retries)
        present = set()
        for d in remote_segs:
            series = str(d.get("SeriesInstanceUID", ""))
            study = str(d.get("StudyInstanceUID", ""))
            if not series:
                continue
            present.add(series)
            if series in st["segs"]:
                continue
            meta = self._web.series_metadata(study, series, retries=retries)
            rec = {"StudyInstanceUID": study, "image": None, "timestamp": "", "note": ""}
            if not meta:
                rec["note"] = "no instances"
            else:
                m = meta[0]
                rec["image"] = dseg.referenced_series(m)
                rec["SOPInstanceUID"] = str(m.get("SOPInstanceUID", ""))
                rec["timestamp"] = dseg.seg_timestamp(m)
                if dseg.is_proposal(m):   # all segments AUTOMATIC: a model's answer, never a label
                    rec["proposal"] = _algorithm_name(m)
                    rec["SeriesDescription"] = str(m.get("SeriesDescription", ""))
                if len(meta) > 1:
                    rec["note"] = f"{len(meta)} instances; the first is used"
            st["segs"][series] = rec
        for series in [s for s in st["segs"] if s not in present]:
            st["segs"].pop(series)
        # the newest SEG of every cached image
        newest: dict[str, tuple[str, str]] = {}
        for series, rec in st["segs"].items():
            img = rec.get("image")
            if img and img in self._datastore.objects and not rec.get("unusable") and not rec.get("proposal"):
                if img not in newest or (rec["timestamp"], series) > newest[img]:
                    newest[img] = (rec["timestamp"], series)
        for image_id in list(self._datastore.objects):
            local = st["labels"].get(image_id)
            if local and local.get("state") == "pending":
                continue   # our own upload decides; it is newer than anything the server had when it was saved
            best = newest.get(image_id)
            if best is None:
                if local and local.get("state") == "stored":
                    self._drop_lesion_map(image_id)
                    st["labels"].pop(image_id, None)
                    logger.info(f"DICOMweb: the SEG of {image_id} is gone from the server; local lesion map removed")
                continue
            ts, seg_series = best
            if local and local.get("SeriesInstanceUID") == seg_series:
                continue
            try:
                self._apply_remote_seg(st, image_id, seg_series, retries=retries)
            except (dseg.SegError, BadInput, UnsupportedType) as e:
                reason = e.detail if isinstance(e, ClientError) else str(e)
                st["segs"][seg_series]["unusable"] = reason
                logger.warning(f"DICOMweb: SEG {seg_series} for {image_id} ignored: {reason}")

    def _apply_remote_seg(self, st: dict, image_id: str, seg_series: str, retries: int) -> None:
        rec = st["segs"][seg_series]
        instances = self._web.retrieve_series(rec["StudyInstanceUID"], seg_series, retries=retries)
        if not instances:
            raise dseg.SegError("SEG series has no instances")
        h, w = self.image_size(image_id)
        label = dseg.seg_to_label_map(instances[0], shape=(h, w), names=self._segment_names)
        tmpdir = tempfile.mkdtemp(prefix="mldr_seg_")
        try:
            path = io.write_label(os.path.join(tmpdir, image_id + ".png"), label)
            self._drop_lesion_map(image_id)
            info = {"dicom_seg": {"SeriesInstanceUID": seg_series, "SOPInstanceUID": rec.get("SOPInstanceUID", ""),
                                  "state": "stored", "from": "server"}}
            FundusDatastore.save_label(self, image_id, path, DefaultLabelTag.FINAL, info)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        st["labels"][image_id] = {"SeriesInstanceUID": seg_series, "SOPInstanceUID": rec.get("SOPInstanceUID", ""),
                                  "timestamp": rec.get("timestamp", ""), "state": "stored"}
        logger.info(f"DICOMweb: final lesion label of {image_id} read from SEG {seg_series}")
        if self._started and self.label_listener is not None:
            try:
                self.label_listener(image_id, DefaultLabelTag.FINAL, "lesion_map")
            except Exception:   # counting must never lose the label just read
                logger.exception(f"DICOMweb: the label listener failed for {image_id}")

    def _label_files(self, image_id: str, tag: str) -> list[str]:
        folder = self._datastore.label_path(tag)
        out = []
        for ext in LABEL_MAP_EXTENSIONS + (".grade.json",):
            p = os.path.join(folder, image_id + ext)
            if os.path.isfile(p):
                out.append(p)
        return out

    def _drop_lesion_map(self, image_id: str) -> None:
        folder = self._datastore.label_path(DefaultLabelTag.FINAL)
        removed = False
        for ext in LABEL_MAP_EXTENSIONS:
            p = os.path.join(folder, image_id + ext)
            if os.path.isfile(p):
                os.unlink(p)
                removed = True
        if removed:
            self._reconcile_datastore()   # the grade label (if any) becomes the image's final label again

    # ------------------------------------------------------------------ labels to the server
    def _push_outbox(self, st: dict, retries: int) -> None:
        remaining = []
        for i, item in enumerate(st["outbox"]):
            path = os.path.join(self._cache, item["file"])
            if not os.path.isfile(path):
                logger.warning(f"DICOMweb outbox: {item['file']} vanished; dropped")
                continue
            try:
                self._web.store([pydicom.dcmread(path)], retries=retries)
            except DicomWebUnavailable:
                remaining.extend(st["outbox"][i:])
                st["outbox"] = remaining
                raise
            except DicomWebError as e:
                item["error"] = e.detail
                remaining.append(item)
                logger.warning(f"DICOMweb outbox: {e.detail}")
                continue
            os.unlink(path)
            lab = st["labels"].get(item["image"])
            if lab and lab.get("SeriesInstanceUID") == item["SeriesInstanceUID"]:
                lab["state"] = "stored"
                self._set_label_state(item["image"], "stored")
            st["segs"][item["SeriesInstanceUID"]] = {"StudyInstanceUID": item["StudyInstanceUID"], "image": item["image"],
                                                     "SOPInstanceUID": item["SOPInstanceUID"],
                                                     "timestamp": item["timestamp"], "note": "uploaded here"}
            logger.info(f"DICOMweb: stored SEG {item['SeriesInstanceUID']} for {item['image']}")
        st["outbox"] = remaining

    def _set_label_state(self, image_id: str, state: str) -> None:
        obj = self._datastore.objects.get(image_id)
        lab = obj.labels.get(DefaultLabelTag.FINAL) if obj else None
        if lab is not None and isinstance(lab.info.get("dicom_seg"), dict):
            lab.info["dicom_seg"]["state"] = state
            self._update_datastore_file()

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_id(image_id, "image")
        if image_id not in self._datastore.objects:
            self.refresh_remote(force=True)
        ext = io.file_extension(label_filename)
        is_map = ext in LABEL_MAP_EXTENSIONS and label_tag == DefaultLabelTag.FINAL
        with self._sync_lock:
            if not is_map:
                return super().save_label(image_id, label_filename, label_tag, label_info)
            with self._file_lock:
                st = self._load_state()
                source = self.source_dataset(image_id)
                # FundusDatastore validates, normalises (Slicer segment names -> lesion values) and writes the local
                # copy; the SEG is made from that copy, so the cache and the server hold the same label map
                folder = self._datastore.label_path(label_tag)
                stash = tempfile.mkdtemp(prefix="mldr_prev_")
                for p in self._label_files(image_id, label_tag):
                    if not p.endswith(".grade.json"):
                        shutil.move(p, os.path.join(stash, os.path.basename(p)))
                try:
                    label_id = super().save_label(image_id, label_filename, label_tag, label_info)
                    stored = [p for p in self._label_files(image_id, label_tag) if not p.endswith(".grade.json")]
                    try:
                        seg = dseg.label_map_to_seg(io.read_label(stored[0]), source)
                    except (dseg.SegError, io.FundusIOError, IndexError) as e:
                        raise BadInput(f"label map cannot be stored as DICOM SEG: {e}") from e
                except BaseException:
                    for p in self._label_files(image_id, label_tag):   # refused: the previous lesion map stays
                        if not p.endswith(".grade.json"):
                            os.unlink(p)
                    for name in os.listdir(stash):
                        shutil.move(os.path.join(stash, name), os.path.join(folder, name))
                    raise
                finally:
                    shutil.rmtree(stash, ignore_errors=True)
                    self._reconcile_datastore()
                lab = self._datastore.objects[image_id].labels.get(label_tag)
                if lab is not None:
                    lab.info["dicom_seg"] = {"SeriesInstanceUID": str(seg.SeriesInstanceUID),
                                             "SOPInstanceUID": str(seg.SOPInstanceUID), "state": "pending"}
                    self._update_datastore_file()
                name = f"{image_id}__{seg.SOPInstanceUID}.dcm"
                seg.save_as(os.path.join(self._outbox_dir, name), write_like_original=False)
                # a label still waiting for the same image is superseded by this one
                for item in [x for x in st["outbox"] if x["image"] == image_id]:
                    with_path = os.path.join(self._cache, item["file"])
                    if os.path.isfile(with_path):
                        os.unlink(with_path)
                st["outbox"] = [x for x in st["outbox"] if x["image"] != image_id]
                st["outbox"].append({"image": image_id, "file": os.path.relpath(os.path.join(self._outbox_dir, name), self._cache),
                                     "SeriesInstanceUID": str(seg.SeriesInstanceUID), "SOPInstanceUID": str(seg.SOPInstanceUID),
                                     "StudyInstanceUID": str(seg.StudyInstanceUID), "timestamp": dseg.seg_timestamp(seg),
                                     "queued": time.strftime("%Y-%m-%dT%H:%M:%S")})
                st["labels"][image_id] = {"SeriesInstanceUID": str(seg.SeriesInstanceUID),
                                          "SOPInstanceUID": str(seg.SOPInstanceUID),
                                          "timestamp": dseg.seg_timestamp(seg), "state": "pending"}
                try:
                    self._push_outbox(st, retries=self._web.retries)
                    self._reachable, self._last_error = True, None
                except DicomWebUnavailable as e:
                    self._reachable, self._last_error = False, e.detail
                    logger.warning(f"{e.detail}; the label of {image_id} is kept in {self._outbox_dir} "
                                   f"and uploaded when the server is back")
                finally:
                    self._save_state(st)
            return label_id

    # ------------------------------------------------------------------ model proposals to the server
    def store_proposal(self, image_id: str, label, proposal: "dseg.Proposal",
                       levels: dict[str, int] | None = None) -> dict[str, Any]:
        """Store a model's label map for ``image_id`` in the server as a SEG with AUTOMATIC segments (never a
        label, :func:`dseg.is_proposal`) referencing the cached source photograph; answers its UIDs. The
        server must be reachable (503 otherwise): a proposal is not queued."""
        check_id(image_id, "image")
        if image_id not in self._datastore.objects:
            raise BadInput(f"image '{image_id}' is not a photograph of this DICOMweb server")
        with self._sync_lock:
            source = self.source_dataset(image_id)
            try:
                seg = dseg.label_map_to_seg(label, source, proposal=proposal, levels=levels)
            except dseg.SegError as e:
                raise BadInput(f"the answer of {proposal.model} cannot be stored as DICOM SEG: {e}") from e
            self._web.store([seg], retries=self._web.retries)
            out = {"StudyInstanceUID": str(seg.StudyInstanceUID), "SeriesInstanceUID": str(seg.SeriesInstanceUID),
                   "SOPInstanceUID": str(seg.SOPInstanceUID), "SeriesDescription": str(seg.SeriesDescription),
                   "ContentDescription": str(seg.ContentDescription), "algorithm_type": "AUTOMATIC",
                   "referenced_image": image_id, "model": proposal.model}
            with self._file_lock:
                st = self._load_state()
                st["segs"][out["SeriesInstanceUID"]] = {
                    "StudyInstanceUID": out["StudyInstanceUID"], "image": image_id, "SOPInstanceUID": out["SOPInstanceUID"],
                    "timestamp": dseg.seg_timestamp(seg), "note": "proposal stored here", "proposal": proposal.model,
                    "SeriesDescription": out["SeriesDescription"]}
                self._save_state(st)
            logger.info(f"DICOMweb: {proposal.model} proposal for {image_id} stored as SEG {out['SeriesInstanceUID']}")
            return out

    def proposals(self, image_id: str | None = None) -> dict[str, list[dict]]:
        """The model proposals (AUTOMATIC SEGs) in the server, per image, newest last."""
        out: dict[str, list[dict]] = {}
        for series, rec in sorted(self._load_state()["segs"].items(), key=lambda kv: kv[1].get("timestamp", "")):
            if rec.get("proposal") and rec.get("image") and (image_id is None or rec["image"] == image_id):
                out.setdefault(rec["image"], []).append(
                    {"SeriesInstanceUID": series, "model": rec["proposal"], "timestamp": rec.get("timestamp", ""),
                     "SeriesDescription": rec.get("SeriesDescription", "")})
        return out

    def label_upload_state(self, image_id: str) -> dict | None:
        """How the image's final lesion label stands with the server (for the PUT /datastore/label answer)."""
        st = self._load_state()
        lab = st["labels"].get(image_id)
        if not lab:
            return None
        out = {"state": lab["state"], "SeriesInstanceUID": lab["SeriesInstanceUID"], "server": self._web.url}
        if lab["state"] == "pending":
            out["detail"] = (f"kept in the local cache; uploaded as DICOM SEG when {self._web.url} answers "
                             f"({self._last_error or 'not yet tried'})")
        return out

    # ------------------------------------------------------------------ adding images
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Upload a photograph to the server as an OP instance (a .dcm is sent as is); the id is its SeriesInstanceUID."""
        info = dict(image_info or {})
        ext = io.file_extension(image_filename)
        if ext == ".dcm" or (not ext and pydicom.misc.is_dicom(image_filename)):
            try:
                ds = pydicom.dcmread(image_filename)
                dphoto.dataset_to_array(ds)
            except (dphoto.DicomConversionError, pydicom.errors.InvalidDicomError) as e:
                raise BadInput(f"not a usable DICOM photograph: {e}") from e
        elif ext in io.IMAGE_EXTENSIONS:
            img = self.validate_image_file(image_filename)
            pid = str(info.get("patient_id") or info.get("PatientID") or image_id or "anonymous")
            meta = dphoto.PhotoMeta(
                patient_id=pid, laterality=dphoto.normalise_laterality(info.get("laterality")) if info.get("laterality")
                else dphoto.laterality_from_name(image_id or os.path.basename(image_filename)),
                series_description=f"Fundus {image_id}" if image_id else "", source_name=image_id or "",
                lossy_source=ext in (".jpg", ".jpeg"))
            ds = dphoto.photo_to_dataset(img, meta)
        else:
            raise UnsupportedType(f"unsupported image type '{ext}'; accepted: .dcm or {', '.join(io.IMAGE_EXTENSIONS)}")
        series = str(ds.SeriesInstanceUID)
        if series in self._datastore.objects:
            raise Conflict(f"image {series} already exists")
        self._web.store([ds])               # DicomWebUnavailable (503): nothing stored anywhere
        self.refresh_remote(force=True)
        if series not in self._datastore.objects:
            st = self._load_state()
            reason = st["skipped"].get(series, {}).get("reason") or f"the server does not list it under {self._filter}"
            raise BadInput(f"image stored in {self._web.url} as series {series}, but not usable here: {reason}")
        return series

    def remove_image(self, image_id: str) -> None:
        raise ClientError(405, f"images live in {self._web.url}: delete the series there (the cache follows)")

    # ------------------------------------------------------------------ listing (refreshed)
    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(image_id)
        if not uri and image_id and all(c.isdigit() or c == "." for c in image_id):   # a UID not seen yet
            self.refresh_remote(force=True)
            uri = super().get_image_uri(image_id)
        return uri

    def list_images(self):
        self._maybe_refresh()
        return super().list_images()

    def get_labeled_images(self, label_tag=None, labels=None):
        self._maybe_refresh()
        return super().get_labeled_images(label_tag, labels)

    def get_unlabeled_images(self, label_tag=None, labels=None):
        self._maybe_refresh()
        return super().get_unlabeled_images(label_tag, labels)

    def datalist(self, full_path=True):
        self.refresh_remote(force=True)   # training reads the labels in the server
        return super().datalist(full_path)

    def status(self) -> dict[str, Any]:
        res = super().status()
        st = self._load_state()
        res["dicomweb"] = {
            "url": self._web.url,
            "search_filter": self._filter,
            "reachable": self._reachable,
            "last_error": self._last_error,
            "cache": self._cache,
            "pending_uploads": [{"image": x["image"], "SeriesInstanceUID": x["SeriesInstanceUID"], "queued": x["queued"],
                                 **({"error": x["error"]} if x.get("error") else {})} for x in st["outbox"]],
            "skipped": st["skipped"],
            "proposals": self.proposals(),
            "unusable_segs": {series: {"image": rec.get("image"), "reason": rec["unusable"]}
                              for series, rec in st["segs"].items() if rec.get("unusable")},
            "segment_names": self._segment_names,
        }
        return res

    def json(self):
        self._maybe_refresh()
        return super().json()


def _algorithm_name(seg: pydicom.Dataset) -> str:
    """The algorithm named in a SEG's first segment (Segment Algorithm Name, or Algorithm Identification), or '?'."""
    for item in seg.get("SegmentSequence", []) or []:
        name = str(item.get("SegmentAlgorithmName", "") or "")
        if not name:
            for alg in item.get("SegmentationAlgorithmIdentificationSequence", []) or []:
                name = str(alg.get("AlgorithmName", "") or "")
        if name:
            return name
    return "?"


def make_dicomweb_datastore(url: str, conf: dict[str, Any], max_pixels: int, min_side: int) -> FundusDICOMWebDatastore:
    """The app's datastore for ``--studies http(s)://.../dicom-web`` (conf keys: dicomweb_filter, dicomweb_cache,
    dicomweb_refresh, dicomweb_retries, dicomweb_timeout); credentials and URL prefixes from MONAI Label's settings."""
    from monailabel.config import settings

    from monailabel_dr.config import ConfError

    url = url.rstrip("/").strip()
    raw_filter = conf.get("dicomweb_filter")
    try:
        search_filter = json.loads(raw_filter) if isinstance(raw_filter, str) and raw_filter.strip() else (raw_filter or DEFAULT_FILTER)
    except ValueError as e:
        raise ConfError(f"--conf dicomweb_filter must be JSON, e.g. '{{\"Modality\": \"OP\"}}': {e}") from e
    if not isinstance(search_filter, dict):
        raise ConfError("--conf dicomweb_filter must be a JSON object")
    cache = str(conf.get("dicomweb_cache") or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or default_cache_path(url)
    if conf.get("dicomweb_cache") or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH:
        cache = os.path.join(os.path.expanduser(cache), hashlib.md5(url.encode()).hexdigest()[:16])
    try:
        refresh = float(conf.get("dicomweb_refresh", 10))
        retries = int(conf.get("dicomweb_retries", 3))
        timeout = float(conf.get("dicomweb_timeout", 30))
    except ValueError as e:
        raise ConfError(f"--conf dicomweb_refresh / dicomweb_retries / dicomweb_timeout must be numbers: {e}") from e
    web = DicomWeb(
        url,
        username=settings.MONAI_LABEL_DICOMWEB_USERNAME or getattr(settings, "MONAI_LABEL_DATASTORE_USERNAME", ""),
        password=settings.MONAI_LABEL_DICOMWEB_PASSWORD or getattr(settings, "MONAI_LABEL_DATASTORE_PASSWORD", ""),
        retries=retries, timeout_s=timeout,
        qido_prefix=settings.MONAI_LABEL_QIDO_PREFIX, wado_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    try:
        names = dseg.parse_segment_names(conf.get("seg_segment_names"))
    except ValueError as e:
        raise ConfError(f"--conf seg_segment_names: {e}") from e
    return FundusDICOMWebDatastore(web, cache, search_filter=search_filter, refresh_s=refresh,
                                   max_pixels=max_pixels, min_side=min_side,
                                   read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY, segment_names=names)
