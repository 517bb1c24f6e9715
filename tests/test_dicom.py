"""Fundus photographs in DICOM: `monailabel-dr to-dicom` (Ophthalmic Photography), lesion labels as
DICOM SEG, and the app on a real Orthanc over DICOMweb (`--studies http://127.0.0.1:PORT/dicom-web`).

The Orthanc tests start their own loopback Orthanc (Debian `orthanc` + `orthanc-dicomweb`, installed
by the set-up when missing) in a temporary folder, stop and restart it mid-session, and check with
Orthanc's own REST API what reached the server.
"""

from __future__ import annotations

import io as _io
import json
import subprocess

import cv2
import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import UID

from conftest import serve_in_process, tiny_conf
from dicom_support import phantom_label_map, require_debs, running_orthanc, write_phantom_photos
from monailabel_dr import cli
from monailabel_dr.dicom import photo, seg as dseg
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.lesions import LESION_VALUES
from monailabel_dr.fundus.phantoms import make_phantom

OP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def _to_dicom(capsys, *args) -> list[dict]:
    rc = cli.main(["to-dicom", *map(str, args)])
    out, _to_dicom.err = capsys.readouterr()
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rc == 0, out
    return recs


# ============================================================================ to-dicom
def test_to_dicom_rgb_png_round_trip_is_exact(tmp_path, capsys):
    ph = make_phantom(7, size=(240, 320))
    src = tmp_path / "in" / "P007_left.png"
    fio.write_image(src, ph.image)
    rec, = _to_dicom(capsys, src, "--out", tmp_path / "out")
    ds = pydicom.dcmread(rec["dicom"])
    assert ds.SOPClassUID == OP_SOP_CLASS and ds.file_meta.MediaStorageSOPClassUID == OP_SOP_CLASS
    assert ds.Modality == "OP"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated, ds.PlanarConfiguration) == (3, "RGB", 8, 0)
    assert (ds.Rows, ds.Columns) == (240, 320)
    assert ds.ImageLaterality == "L" and rec["laterality_source"] == "file name"
    assert ds.PatientID == "P007" and ds.LossyImageCompression == "00"
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        assert UID(uid).is_valid
    assert len({ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}) == 3
    # the decoded DICOM holds exactly the source's pixels
    decoded = ds.pixel_array
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, fio.read_image(src)) and np.array_equal(decoded, ph.image)
    assert np.array_equal(photo.read_photo(rec["dicom"]), ph.image)
    # converting again gives the same instance (idempotent uploads); the other eye of the patient joins the study
    again, = _to_dicom(capsys, src, "--out", tmp_path / "out2")
    assert (again["SeriesInstanceUID"], again["SOPInstanceUID"]) == (rec["SeriesInstanceUID"], rec["SOPInstanceUID"])
    fio.write_image(tmp_path / "in" / "P007_right.png", make_phantom(8, size=(240, 320)).image)
    other, = _to_dicom(capsys, tmp_path / "in" / "P007_right.png", "--out", tmp_path / "out")
    assert other["laterality"] == "R" and other["StudyInstanceUID"] == rec["StudyInstanceUID"]
    assert other["SeriesInstanceUID"] != rec["SeriesInstanceUID"]


@pytest.mark.parametrize("name,expected", [
    ("10_left.jpeg", "L"), ("10_right.jpeg", "R"), ("IM001_OD.png", "R"), ("scan-OS-2.tif", "L"),
    ("IMG001R.png", "R"), ("IDRiD_01.jpg", None), ("portrait.png", None), ("left_right.png", None),
])
def test_laterality_from_file_name(name, expected):
    assert photo.laterality_from_name(name) == expected


def test_to_dicom_laterality_csv_flag_and_unknown(tmp_path, capsys):
    img = make_phantom(3, size=(200, 260)).image
    for name in ("A_right.png", "B.png", "C.png"):
        fio.write_image(tmp_path / "in" / name, img)
    (tmp_path / "eyes.csv").write_text("image,eye,patient_id\nA_right.jpg,left,PAT-A\nB.png,OD,PAT-B\n")
    recs = {r["source"].rsplit("/", 1)[1]: r for r in _to_dicom(capsys, tmp_path / "in", "--out", tmp_path / "o",
                                                               "--csv", tmp_path / "eyes.csv")}
    err = _to_dicom.err
    assert recs["A_right.png"]["laterality"] == "L" and recs["A_right.png"]["laterality_source"] == "csv"  # the CSV wins
    assert recs["A_right.png"]["patient_id"] == "PAT-A"
    assert recs["B.png"]["laterality"] == "R"
    assert recs["C.png"]["laterality"] is None
    ds = pydicom.dcmread(recs["C.png"]["dicom"])
    assert "ImageLaterality" not in ds and ds.Laterality == ""   # not guessed
    flagged, = _to_dicom(capsys, tmp_path / "in" / "C.png", "--out", tmp_path / "o2", "--laterality", "right")
    assert flagged["laterality"] == "R" and flagged["laterality_source"] == "flag"
    assert pydicom.dcmread(flagged["dicom"]).ImageLaterality == "R"
    with pytest.raises(SystemExit, match="laterality"):
        cli.main(["to-dicom", str(tmp_path / "in" / "C.png"), "--out", str(tmp_path / "o3"), "--laterality", "up"])
    assert "C.png: laterality unknown" in err and "A_right.png" not in err


def test_to_dicom_jpeg_grey_and_16bit(tmp_path, capsys):
    ph = make_phantom(11, size=(200, 260))
    jpg = tmp_path / "j_left.jpg"
    fio.write_image(jpg, ph.image)
    grey = tmp_path / "g_left.png"
    fio.write_image(grey, ph.image[..., 1])
    wide = tmp_path / "w_left.png"
    sixteen = (ph.image.astype(np.uint16) * 257 + 100).astype(np.uint16)
    cv2.imwrite(str(wide), cv2.cvtColor(sixteen, cv2.COLOR_RGB2BGR))
    recs = {r["source"].rsplit("/", 1)[1]: r for r in _to_dicom(capsys, jpg, grey, wide, "--out", tmp_path / "o")}
    dj = pydicom.dcmread(recs["j_left.jpg"]["dicom"])
    assert dj.LossyImageCompression == "01" and dj.LossyImageCompressionMethod == "ISO_10918_1"
    assert np.array_equal(dj.pixel_array, fio.read_image(jpg))        # the decoded JPEG, kept exactly
    dg = pydicom.dcmread(recs["g_left.png"]["dicom"])
    assert (dg.PhotometricInterpretation, dg.SamplesPerPixel) == ("MONOCHROME2", 1)
    assert np.array_equal(dg.pixel_array, ph.image[..., 1])
    dw = pydicom.dcmread(recs["w_left.png"]["dicom"])
    assert dw.ImageType[0] == "DERIVED" and "8 bits" in dw.DerivationDescription
    expected = ((sixteen.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    assert np.array_equal(dw.pixel_array, expected)


def test_to_dicom_refuses_what_it_cannot_convert(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rc = cli.main(["to-dicom", str(tmp_path / "bad.png"), "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 1 and "error" in json.loads(out.splitlines()[0])
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["to-dicom", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")])


# ============================================================================ DICOM SEG
def _source(tmp_path, capsys, seed=21, name=None):
    ph = make_phantom(seed, size=(240, 320), grade=4)
    src = tmp_path / f"{name or f'S{seed}'}_{ph.info['laterality']}.png"
    fio.write_image(src, ph.image)
    rec, = _to_dicom(capsys, src, "--out", tmp_path / "dcm")
    return ph, pydicom.dcmread(rec["dicom"])


def test_seg_round_trip_references_the_photograph(tmp_path, capsys):
    ph, source = _source(tmp_path, capsys)
    label = phantom_label_map(ph)
    assert len(np.unique(label)) > 2
    seg = dseg.label_map_to_seg(label, source)
    seg.save_as(tmp_path / "seg.dcm")
    back = pydicom.dcmread(tmp_path / "seg.dcm")
    assert back.SOPClassUID == dseg.SEG_SOP_CLASS and back.Modality == "SEG"
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == source.PatientID
    assert dseg.referenced_series(back) == source.SeriesInstanceUID
    assert dseg.referenced_instances(back) == {source.SOPInstanceUID}
    for fg in back.PerFrameFunctionalGroupsSequence:
        assert fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert [s.SegmentLabel for s in back.SegmentSequence] == ["Microaneurysms", "Haemorrhages", "Hard exudates", "Soft exudates"]
    assert np.array_equal(dseg.seg_to_label_map(back, shape=(240, 320)), label)
    empty = dseg.label_map_to_seg(np.zeros((240, 320), np.uint8), source)
    assert not dseg.seg_to_label_map(empty).any()
    with pytest.raises(dseg.SegError, match="320x240"):
        dseg.label_map_to_seg(np.zeros((100, 100), np.uint8), source)
    with pytest.raises(dseg.SegError, match="0-4"):
        dseg.label_map_to_seg(np.full((240, 320), 7, np.uint8), source)


def test_seg_reader_maps_other_tools_segments_by_name(tmp_path, capsys):
    import highdicom as hd

    _, source = _source(tmp_path, capsys, seed=22)
    meta = dseg._source_metadata(source)
    he = np.zeros((240, 320), bool)
    he[50:80, 60:100] = True
    ex = np.zeros((240, 320), bool)
    ex[70:90, 90:130] = True          # overlaps the haemorrhage: the smaller lesion (HE) wins, as in the IDRiD import
    cat = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")

    def desc(n, label):
        return hd.seg.SegmentDescription(n, label, cat, hd.sr.CodedConcept(f"X{n}", "99OTHER", label),
                                         hd.seg.SegmentAlgorithmTypeValues.MANUAL)

    other = hd.seg.Segmentation([meta], np.stack([ex, he], axis=-1)[None].astype(np.uint8),
                                hd.seg.SegmentationTypeValues.BINARY, [desc(1, "Hard exudate"), desc(2, "Hemorrhage")],
                                hd.UID(), 5, hd.UID(), 1, "other", "other", "1", "0")
    lab = dseg.seg_to_label_map(other, shape=(240, 320))
    assert lab[60, 70] == LESION_VALUES["HE"] and lab[85, 120] == LESION_VALUES["EX"] and lab[75, 95] == LESION_VALUES["HE"]
    assert lab[0, 0] == 0
    unknown = hd.seg.Segmentation([meta], he[None].astype(np.uint8), hd.seg.SegmentationTypeValues.BINARY,
                                  [desc(1, "Optic disc")], hd.UID(), 5, hd.UID(), 1, "other", "other", "1", "0")
    with pytest.raises(dseg.SegError, match="names no lesion"):
        dseg.seg_to_label_map(unknown)


def test_seg_reader_reads_label_map_segs_as_ohif_saves_them(tmp_path, capsys):
    """OHIF 3 saves a segmentation drawn on a photograph as a Label Map SEG (SOP class 1.2.840.10008.5.1.4.1.1.66.7,
    SegmentationType LABELMAP: one 8-bit frame whose values are segment numbers), with segments named as the
    annotator left them ("Segment 1" unless renamed)."""
    import io as _io

    _, source = _source(tmp_path, capsys, seed=24)
    buf = _io.BytesIO()
    dseg.label_map_to_seg(np.zeros((240, 320), np.uint8), source).save_as(buf)   # its segment descriptions, reused
    seg = pydicom.dcmread(_io.BytesIO(buf.getvalue()))
    seg.SOPClassUID = dseg.LABELMAP_SEG_SOP_CLASS
    seg.SegmentationType = "LABELMAP"
    seg.NumberOfFrames = 1
    seg.BitsAllocated, seg.BitsStored, seg.HighBit = 8, 8, 7
    seg.PhotometricInterpretation = "MONOCHROME2"
    seg.SegmentSequence = seg.SegmentSequence[:2]   # MA (1), HE (2)
    seg.SegmentSequence[1].SegmentLabel = "Segment 1"
    code = seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]   # OHIF's default: SCT Tissue
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "85756007", "SCT", "Tissue"
    seg.PerFrameFunctionalGroupsSequence = seg.PerFrameFunctionalGroupsSequence[:1]
    del seg.PerFrameFunctionalGroupsSequence[0].SegmentIdentificationSequence
    values = np.zeros((240, 320), np.uint8)
    values[10:20, 10:30] = 1
    values[100:140, 150:200] = 2
    seg.PixelData = values.tobytes()
    with pytest.raises(dseg.SegError, match="Segment 1.*names no lesion"):
        dseg.seg_to_label_map(seg, shape=(240, 320))
    lab = dseg.seg_to_label_map(seg, shape=(240, 320), names=dseg.parse_segment_names("Segment 1=SE"))
    assert np.array_equal(lab == LESION_VALUES["MA"], values == 1)
    assert np.array_equal(lab == LESION_VALUES["SE"], values == 2)
    assert set(np.unique(lab).tolist()) == {0, LESION_VALUES["MA"], LESION_VALUES["SE"]}


def test_op_and_seg_pass_dciodvfy(tmp_path, capsys):
    """dicom3tools' IOD validator: no errors for an OP with known laterality, nor for its SEG."""
    require_debs(("dicom3tools",), ("dciodvfy",))
    ph, source = _source(tmp_path, capsys, seed=23)
    path = tmp_path / "dcm" / f"S23_{ph.info['laterality']}.dcm"
    seg_path = tmp_path / "seg.dcm"
    dseg.label_map_to_seg(phantom_label_map(ph), source).save_as(seg_path)
    proposal_path = tmp_path / "proposal.dcm"   # a model's answer: AUTOMATIC segments (issue 20)
    dseg.label_map_to_seg(phantom_label_map(ph), source, proposal=dseg.Proposal("lesion_seg", "lesion_seg.pt")).save_as(proposal_path)
    # OHIF 3 opens a SEG only with a shared Pixel Measures item; an uncalibrated photograph gives an empty one
    for p in (seg_path, proposal_path):
        shared = pydicom.dcmread(p).SharedFunctionalGroupsSequence
        assert len(shared) == 1 and len(shared[0].PixelMeasuresSequence) == 1
    for p, iod in ((path, "OphthalmicPhotography8BitImage"), (seg_path, "Segmentation"), (proposal_path, "Segmentation")):
        res = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True)
        text = res.stdout + res.stderr
        assert iod in text, text
        errors = [ln for ln in text.splitlines() if ln.startswith("Error")]
        assert not errors, f"{p.name}: {errors}"


# ============================================================================ the app on Orthanc
N_IMAGES = 10
LABELLED = 8


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def uploaded(orthanc, tmp_path_factory):
    """Phantom photographs converted with `to-dicom --upload` into Orthanc: {SeriesInstanceUID: (phantom, record)}."""
    folder = tmp_path_factory.mktemp("photos")
    phantoms = write_phantom_photos(folder / "png", list(range(300, 300 + N_IMAGES)))
    rc = cli.main(["to-dicom", str(folder / "png"), "--out", str(folder / "dcm"), "--upload", orthanc.dicomweb_url])
    assert rc == 0
    out = {}
    for stem, ph in phantoms.items():
        ds = pydicom.dcmread(folder / "dcm" / f"{stem}.dcm")
        out[str(ds.SeriesInstanceUID)] = (ph, {"SOPInstanceUID": str(ds.SOPInstanceUID), "stem": stem,
                                               "StudyInstanceUID": str(ds.StudyInstanceUID)})
    assert len(orthanc.rest("/series")) == N_IMAGES
    return out


def _conf(tmp_path, cache: str, model: str = "model", **extra):
    return tiny_conf(tmp_path / model, dicomweb_cache=str(tmp_path / cache), dicomweb_refresh=0, dicomweb_retries=2,
                     lesion_seg_image_size=96, **extra)


def _png_label(label: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(".png", label.astype(np.uint8))
    assert ok
    return enc.tobytes()


def _orthanc_segs(orthanc) -> dict[str, pydicom.Dataset]:
    """Every SEG instance in Orthanc (its own REST API), by the image series it references."""
    out = {}
    for sid in orthanc.rest("/series"):
        s = orthanc.rest(f"/series/{sid}")
        if s["MainDicomTags"].get("Modality") != "SEG":
            continue
        for iid in s["Instances"]:
            r = requests.get(f"{orthanc.url}/instances/{iid}/file", timeout=30)
            ds = pydicom.dcmread(_io.BytesIO(r.content))
            out.setdefault(dseg.referenced_series(ds), []).append(ds)
    return out


def _read_label(client, image_id, tmp_path) -> np.ndarray:
    r = client.get(f"/datastore/label?label={image_id}&tag=final")
    assert r.status_code == 200, r.text
    p = tmp_path / f"lab_{abs(hash(image_id))}.png"
    p.write_bytes(r.content)
    return fio.read_label(p)


@pytest.mark.dicomweb
def test_dicomweb_round_trip_infer_seg_readback_train(orthanc, uploaded, tmp_path):
    ids = sorted(uploaded)
    labelled = ids[:LABELLED]
    with serve_in_process(orthanc.dicomweb_url, _conf(tmp_path, "cache1")) as c:
        # the OP series are listed, fetched and cached as exact 2-D RGB photographs
        ds = c.get("/datastore/?output=all").json()
        assert set(ds["objects"]) == set(ids)
        status = c.get("/datastore/").json()
        assert status["total"] == N_IMAGES and status["dicomweb"]["reachable"] is True and not status["dicomweb"]["skipped"]
        one = ids[0]
        info = ds["objects"][one]["image"]["info"]
        assert info["Modality"] == "OP" and info["SOPInstanceUID"] == uploaded[one][1]["SOPInstanceUID"]
        assert info["ImageLaterality"] == uploaded[one][0].info["laterality"][0].upper()
        r = c.get(f"/datastore/image?image={one}")
        assert r.status_code == 200
        (tmp_path / "cached.png").write_bytes(r.content)
        assert np.array_equal(fio.read_image(tmp_path / "cached.png"), uploaded[one][0].image)

        # final lesion labels (and grades) saved through MONAI Label's REST API
        for image_id in labelled:
            ph = uploaded[image_id][0]
            r = c.put(f"/datastore/label?image={image_id}&tag=final",
                      files={"label": ("grade.json", json.dumps({"grade": ph.grade}))})
            assert r.status_code == 200, r.text
            r = c.put(f"/datastore/label?image={image_id}&tag=final",
                      files={"label": (f"{image_id}.png", _png_label(phantom_label_map(ph)))})
            assert r.status_code == 200, r.text
            assert r.json()["dicomweb"]["state"] == "stored", r.json()
        assert c.get("/datastore/").json()["dicomweb"]["pending_uploads"] == []

        # ... reached Orthanc as DICOM SEG referencing the source photograph
        segs = _orthanc_segs(orthanc)
        assert set(segs) == set(labelled)
        for image_id in labelled:
            s, = segs[image_id]
            assert s.SOPClassUID == dseg.SEG_SOP_CLASS and s.StudyInstanceUID == uploaded[image_id][1]["StudyInstanceUID"]
            assert dseg.referenced_instances(s) == {uploaded[image_id][1]["SOPInstanceUID"]}
            assert np.array_equal(dseg.seg_to_label_map(s), phantom_label_map(uploaded[image_id][0]))

        # every model trains on the DICOMweb datastore, and every infer task runs on a DICOMweb image
        for model, epochs in (("lesion_seg", 2), ("grading", 1), ("lesion_sam", 1), ("twlr", 1)):
            r = c.post(f"/train/{model}?run_sync=true", json={"max_epochs": epochs})
            assert r.status_code == 200, f"{model}: {r.text}"
        infers = c.get("/info/").json()["models"]
        assert {"grading", "cam", "lesion_seg", "lesion_sam", "twlr_vlm", "twlr_inpaint"} <= set(infers)
        target = ids[-1]   # an unlabelled one
        for name in infers:
            params = {"t_max": 1} if name == "twlr_inpaint" else {}
            r = c.post(f"/infer/{name}?image={target}&output=json", data={"params": json.dumps(params)})
            assert r.status_code == 200, f"{name}: {r.text}"
        r = c.post(f"/infer/grading?image={target}&output=json")
        assert 0 <= r.json()["grade"] <= 4
        r = c.post(f"/infer/lesion_seg?image={target}&output=image")
        (tmp_path / "pred.png").write_bytes(r.content)
        pred = fio.read_label(tmp_path / "pred.png")
        assert pred.shape == (240, 320) and set(np.unique(pred)) <= {0, 1, 2, 3, 4}

        # a second correction replaces the first: a new SEG; the newest one counts
        changed = phantom_label_map(uploaded[one][0])
        changed[:20, :20] = LESION_VALUES["SE"]
        r = c.put(f"/datastore/label?image={one}&tag=final", files={"label": (f"{one}.png", _png_label(changed))})
        assert r.status_code == 200 and r.json()["dicomweb"]["state"] == "stored"
        assert len(_orthanc_segs(orthanc)[one]) == 2

    # a fresh cache (another machine, or the cache wiped): the labels come back from Orthanc, identical
    with serve_in_process(orthanc.dicomweb_url, _conf(tmp_path, "cache2", model="model2")) as c:
        ds = c.get("/datastore/?output=all").json()
        with_labels = {k for k, v in ds["objects"].items() if "final" in v["labels"]}
        assert with_labels == set(labelled)
        assert np.array_equal(_read_label(c, one, tmp_path), changed)
        for image_id in labelled[1:]:
            assert np.array_equal(_read_label(c, image_id, tmp_path), phantom_label_map(uploaded[image_id][0]))
        # retraining reads them back (a fresh model dir: nothing to start from but the SEGs)
        r = c.post("/train/lesion_seg?run_sync=true", json={"max_epochs": 1})
        assert r.status_code == 200, r.text
        assert (tmp_path / "model2" / "lesion_seg.pt").is_file()
        # what cannot be done over DICOMweb says so
        assert c.delete(f"/datastore/image?id={one}").status_code == 405


@pytest.mark.dicomweb
def test_orthanc_restart_mid_session_loses_nothing(orthanc, uploaded, tmp_path):
    ids = sorted(uploaded)
    image_id = ids[-2]      # no label yet
    label = phantom_label_map(uploaded[image_id][0])
    conf = _conf(tmp_path, "cache", lesion_seg_max_epochs=1)
    with serve_in_process(orthanc.dicomweb_url, conf) as c:
        assert c.get("/datastore/").json()["total"] == N_IMAGES
        orthanc.stop()
        # listing and the cached photographs keep working; the status says the server is away
        st = c.get("/datastore/").json()
        assert st["total"] == N_IMAGES and st["dicomweb"]["reachable"] is False
        assert orthanc.dicomweb_url in st["dicomweb"]["last_error"] and "unreachable" in st["dicomweb"]["last_error"]
        # a label saved now is kept (200, "pending"), readable at once, and queued on disk
        r = c.put(f"/datastore/label?image={image_id}&tag=final", files={"label": (f"{image_id}.png", _png_label(label))})
        assert r.status_code == 200, r.text
        up = r.json()["dicomweb"]
        assert up["state"] == "pending" and "uploaded as DICOM SEG when" in up["detail"]
        assert np.array_equal(_read_label(c, image_id, tmp_path), label)
        assert [p["image"] for p in c.get("/datastore/").json()["dicomweb"]["pending_uploads"]] == [image_id]
        # training and inference run from the cache
        r = c.post("/train/lesion_seg?run_sync=true", json={"max_epochs": 1})
        assert r.status_code == 200, r.text
        assert c.post(f"/infer/lesion_seg?image={ids[0]}&output=json").status_code == 200
        # adding an image needs the server: a clear 503, nothing stored
        fio.write_image(tmp_path / "new_left.png", make_phantom(999, size=(240, 320)).image)
        with open(tmp_path / "new_left.png", "rb") as f:
            r = c.put("/datastore/image?image=new_left", files={"file": ("new_left.png", f)})
        assert r.status_code == 503 and "unreachable" in r.json()["detail"], r.text
        assert c.get("/datastore/").json()["total"] == N_IMAGES
    # the app restarts while the server is still down: it starts from the cache, the upload still queued
    with serve_in_process(orthanc.dicomweb_url, conf) as c:
        st = c.get("/datastore/").json()
        assert st["dicomweb"]["reachable"] is False and [p["image"] for p in st["dicomweb"]["pending_uploads"]] == [image_id]
        orthanc.start()
        st = c.get("/datastore/").json()     # the next refresh pushes the queued SEG
        assert st["dicomweb"]["reachable"] is True and st["dicomweb"]["pending_uploads"] == [], st
        info = c.get(f"/datastore/label/info?label={image_id}&tag=final").json()
        assert info["dicom_seg"]["state"] == "stored", info
        # now the new image can be added: stored in Orthanc as OP, listed under its SeriesInstanceUID
        with open(tmp_path / "new_left.png", "rb") as f:
            r = c.put("/datastore/image?image=new_left", files={"file": ("new_left.png", f)})
        assert r.status_code == 200, r.text
        new_id = r.json()["image"]
        assert UID(new_id).is_valid and new_id in c.get("/datastore/?output=all").json()["objects"]
    segs = _orthanc_segs(orthanc)
    s, = segs[image_id]
    assert np.array_equal(dseg.seg_to_label_map(s), label)
    assert dseg.referenced_instances(s) == {uploaded[image_id][1]["SOPInstanceUID"]}
    # and another cache reads it back from Orthanc
    with serve_in_process(orthanc.dicomweb_url, _conf(tmp_path, "cache_b", model="model_b")) as c:
        assert np.array_equal(_read_label(c, image_id, tmp_path), label)
        assert new_id in c.get("/datastore/?output=all").json()["objects"]
        # a SEG deleted in the server takes the cached label with it
        seg_series = c.get(f"/datastore/label/info?label={image_id}&tag=final").json()["dicom_seg"]["SeriesInstanceUID"]
        oid = requests.post(f"{orthanc.url}/tools/lookup", data=seg_series, timeout=10).json()[0]["ID"]
        assert requests.delete(f"{orthanc.url}/series/{oid}", timeout=10).status_code == 200
        objects = c.get("/datastore/?output=all").json()["objects"]
        assert "final" not in objects[image_id]["labels"]
        # a .dcm upload goes to the server as it is; a photograph without a field of view is listed as skipped
        ph = make_phantom(1001, size=(240, 320))
        fio.write_image(tmp_path / "up" / "U1_right.png", ph.image)
        rec = photo.convert_file(tmp_path / "up" / "U1_right.png", tmp_path / "up")
        with open(rec["dicom"], "rb") as f:
            r = c.put("/datastore/image", files={"file": ("U1_right.dcm", f)})
        assert r.status_code == 200 and r.json()["image"] == rec["SeriesInstanceUID"], r.text
        flat = photo.photo_to_dataset(np.full((240, 320, 3), 128, np.uint8), photo.PhotoMeta(patient_id="FLAT", laterality="L"))
        from monailabel_dr.dicom.web import DicomWeb

        DicomWeb(orthanc.dicomweb_url).store([flat])
        st = c.get("/datastore/").json()
        assert "field of view" in st["dicomweb"]["skipped"][str(flat.SeriesInstanceUID)]["reason"]
        assert str(flat.SeriesInstanceUID) not in c.get("/datastore/?output=all").json()["objects"]
