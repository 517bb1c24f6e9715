"""Model proposals in the PACS and corrections from it (issue 20, items 1-2), on a real loopback Orthanc.

- ``/infer/<model>?image=<series>&output=dicom_seg`` stores the answer as a DICOM SEG with AUTOMATIC
  segments referencing the photograph (model, checkpoint and time in its header) and answers its UIDs;
- such a SEG is listed as a proposal and never becomes the image's label;
- a SEG with MANUAL segments (as OHIF saves one) becomes the final label and counts for retrain on
  correction; segment names the app does not know are refused with the reason in ``/datastore``, or
  mapped by ``--conf seg_segment_names``;
- ``monailabel-dr preannotate`` stores a proposal beside every photograph that has none from the model.

Its own Orthanc (module-scoped): nothing here changes what ``test_dicom.py`` sees.
"""

from __future__ import annotations

import io as _io
import json

import cv2
import numpy as np
import pydicom
import pytest
import requests

from conftest import serve_in_process, tiny_conf
from dicom_support import phantom_label_map, running_orthanc, write_phantom_photos
from monailabel_dr import cli
from monailabel_dr.dicom import seg as dseg
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.lesions import LESION_VALUES

pytestmark = pytest.mark.dicomweb

N_IMAGES = 5


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc with 5 phantom photographs, 3 of them labelled (MANUAL SEGs saved through the app), and tiny
    lesion_seg and grading models trained on them: {orthanc, ids, phantoms, sop, model_dir, base}."""
    base = tmp_path_factory.mktemp("proposals")
    with running_orthanc(base / "orthanc") as orthanc:
        phantoms = write_phantom_photos(base / "png", list(range(400, 400 + N_IMAGES)))
        assert cli.main(["to-dicom", str(base / "png"), "--out", str(base / "dcm"), "--upload", orthanc.dicomweb_url]) == 0
        by_series, sop = {}, {}
        for stem, ph in phantoms.items():
            ds = pydicom.dcmread(base / "dcm" / f"{stem}.dcm")
            by_series[str(ds.SeriesInstanceUID)] = ph
            sop[str(ds.SeriesInstanceUID)] = str(ds.SOPInstanceUID)
        ids = sorted(by_series)
        conf = _conf(base, "cache0")
        with serve_in_process(orthanc.dicomweb_url, conf) as c:
            for image_id in ids[:3]:
                ph = by_series[image_id]
                r = c.put(f"/datastore/label?image={image_id}&tag=final",
                          files={"label": ("grade.json", json.dumps({"grade": ph.grade}))})
                assert r.status_code == 200, r.text
                r = c.put(f"/datastore/label?image={image_id}&tag=final",
                          files={"label": (f"{image_id}.png", _png(phantom_label_map(ph)))})
                assert r.status_code == 200, r.text
            for model in ("lesion_seg", "grading"):
                r = c.post(f"/train/{model}?run_sync=true", json={"max_epochs": 1})
                assert r.status_code == 200, f"{model}: {r.text}"
        yield {"orthanc": orthanc, "ids": ids, "phantoms": by_series, "sop": sop, "model_dir": base / "model", "base": base}


def _conf(base, cache: str, **extra) -> dict:
    return tiny_conf(base / "model", dicomweb_cache=str(base / cache), dicomweb_refresh=0, dicomweb_retries=2,
                     lesion_seg_image_size=96, models="lesion_seg,grading", **extra)


def _png(label: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(".png", label.astype(np.uint8))
    assert ok
    return enc.tobytes()


def _seg_from_orthanc(orthanc, series_uid: str) -> pydicom.Dataset:
    hits = [s for s in orthanc.rest("/series") if orthanc.rest(f"/series/{s}")["MainDicomTags"].get("SeriesInstanceUID") == series_uid]
    assert len(hits) == 1, f"series {series_uid} is not in Orthanc"
    iid, = orthanc.rest(f"/series/{hits[0]}")["Instances"]
    r = requests.get(f"{orthanc.url}/instances/{iid}/file", timeout=30)
    return pydicom.dcmread(_io.BytesIO(r.content))


def _final_labels(c) -> set[str]:
    objects = c.get("/datastore/?output=all").json()["objects"]
    return {k for k, v in objects.items() if "final" in v["labels"]}


def _stow(orthanc, ds: pydicom.Dataset, tmp_path) -> None:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, write_like_original=False)
    orthanc.upload(str(path))


def _manual_seg(source: pydicom.Dataset, masks: dict[str, np.ndarray], manufacturer: str = "OHIF"):
    """A SEG as another tool saves a person's drawing: MANUAL segments named in words."""
    import highdicom as hd

    cat = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
    descs = [hd.seg.SegmentDescription(i + 1, name, cat, hd.sr.CodedConcept(f"T{i + 1}", "99OHIF", name),
                                       hd.seg.SegmentAlgorithmTypeValues.MANUAL) for i, name in enumerate(masks)]
    pixels = np.stack([m.astype(np.uint8) for m in masks.values()], axis=-1)[None]
    return hd.seg.Segmentation([dseg._source_metadata(source)], pixels, hd.seg.SegmentationTypeValues.BINARY, descs,
                               hd.UID(), 7, hd.UID(), 1, manufacturer, manufacturer, "1", "0")


def test_infer_output_dicom_seg_stores_a_proposal_that_never_becomes_a_label(pacs, tmp_path):
    orthanc, ids = pacs["orthanc"], pacs["ids"]
    target = ids[3]                                   # unlabelled
    with serve_in_process(orthanc.dicomweb_url, _conf(pacs["base"], "cache_a")) as c:
        before = _final_labels(c)
        assert before == set(ids[:3])
        r = c.post(f"/infer/lesion_seg?image={target}&output=dicom_seg")
        assert r.status_code == 200, r.text
        answer = r.json()
        stored = answer["dicom_seg"]
        assert stored["algorithm_type"] == "AUTOMATIC" and stored["referenced_image"] == target
        assert answer["model"]["name"] == "lesion_seg" and "lesions" in answer   # the infer JSON comes too

        # in Orthanc: a SEG of the photograph, AUTOMATIC, with the model, checkpoint and time in its header
        seg = _seg_from_orthanc(orthanc, stored["SeriesInstanceUID"])
        assert dseg.is_proposal(seg) and dseg.referenced_instances(seg) == {pacs["sop"][target]}
        assert "lesion_seg" in seg.SeriesDescription and "AUTOMATIC" in seg.SeriesDescription
        assert "lesion_seg.pt" in seg.ContentDescription and seg.ContentLabel == dseg.PROPOSAL_CONTENT_LABEL
        assert {str(s.SegmentAlgorithmName) for s in seg.SegmentSequence} == {"lesion_seg"}
        # ... holding exactly the label map the same model answers as an image
        r = c.post(f"/infer/lesion_seg?image={target}&output=image")
        (tmp_path / "pred.png").write_bytes(r.content)
        assert np.array_equal(dseg.seg_to_label_map(seg), fio.read_label(tmp_path / "pred.png"))

        # a proposal is listed as one and is never the image's label
        status = c.get("/datastore/").json()["dicomweb"]
        assert [p["model"] for p in status["proposals"][target]] == ["lesion_seg"]
        assert _final_labels(c) == before

        # the CAM's levels as a SEG: one segment per level, a local code, AUTOMATIC
        r = c.post(f"/infer/cam?image={target}&output=dicom_seg")
        assert r.status_code == 200, r.text
        cam = _seg_from_orthanc(orthanc, r.json()["dicom_seg"]["SeriesInstanceUID"])
        assert dseg.is_proposal(cam) and [s.SegmentLabel for s in cam.SegmentSequence][0].startswith("CAM >=")

        # what output=dicom_seg cannot do says so, and stores nothing
        n_series = len(orthanc.rest("/series"))
        r = c.post(f"/infer/grading?image={target}&output=dicom_seg")
        assert r.status_code == 422 and "not a label map" in r.json()["detail"] and "lesion_seg" in r.json()["detail"]
        assert c.post(f"/infer/nope?image={target}&output=dicom_seg").status_code == 404
        r = c.post("/infer/lesion_seg?output=dicom_seg", files={"file": ("x.png", _png(np.zeros((8, 8))))})
        assert r.status_code == 422 and "SeriesInstanceUID" in r.json()["detail"]
        assert len(orthanc.rest("/series")) == n_series

    # a fresh cache reads the proposals back from the server as proposals, not labels
    with serve_in_process(orthanc.dicomweb_url, _conf(pacs["base"], "cache_b")) as c:
        assert target not in _final_labels(c)
        models = {p["model"] for p in c.get("/datastore/").json()["dicomweb"]["proposals"][target]}
        assert models == {"lesion_seg", "cam"}


def test_output_dicom_seg_on_a_folder_datastore_is_refused(tmp_path):
    from conftest import write_phantom_store

    store = write_phantom_store(tmp_path / "store", n=3, labelled=0)
    with serve_in_process(store, tiny_conf(tmp_path / "model", models="lesion_seg")) as c:
        r = c.post("/infer/lesion_seg?image=fundus_0000&output=dicom_seg")
        assert r.status_code == 422 and "DICOMweb datastore" in r.json()["detail"]


def test_a_persons_seg_becomes_the_final_label_and_counts_for_retrain(pacs, tmp_path):
    orthanc, ids = pacs["orthanc"], pacs["ids"]
    target = ids[4]
    ph = pacs["phantoms"][target]
    source = next(pydicom.dcmread(p) for p in (pacs["base"] / "dcm").glob("*.dcm")
                  if str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) == target)
    ma = np.zeros(ph.image.shape[:2], bool)
    ma[40:44, 50:54] = True
    bleed = np.zeros_like(ma)
    bleed[100:130, 150:190] = True
    with serve_in_process(orthanc.dicomweb_url, _conf(pacs["base"], "cache_c", retrain_after=100)) as c:
        assert target not in _final_labels(c)
        pending = c.get("/info/").json()["retrain"]["models"]["lesion_seg"]
        # a segment named in words the app does not know: refused, with the reason in /datastore
        unknown = _manual_seg(source, {"Microaneurysm": ma, "Bleeding": bleed})
        _stow(orthanc, unknown, tmp_path)
        status = c.get("/datastore/").json()["dicomweb"]
        assert target not in _final_labels(c)
        reason = status["unusable_segs"][str(unknown.SeriesInstanceUID)]["reason"]
        assert "Bleeding" in reason and "seg_segment_names" in reason

    # mapped by --conf seg_segment_names: the same SEG is the image's final label, and it counts as a correction
    with serve_in_process(orthanc.dicomweb_url, _conf(pacs["base"], "cache_d", retrain_after=100,
                                                       seg_segment_names="Bleeding=HE")) as c:
        assert target in _final_labels(c)
        r = c.get(f"/datastore/label?label={target}&tag=final")
        (tmp_path / "lab.png").write_bytes(r.content)
        lab = fio.read_label(tmp_path / "lab.png")
        assert lab[42, 52] == LESION_VALUES["MA"] and lab[110, 160] == LESION_VALUES["HE"] and lab[0, 0] == 0
        # already in the server at the start: an initial label, not a correction; a new one after the start counts
        before = c.get("/info/").json()["retrain"]["models"]["lesion_seg"]
        corrected = _manual_seg(source, {"Microaneurysms": ma, "Haemorrhages": np.zeros_like(ma)})
        _stow(orthanc, corrected, tmp_path)
        assert target in _final_labels(c)   # a listing refreshes from the server (dicomweb_refresh 0)
        r = c.get(f"/datastore/label?label={target}&tag=final")
        (tmp_path / "lab2.png").write_bytes(r.content)
        assert fio.read_label(tmp_path / "lab2.png")[110, 160] == 0      # the newest person's SEG wins
        after = c.get("/info/").json()["retrain"]["models"]["lesion_seg"]
        assert after["labels_pending"] == before["labels_pending"] + 1, (before, after)
    assert pending is not None
    with pytest.raises(ValueError, match="NAME=LESION"):
        dseg.parse_segment_names("Bleeding=XX")


def test_preannotate_stores_one_proposal_per_photograph_and_skips_those_done(pacs, tmp_path, capsys):
    orthanc, ids = pacs["orthanc"], pacs["ids"]
    conf = []
    for k, v in _conf(pacs["base"], "cache_e").items():
        conf += ["--conf", k, v]
    args = ["preannotate", "--studies", orthanc.dicomweb_url, "--model", "lesion_seg", *conf]
    capsys.readouterr()
    assert cli.main(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    stored = {x["image"]: x["stored"] for x in lines if "stored" in x and "image" in x}
    summary = lines[-1]["summary"]
    # every photograph without a lesion_seg proposal (another test may have stored some: they are skipped)
    assert set(stored) <= set(ids) and summary["stored"] == len(stored)
    assert summary["stored"] + summary["already_proposed"] == len(ids)
    for image_id, rec in stored.items():
        seg = _seg_from_orthanc(orthanc, rec["SeriesInstanceUID"])
        assert dseg.is_proposal(seg) and dseg.referenced_instances(seg) == {pacs["sop"][image_id]}
    # a second run finds them all done
    assert cli.main(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert lines[-1]["summary"] == {"model": "lesion_seg", "stored": 0, "failed": 0, "already_proposed": len(ids)}
    # not a DICOMweb server: refused before anything runs
    with pytest.raises(SystemExit, match="DICOMweb URL"):
        cli.main(["preannotate", "--studies", str(tmp_path), "--model", "lesion_seg"])
