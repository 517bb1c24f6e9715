"""Lesion label maps (0 background, 1 MA, 2 HE, 3 EX, 4 SE) as DICOM Segmentation objects.

Writing uses highdicom: one BINARY segment per lesion (segment number = label value, all
four always described, empty frames kept so a label map round-trips exactly), derived
from the single-frame source photograph it references (Referenced Series Sequence and a
Source Image Sequence per frame). Segment types are coded in a private scheme
(``99MLDR``, DICOM's convention for local codes) under the SNOMED CT category
"Morphologically abnormal structure".

Reading accepts any 2-D SEG whose frames have the photograph's size (ours, OHIF's,
dcmqi's): each segment is matched to a lesion by its code or label (MA / Microaneurysms,
...); where segments overlap, MA wins over HE over SE over EX, as in the IDRiD import.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import re

import numpy as np
from pydicom.dataset import Dataset

from monailabel_dr import __version__
from monailabel_dr.fundus.lesions import LESION_COLORS, LESION_NAMES, LESION_VALUES, LESIONS, label_map_from_masks

logger = logging.getLogger(__name__)

CODING_SCHEME = "99MLDR"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SERIES_DESCRIPTION = "monailabel-dr lesions"


class SegError(ValueError):
    """A SEG that cannot be written or read as a lesion label map."""


def _rgb_to_cielab_dicom(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    from highdicom.color import CIELabColor

    import cv2

    lab = cv2.cvtColor(np.array([[rgb]], np.uint8), cv2.COLOR_RGB2LAB)[0, 0].astype(float)
    # OpenCV 8-bit Lab: L*255/100, a+128, b+128
    L, a, b = lab[0] * 100.0 / 255.0, lab[1] - 128.0, lab[2] - 128.0
    c = CIELabColor(L, a, b)
    return tuple(int(v) for v in c.value)


def segment_descriptions():
    import highdicom as hd

    out = []
    for code in LESIONS:
        d = hd.seg.SegmentDescription(
            segment_number=LESION_VALUES[code],
            segment_label=LESION_NAMES[code],
            segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure"),
            segmented_property_type=hd.sr.CodedConcept(code, CODING_SCHEME, LESION_NAMES[code]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        d.RecommendedDisplayCIELabValue = list(_rgb_to_cielab_dicom(LESION_COLORS[code]))
        out.append(d)
    return out


def _source_metadata(source: Dataset) -> Dataset:
    """The source header as highdicom reads a single-frame image (OP carries NumberOfFrames = 1
    without functional groups, which highdicom would take for an enhanced multi-frame image)."""
    meta = Dataset()
    for elem in source:
        if elem.tag == 0x7FE00010:  # PixelData
            continue
        meta.add(copy.deepcopy(elem))
    meta.file_meta = copy.deepcopy(getattr(source, "file_meta", Dataset()))
    if int(getattr(source, "NumberOfFrames", 1) or 1) != 1:
        raise SegError(f"source image has {source.NumberOfFrames} frames; one photograph (one frame) is expected")
    for kw in ("NumberOfFrames", "FrameIncrementPointer"):
        if kw in meta:
            delattr(meta, kw)
    return meta


def label_map_to_seg(label: np.ndarray, source: Dataset, *, series_uid: str | None = None,
                     content_label: str = "LESIONS", creator: str = "") -> Dataset:
    """A DICOM SEG of an (H, W) lesion label map (values 0-4) derived from ``source``."""
    import highdicom as hd

    arr = np.asarray(label)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.shape != (int(source.Rows), int(source.Columns)):
        raise SegError(f"label map is {arr.shape[1]}x{arr.shape[0]} but the source image is "
                       f"{source.Columns}x{source.Rows} (width x height)")
    if arr.size and (arr.min() < 0 or arr.max() > len(LESIONS)):
        raise SegError(f"label values must be 0-{len(LESIONS)}; found {np.unique(arr).tolist()[:10]}")
    now = _dt.datetime.now()
    seg = hd.seg.Segmentation(
        source_images=[_source_metadata(source)],
        pixel_array=arr.astype(np.uint8)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(),
        series_instance_uid=series_uid or hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="monailabel-dr",
        manufacturer_model_name="monailabel-dr",
        software_versions=f"monailabel-dr {__version__}",
        device_serial_number="0",
        series_description=SERIES_DESCRIPTION,
        content_label=content_label,
        content_description="Diabetic retinopathy lesions (MA, HE, EX, SE)",
        content_creator_name=creator or None,
        omit_empty_frames=False,
    )
    seg.PatientOrientation = source.get("PatientOrientation", "")
    seg.ContentDate = now.strftime("%Y%m%d")
    seg.ContentTime = now.strftime("%H%M%S.%f")
    return seg


def referenced_series(seg: Dataset) -> str | None:
    seq = seg.get("ReferencedSeriesSequence")
    if seq:
        return str(seq[0].SeriesInstanceUID)
    return None


def referenced_instances(seg: Dataset) -> set[str]:
    out = set()
    for item in seg.get("ReferencedSeriesSequence", []) or []:
        for inst in item.get("ReferencedInstanceSequence", []) or []:
            out.add(str(inst.ReferencedSOPInstanceUID))
    return out


def _norm(text: str) -> str:
    return re.sub(r"[^a-z]", "", str(text).lower())


_LESION_KEYS = {}
for _c in LESIONS:
    for _k in (_c, LESION_NAMES[_c], LESION_NAMES[_c].rstrip("s"), LESION_NAMES[_c].replace("Haem", "Hem")):
        _LESION_KEYS[_norm(_k)] = _c
    _LESION_KEYS[_norm(LESION_NAMES[_c].replace("Haem", "Hem").rstrip("s"))] = _c
_LESION_KEYS.update({_norm("hemorrhage"): "HE", _norm("exudate"): "EX", _norm("exudates"): "EX",
                     _norm("cotton wool spot"): "SE", _norm("cotton wool spots"): "SE"})


def segment_lesion(item: Dataset) -> str | None:
    """The lesion a segment describes (by our code, else by its label), or None."""
    for seq in ("SegmentedPropertyTypeCodeSequence",):
        for code in item.get(seq, []) or []:
            if str(code.get("CodingSchemeDesignator", "")) == CODING_SCHEME and str(code.CodeValue) in LESIONS:
                return str(code.CodeValue)
    for text in (item.get("SegmentLabel", ""), *(str(c.get("CodeMeaning", "")) for c in item.get("SegmentedPropertyTypeCodeSequence", []) or [])):
        code = _LESION_KEYS.get(_norm(text))
        if code:
            return code
    return None


def seg_to_label_map(seg: Dataset, shape: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) uint8 label map (0-4) of a 2-D SEG; segments that name no lesion raise SegError."""
    if str(seg.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise SegError(f"not a DICOM SEG (SOP class {seg.get('SOPClassUID', '?')})")
    rows, cols = int(seg.Rows), int(seg.Columns)
    if shape is not None and (rows, cols) != tuple(shape):
        raise SegError(f"SEG frames are {cols}x{rows} but the image is {shape[1]}x{shape[0]}")
    lesion_of: dict[int, str] = {}
    unknown = []
    for item in seg.SegmentSequence:
        code = segment_lesion(item)
        if code is None:
            unknown.append(str(item.get("SegmentLabel", item.SegmentNumber)))
        else:
            lesion_of[int(item.SegmentNumber)] = code
    frames = seg.pixel_array
    n = int(getattr(seg, "NumberOfFrames", 1) or 1)
    frames = frames.reshape(n, rows, cols)
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n:
        raise SegError(f"SEG has {n} frames but {len(per_frame)} per-frame functional groups")
    masks: dict[str, np.ndarray] = {}
    seg_type = str(seg.get("SegmentationType", "BINARY")).upper()
    threshold = 0.5 * float(seg.get("MaximumFractionalValue", 255) or 255) if seg_type == "FRACTIONAL" else 0.5
    for i, fg in enumerate(per_frame):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        code = lesion_of.get(number)
        if code is None:
            if frames[i].any():
                raise SegError(f"segment {number} ({', '.join(unknown) or '?'}) names no lesion; "
                               f"segments must be MA/HE/EX/SE (Microaneurysms, Haemorrhages, Hard exudates, Soft exudates)")
            continue
        m = frames[i] > threshold
        masks[code] = masks[code] | m if code in masks else m
    return label_map_from_masks(masks, shape=(rows, cols))


def seg_timestamp(seg: Dataset) -> str:
    """Sortable creation time of a SEG (newest label wins when several reference one image)."""
    date = str(seg.get("ContentDate", "") or seg.get("SeriesDate", "") or seg.get("InstanceCreationDate", ""))
    time = str(seg.get("ContentTime", "") or seg.get("SeriesTime", "") or seg.get("InstanceCreationTime", ""))
    hms, _, frac = time.partition(".")
    return f"{date:0<8}{hms:0<6}.{frac:0<6}"
