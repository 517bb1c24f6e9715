"""Fundus photographs as DICOM Ophthalmic Photography 8 Bit Image (modality OP), with pydicom.

:func:`photo_to_dataset` wraps a decoded photograph (display orientation, as
:func:`monailabel_dr.fundus.io.read_image` returns it) in an OP instance: RGB (or
MONOCHROME2 for a grey photograph), 8 bits, uncompressed Explicit VR Little Endian, so
the stored pixels are exactly the decoded ones; :func:`dataset_to_array` gives them
back. UIDs are derived from the pixels and the patient id unless given, so converting
the same file twice gives the same instance (a second upload to a PACS is a no-op),
and all photographs of one patient id share a study.

Laterality (Image Laterality, R / L) comes from an explicit value, a CSV, or the file
name (``left`` / ``right``, ``OS`` / ``OD``, a lone ``L`` / ``R`` token, as in
``10_left.jpeg`` or ``IM001_R.png``); when none says, the attribute is left out and
the caller is told (DICOM makes it mandatory for OP; nothing is guessed).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from monailabel_dr import __version__
from monailabel_dr.fundus import io as fio

OP_8BIT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root for generated UIDs

_LEFT = {"left", "l", "os", "lefteye", "oculussinister"}
_RIGHT = {"right", "r", "od", "righteye", "oculusdexter"}
_LATERALITY_VALUES = {
    "l": "L", "left": "L", "os": "L", "left eye": "L",
    "r": "R", "right": "R", "od": "R", "right eye": "R",
}


class DicomConversionError(ValueError):
    """A file that cannot become (or be read back from) an OP instance; the message says why."""


# ----------------------------------------------------------------------------- laterality
def _tokens(name: str) -> list[str]:
    stem = os.path.basename(name)
    for ext in (".nii.gz",) + tuple(fio.IMAGE_EXTENSIONS):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    # split on non-alphanumerics and on letter/digit boundaries: "IM001R" -> im, 001, r
    return [t.lower() for t in re.findall(r"[A-Za-z]+|[0-9]+", stem)]


def laterality_from_name(name: str) -> str | None:
    """'L', 'R' or None (no eye named, or both)."""
    toks = set(_tokens(name))
    left, right = bool(toks & _LEFT), bool(toks & _RIGHT)
    if left == right:
        return None
    return "L" if left else "R"


def normalise_laterality(value: str | None) -> str | None:
    if value is None or str(value).strip() == "":
        return None
    v = _LATERALITY_VALUES.get(str(value).strip().lower())
    if v is None:
        raise DicomConversionError(f"laterality {value!r}: use L/R, left/right or OS/OD")
    return v


def _patient_from_name(name: str) -> str:
    """The file stem without its laterality token: '10_left.jpeg' -> '10' (both eyes of a patient share a study)."""
    stem = os.path.basename(name)
    for ext in (".nii.gz",) + tuple(fio.IMAGE_EXTENSIONS):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    parts = [p for p in re.split(r"[_\-\s.]+", stem) if p]
    kept = [p for p in parts if p.lower() not in _LEFT | _RIGHT]
    return "_".join(kept) or stem


def read_sidecar_csv(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """CSV with a column naming the image (image / file / filename / name / id) and any of
    laterality (or eye / side), patient_id, patient_name, study_date: {file stem: {field: value}}."""
    out: dict[str, dict[str, str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        key = next((cols[c] for c in ("image", "file", "filename", "name", "id", "image_id") if c in cols), None)
        if key is None:
            raise DicomConversionError(f"{path}: no image column (image, file, filename, name or id) in {reader.fieldnames}")
        aliases = {"laterality": ("laterality", "eye", "side", "image_laterality"),
                   "patient_id": ("patient_id", "patientid", "patient"),
                   "patient_name": ("patient_name", "patientname"),
                   "study_date": ("study_date", "date")}
        for row in reader:
            name = (row.get(key) or "").strip()
            if not name:
                continue
            rec = {}
            for field_name, names in aliases.items():
                col = next((cols[c] for c in names if c in cols), None)
                if col and (row.get(col) or "").strip():
                    rec[field_name] = row[col].strip()
            stem = _strip_ext(os.path.basename(name))
            out[stem] = rec
    return out


def _strip_ext(name: str) -> str:
    low = name.lower()
    for ext in (".nii.gz", ".dcm") + tuple(fio.IMAGE_EXTENSIONS):
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


# ----------------------------------------------------------------------------- pixels
def to_8bit(img: np.ndarray) -> tuple[np.ndarray, bool]:
    """(uint8 array, reduced): 16-bit photographs are rounded to 8 bits (OP 8 Bit Image)."""
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise DicomConversionError(f"expected an (H, W) grey or (H, W, 3) RGB photograph, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr), False
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), True
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255, True
    raise DicomConversionError(f"photograph pixels of type {arr.dtype} cannot be stored as 8 bits")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    d = Dataset()
    d.CodeValue = value
    d.CodingSchemeDesignator = scheme
    d.CodeMeaning = meaning
    return d


def _uid(*parts: str) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])


def _safe_pn(value: str) -> str:
    """A Person Name value; a single component (an id) becomes a family name ('P007' -> 'P007^')."""
    name = re.sub(r"[\\\x00-\x1f]", " ", str(value))[:63]
    return name if "^" in name or not name else name + "^"


@dataclass
class PhotoMeta:
    """What goes into the OP instance besides the pixels (unset UIDs are derived deterministically)."""

    patient_id: str
    patient_name: str = ""
    laterality: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    study_date: str | None = None           # YYYYMMDD; default: today
    series_description: str = ""
    source_name: str = ""                   # the original file name (kept in Derivation Description)
    lossy_source: bool = False               # JPEG input: the pixels went through lossy compression once
    extra: dict[str, str] = field(default_factory=dict)


def photo_to_dataset(img: np.ndarray, meta: PhotoMeta) -> Dataset:
    """An OP 8 Bit Image instance holding exactly ``img``'s pixels (after 16 -> 8 bit rounding, if any).

    Built module by module of the Ophthalmic Photography 8 Bit Image IOD: identity (SOP common, patient,
    study, series, synchronisation, equipment), the image (general / OP image, image pixel, multi-frame)
    and the ophthalmic modules (ocular region, acquisition parameters, photographic parameters)."""
    pixels, reduced = to_8bit(img)
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    lat = normalise_laterality(meta.laterality) or ""
    uids = (meta.study_uid or _uid("study", meta.patient_id),
            meta.series_uid or _uid("series", meta.patient_id, lat, digest),
            meta.sop_uid or _uid("instance", meta.patient_id, lat, digest))
    now = _dt.datetime.now()
    date = meta.study_date or now.strftime("%Y%m%d")
    if not re.fullmatch(r"\d{8}", date):
        raise DicomConversionError(f"study date {date!r}: use YYYYMMDD")
    time = now.strftime("%H%M%S")

    ds = Dataset()
    ds.file_meta = _file_meta(uids[2])
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.SpecificCharacterSet = "ISO_IR 192"
    _identity_modules(ds, meta, uids, now.strftime("%Y%m%d"), date, time)
    _image_modules(ds, pixels, reduced, meta, date, time)
    _ophthalmic_modules(ds, meta)
    for k, v in meta.extra.items():
        setattr(ds, k, v)
    return ds


def _file_meta(sop_uid: str) -> FileMetaDataset:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = OP_8BIT_SOP_CLASS
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fm.ImplementationVersionName = "MLDR_" + __version__.replace(".", "")[:10]
    return fm


def _identity_modules(ds: Dataset, meta: PhotoMeta, uids: tuple[str, str, str], today: str, date: str,
                      time: str) -> None:
    """SOP common, patient, general study, general / OP series, synchronisation, general equipment."""
    study_uid, series_uid, sop_uid = uids
    ds.SOPClassUID = OP_8BIT_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = today
    ds.InstanceCreationTime = time
    # patient
    ds.PatientName = _safe_pn(meta.patient_name or meta.patient_id)
    ds.PatientID = str(meta.patient_id)[:64]
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # general study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.StudyDescription = "Fundus photography"
    # general series / ophthalmic photography series
    ds.Modality = "OP"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = date
    ds.SeriesTime = time
    if meta.series_description:
        ds.SeriesDescription = meta.series_description[:64]
    # synchronization (mandatory for OP): the photograph is not synchronised with anything
    ds.SynchronizationFrameOfReferenceUID = _uid("sync", study_uid)
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    # general equipment
    ds.Manufacturer = ""
    ds.SoftwareVersions = f"monailabel-dr {__version__}"


def _image_modules(ds: Dataset, pixels: np.ndarray, reduced: bool, meta: PhotoMeta, date: str, time: str) -> None:
    """General / OP image (derivation and lossy-compression history), image pixel, multi-frame."""
    colour = pixels.ndim == 3
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED" if reduced else "ORIGINAL", "PRIMARY"]
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDateTime = date + time
    ds.BurnedInAnnotation = "NO"
    if meta.lossy_source:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.LossyImageCompressionRatio = ""
    else:
        ds.LossyImageCompression = "00"
    if reduced or meta.source_name:
        desc = f"converted from {os.path.basename(meta.source_name)}" if meta.source_name else "converted"
        if reduced:
            desc += "; 16-bit pixels rounded to 8 bits"
        ds.DerivationDescription = desc[:1024]
    # image pixel
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    else:
        ds.PresentationLUTShape = "IDENTITY"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    # multi-frame (mandatory in the OP IOD even for one frame)
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063   # Frame Time
    ds.FrameTime = 0


def _ophthalmic_modules(ds: Dataset, meta: PhotoMeta) -> None:
    """Acquisition context, ocular region imaged, OP acquisition parameters, OP photographic parameters."""
    ds.AcquisitionContextSequence = DicomSequence([])
    # ocular region imaged
    if meta.laterality:
        ds.ImageLaterality = normalise_laterality(meta.laterality)
    else:
        ds.Laterality = ""   # unknown: the series-level (type 2C) attribute stays empty, Image Laterality absent
    ds.AnatomicRegionSequence = DicomSequence([_code("5665001", "SCT", "Retina")])
    # ophthalmic photography acquisition parameters (type 2: present, may be empty)
    ds.PatientEyeMovementCommanded = ""
    ds.HorizontalFieldOfView = None
    ds.RefractiveStateSequence = DicomSequence([])
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = ""
    # ophthalmic photographic parameters
    ds.AcquisitionDeviceTypeCodeSequence = DicomSequence([_code("409898007", "SCT", "Fundus camera")])
    ds.IlluminationTypeCodeSequence = DicomSequence([])
    ds.LightPathFilterTypeStackCodeSequence = DicomSequence([])
    ds.ImagePathFilterTypeStackCodeSequence = DicomSequence([])
    ds.LensesCodeSequence = DicomSequence([])
    ds.DetectorType = ""


# ----------------------------------------------------------------------------- reading back
def dataset_to_array(ds: Dataset) -> np.ndarray:
    """The photograph of a single-frame image instance: (H, W, 3) RGB or (H, W) grey, display orientation.

    YBR colour spaces are converted to RGB, MONOCHROME1 is inverted; compressed transfer syntaxes
    need a pydicom pixel handler (Pillow covers JPEG baseline).
    """
    if "PixelData" not in ds:
        raise DicomConversionError("DICOM instance has no pixel data")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DicomConversionError(f"DICOM instance has {frames} frames; one photograph (one frame) is expected")
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises several types for missing handlers / corrupt data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise DicomConversionError(f"cannot decode the pixel data (transfer syntax {ts}): {e}") from e
    pi = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    if pi.startswith("YBR") and arr.ndim == 3:
        from pydicom.pixel_data_handlers.util import convert_color_space

        arr = convert_color_space(arr, "YBR_FULL" if pi in ("YBR_FULL_422", "YBR_FULL") else pi, "RGB")
    elif pi == "MONOCHROME1":
        arr = np.iinfo(arr.dtype).max - arr if arr.dtype.kind == "u" else arr.max() - arr
    elif pi == "PALETTE COLOR":
        from pydicom.pixel_data_handlers.util import apply_color_lut

        arr = apply_color_lut(arr, ds)
        arr = (arr >> 8).astype(np.uint8) if arr.dtype == np.uint16 else arr
    if arr.ndim == 3 and arr.shape[2] not in (1, 3):
        raise DicomConversionError(f"unexpected pixel array shape {arr.shape}")
    if arr.dtype.kind == "i":
        arr = np.clip(arr, 0, None).astype(np.uint16)
    return np.ascontiguousarray(arr)


def read_photo(path: str | os.PathLike) -> np.ndarray:
    try:
        ds = pydicom.dcmread(os.fspath(path))
    except Exception as e:
        raise DicomConversionError(f"{os.path.basename(os.fspath(path))} is not a readable DICOM file: {e}") from e
    return dataset_to_array(ds)


# ----------------------------------------------------------------------------- files
def convert_file(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    laterality: str | None = None,
    patient_id: str | None = None,
    patient_name: str | None = None,
    study_date: str | None = None,
    sidecar: Mapping[str, Mapping[str, str]] | None = None,
    max_pixels: int | None = fio.DEFAULT_MAX_PIXELS,
) -> dict:
    """Convert one photograph; returns a record (output path, UIDs, laterality and where it came from)."""
    src = os.fspath(src)
    name = os.path.basename(src)
    stem = _strip_ext(name)
    row = dict((sidecar or {}).get(stem, {}))
    try:
        img = fio.read_image(src, max_pixels=max_pixels, min_side=1)
    except fio.FundusIOError as e:
        raise DicomConversionError(f"{name}: {e}") from e
    if laterality:
        lat, lat_source = normalise_laterality(laterality), "flag"
    elif row.get("laterality"):
        lat, lat_source = normalise_laterality(row["laterality"]), "csv"
    else:
        lat = laterality_from_name(name)
        lat_source = "file name" if lat else None
    pid = patient_id or row.get("patient_id") or _patient_from_name(name)
    meta = PhotoMeta(
        patient_id=pid,
        patient_name=patient_name or row.get("patient_name") or pid,
        laterality=lat,
        study_date=study_date or row.get("study_date"),
        series_description=f"Fundus {('left' if lat == 'L' else 'right') + ' eye' if lat else 'photograph'} {stem}",
        source_name=name,
        lossy_source=fio.file_extension(src) in (".jpg", ".jpeg"),
    )
    ds = photo_to_dataset(img, meta)
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(os.fspath(out_dir), stem + ".dcm")
    ds.save_as(dst, write_like_original=False)
    return {
        "source": os.path.realpath(src),
        "dicom": os.path.realpath(dst),
        "patient_id": pid,
        "laterality": lat,
        "laterality_source": lat_source,
        "StudyInstanceUID": str(ds.StudyInstanceUID),
        "SeriesInstanceUID": str(ds.SeriesInstanceUID),
        "SOPInstanceUID": str(ds.SOPInstanceUID),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "photometric": str(ds.PhotometricInterpretation),
    }


def image_files(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files named, and the photographs directly inside folders named (sorted)."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(str(q) for q in p.iterdir() if q.is_file() and fio.file_extension(q) in fio.IMAGE_EXTENSIONS
                          and not q.name.startswith("."))
        elif p.is_file():
            out.append(str(p))
        else:
            raise DicomConversionError(f"{item}: no such file or folder")
    return out
