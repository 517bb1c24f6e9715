"""Lesion label maps (0 background, 1 MA, 2 HE, 3 EX, 4 SE) as DICOM Segmentation objects.

Writing uses highdicom: one BINARY segment per lesion (segment number = label value, all
four always described, empty frames kept so a label map round-trips exactly), derived
from the single-frame source photograph it references (Referenced Series Sequence and a
Source Image Sequence per frame). Segment types are coded in a private scheme
(``99MLDR``, DICOM's convention for local codes) under the SNOMED CT category
"Morphologically abnormal structure".

Reading accepts any 2-D SEG whose frames have the photograph's size (ours, OHIF's,
dcmqi's): each segment is matched to a lesion by its code or label (MA / Microaneurysms,
...), or by a table of extra segment names (``segment_names``); where segments overlap, MA wins
over HE over SE over EX, as in the IDRiD import.

Labels and proposals: a label map saved as a final label is written with MANUAL segments; a model's
answer (:class:`Proposal`) with AUTOMATIC segments, the model in the Algorithm Identification of
every segment, in the series description and the content creator, and its checkpoint and time in the
content description. The rule that keeps a proposal from being taken for a label
(:func:`is_proposal`): **a SEG whose segments are all AUTOMATIC is a model proposal**; a SEG with at
least one MANUAL or SEMIAUTOMATIC segment is a person's label.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from pydicom.dataset import Dataset

from monailabel_dr import __version__
from monailabel_dr.fundus.io import label_values
from monailabel_dr.fundus.lesions import LESION_COLORS, LESION_NAMES, LESION_VALUES, LESIONS, label_map_from_masks

logger = logging.getLogger(__name__)

CODING_SCHEME = "99MLDR"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# Label Map Segmentation Storage (DICOM 2024, Supplement 243): one frame whose values are segment numbers; what
# OHIF 3 (3.13.2 checked) stores when an annotator saves a segmentation drawn on a photograph
LABELMAP_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
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


PROPOSAL_CONTENT_LABEL = "AI_PROPOSAL"


@dataclass(frozen=True)
class Proposal:
    """Who made a SEG that is a model's answer, not a person's label."""

    model: str                   # the app's model name, e.g. lesion_seg
    checkpoint: str = ""         # the served checkpoint's file name
    trained: str = ""            # when it was trained / modified (ISO time), and how far (e.g. "epoch 45")

    @property
    def series_description(self) -> str:
        return f"monailabel-dr {self.model} proposal (AUTOMATIC)"[:64]

    def content_description(self, when: str) -> str:
        return " ".join(x for x in (self.model, self.checkpoint, self.trained, "at " + when) if x)[:64]


def segment_descriptions(levels: Mapping[str, int] | None = None, proposal: Proposal | None = None):
    """One BINARY segment per value: the four lesions (default), or ``levels`` {name: value} (names that are
    lesion codes get the lesion coding; others, e.g. a CAM's levels, a local code). MANUAL, or AUTOMATIC with
    the proposal's model as the algorithm."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = None
    kind = hd.seg.SegmentAlgorithmTypeValues.MANUAL
    if proposal is not None:
        kind = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = hd.AlgorithmIdentificationSequence(
            name=proposal.model, family=codes.cid7162.ArtificialIntelligence,
            version=(proposal.checkpoint or "untracked")[:64])
    levels = dict(levels) if levels is not None else {code: LESION_VALUES[code] for code in LESIONS}
    out = []
    for name, value in sorted(levels.items(), key=lambda kv: kv[1]):
        if name in LESIONS:
            label, category = LESION_NAMES[name], hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
            prop, colour = hd.sr.CodedConcept(name, CODING_SCHEME, LESION_NAMES[name]), LESION_COLORS[name]
        else:
            label, category = str(name)[:64], hd.sr.CodedConcept("LEVEL", CODING_SCHEME, "Model output level")
            prop, colour = hd.sr.CodedConcept(f"LEVEL{int(value)}", CODING_SCHEME, str(name)[:64]), None
        d = hd.seg.SegmentDescription(segment_number=int(value), segment_label=label,
                                      segmented_property_category=category, segmented_property_type=prop,
                                      algorithm_type=kind, algorithm_identification=algorithm)
        if colour is not None:
            d.RecommendedDisplayCIELabValue = list(_rgb_to_cielab_dicom(colour))
        out.append(d)
    return out


def is_proposal(seg: Dataset) -> bool:
    """A model's proposal, never a final label: every segment's Segment Algorithm Type is AUTOMATIC (works on the
    full SEG and on its DICOMweb metadata)."""
    items = list(seg.get("SegmentSequence", []) or [])
    return bool(items) and all(str(it.get("SegmentAlgorithmType", "")).upper() == "AUTOMATIC" for it in items)


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
                     content_label: str = "LESIONS", creator: str = "", proposal: Proposal | None = None,
                     levels: Mapping[str, int] | None = None) -> Dataset:
    """A DICOM SEG of an (H, W) label map derived from ``source``: a lesion label map (values 0-4, MANUAL
    segments), or with ``proposal`` a model's answer (AUTOMATIC segments; ``levels`` {name: value} when its
    values are not the lesions, e.g. the CAM's levels)."""
    import highdicom as hd

    arr = np.asarray(label)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.shape != (int(source.Rows), int(source.Columns)):
        raise SegError(f"label map is {arr.shape[1]}x{arr.shape[0]} but the source image is "
                       f"{source.Columns}x{source.Rows} (width x height)")
    top = max(levels.values()) if levels else len(LESIONS)
    if arr.size and (arr.min() < 0 or arr.max() > top):
        raise SegError(f"label values must be 0-{top}; found {np.unique(arr).tolist()[:10]}")
    now = _dt.datetime.now()
    if proposal is not None:
        description = proposal.series_description
        content_label = PROPOSAL_CONTENT_LABEL
        content = proposal.content_description(now.strftime("%Y-%m-%dT%H:%M:%S"))
        creator = creator or f"monailabel-dr^{proposal.model}"
    else:
        description, content = SERIES_DESCRIPTION, "Diabetic retinopathy lesions (MA, HE, EX, SE)"
    seg = hd.seg.Segmentation(
        source_images=[_source_metadata(source)],
        pixel_array=arr.astype(np.uint8)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(levels, proposal),
        series_instance_uid=series_uid or hd.UID(),
        series_number=901 if proposal is not None else 900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="monailabel-dr",
        manufacturer_model_name="monailabel-dr",
        software_versions=f"monailabel-dr {__version__}",
        device_serial_number="0",
        series_description=description,
        content_label=content_label,
        content_description=content,
        content_creator_name=creator or None,
        omit_empty_frames=False,
    )
    seg.PatientOrientation = source.get("PatientOrientation", "")
    if not seg.get("SharedFunctionalGroupsSequence"):
        seg.SharedFunctionalGroupsSequence = [Dataset()]
    shared = seg.SharedFunctionalGroupsSequence[0]
    if not shared.get("PixelMeasuresSequence"):
        # A photograph without calibration (no Pixel Spacing) gives highdicom no pixel measures to share, and
        # the shared functional group item stays empty. OHIF 3 (3.13.2 checked) reads
        # SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0] of every SEG it opens and fails without
        # it, so the SEG carries a Pixel Measures item whose Pixel Spacing is present but empty: no spacing is
        # claimed. (An item with no attribute at all is dropped by Orthanc's DICOMweb metadata.)
        shared.PixelMeasuresSequence = [Dataset()]
    if not shared.get("PlaneOrientationSequence") and "ImageOrientationPatient" not in source:
        # Cornerstone's SEG reader (OHIF 3) compares the SEG's Image Orientation (Patient) with the one it gives
        # the source image, which for an image without one (a photograph) is rows along x, columns along y;
        # without it in the SEG it stops. The same identity here: it states the SEG's frames lie on the
        # photograph's own pixel grid, which they do (Spatial Locations Preserved: YES), and no Frame of
        # Reference is claimed.
        orientation = Dataset()
        orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        shared.PlaneOrientationSequence = [orientation]
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


def parse_segment_names(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """The extra segment-name table (``--conf seg_segment_names``): ``"Bleeding=HE,Drusen-like=EX"`` or a mapping;
    names compare without case, spaces or punctuation. A value that is not MA / HE / EX / SE is refused."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, Mapping) else (
        p.split("=", 1) if "=" in p else (p, "") for p in str(text).split(",") if p.strip())
    out = {}
    for name, code in pairs:
        name, code = str(name).strip(), str(code).strip().upper()
        if not _norm(name) or code not in LESIONS:
            raise ValueError(f"segment name table: {name!r}={code!r}; write NAME=LESION with LESION one of "
                             f"{', '.join(LESIONS)}, e.g. Bleeding=HE,Cotton wool=SE")
        out[_norm(name)] = code
    return out


def segment_lesion(item: Dataset, names: Mapping[str, str] | None = None) -> str | None:
    """The lesion a segment describes (by our code, else by its label or code meaning, through the built-in
    names and then ``names`` from :func:`parse_segment_names`), or None."""
    for seq in ("SegmentedPropertyTypeCodeSequence",):
        for code in item.get(seq, []) or []:
            if str(code.get("CodingSchemeDesignator", "")) == CODING_SCHEME and str(code.CodeValue) in LESIONS:
                return str(code.CodeValue)
    for text in (item.get("SegmentLabel", ""), *(str(c.get("CodeMeaning", "")) for c in item.get("SegmentedPropertyTypeCodeSequence", []) or [])):
        code = _LESION_KEYS.get(_norm(text)) or (names or {}).get(_norm(text))
        if code:
            return code
    return None


def seg_to_label_map(seg: Dataset, shape: tuple[int, int] | None = None,
                     names: Mapping[str, str] | None = None) -> np.ndarray:
    """(H, W) uint8 label map (0-4) of a 2-D SEG; segments that name no lesion (built-in names or ``names``)
    and hold pixels raise SegError."""
    sop_class = str(seg.get("SOPClassUID", ""))
    if sop_class not in (SEG_SOP_CLASS, LABELMAP_SEG_SOP_CLASS):
        raise SegError(f"not a DICOM SEG (SOP class {seg.get('SOPClassUID', '?')})")
    rows, cols = int(seg.Rows), int(seg.Columns)
    if shape is not None and (rows, cols) != tuple(shape):
        raise SegError(f"SEG frames are {cols}x{rows} but the image is {shape[1]}x{shape[0]}")
    lesion_of: dict[int, str] = {}
    unknown = []
    for item in seg.SegmentSequence:
        code = segment_lesion(item, names)
        if code is None:
            unknown.append(str(item.get("SegmentLabel", item.SegmentNumber)))
        else:
            lesion_of[int(item.SegmentNumber)] = code
    frames = seg.pixel_array
    n = int(getattr(seg, "NumberOfFrames", 1) or 1)
    frames = frames.reshape(n, rows, cols)
    seg_type = str(seg.get("SegmentationType", "BINARY")).upper()
    if sop_class == LABELMAP_SEG_SOP_CLASS or seg_type == "LABELMAP":
        return _labelmap_frames_to_label_map(frames, lesion_of, unknown, (rows, cols))
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n:
        raise SegError(f"SEG has {n} frames but {len(per_frame)} per-frame functional groups")
    masks: dict[str, np.ndarray] = {}
    threshold = 0.5 * float(seg.get("MaximumFractionalValue", 255) or 255) if seg_type == "FRACTIONAL" else 0.5
    for i, fg in enumerate(per_frame):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        code = lesion_of.get(number)
        if code is None:
            if frames[i].any():
                raise SegError(f"segment {number} ({', '.join(unknown) or '?'}) names no lesion; "
                               f"segments must be MA/HE/EX/SE (Microaneurysms, Haemorrhages, Hard exudates, Soft exudates), "
                               f"or be mapped by --conf seg_segment_names NAME=LESION")
            continue
        m = frames[i] > threshold
        masks[code] = masks[code] | m if code in masks else m
    return label_map_from_masks(masks, shape=(rows, cols))


def _labelmap_frames_to_label_map(frames: np.ndarray, lesion_of: Mapping[int, str], unknown: list[str],
                                  shape: tuple[int, int]) -> np.ndarray:
    """A label map SEG's frames (values = segment numbers, 0 = none) as the app's lesion label map; the frames of
    a 2-D photograph's SEG all lie on its one image, so they are combined."""
    masks: dict[str, np.ndarray] = {}
    present = set(label_values(frames).tolist()) - {0}
    stray = sorted(v for v in present if v not in lesion_of)
    if stray:
        raise SegError(f"segment {stray[0]} ({', '.join(unknown) or '?'}) names no lesion; segments must be "
                       f"MA/HE/EX/SE (Microaneurysms, Haemorrhages, Hard exudates, Soft exudates), or be mapped by "
                       f"--conf seg_segment_names NAME=LESION")
    for number, code in lesion_of.items():
        if number in present:
            m = (frames == number).any(axis=0)
            masks[code] = masks[code] | m if code in masks else m
    return label_map_from_masks(masks, shape=shape)


def seg_timestamp(seg: Dataset) -> str:
    """Sortable creation time of a SEG (newest label wins when several reference one image)."""
    date = str(seg.get("ContentDate", "") or seg.get("SeriesDate", "") or seg.get("InstanceCreationDate", ""))
    time = str(seg.get("ContentTime", "") or seg.get("SeriesTime", "") or seg.get("InstanceCreationTime", ""))
    hms, _, frac = time.partition(".")
    return f"{date:0<8}{hms:0<6}.{frac:0<6}"
