"""A current OHIF (npm's @ohif/app, `monailabel-dr ohif`) on the PACS, in a headless Chromium (issue 20, item 4).

The loop a reading centre runs in a browser, end to end on real servers on loopback ports:

1. a phantom photograph is stored in a loopback Orthanc, and `lesion_seg` (tiny profile, trained here on two
   other photographs' labels saved through the app) stores its proposal there as a DICOM SEG with AUTOMATIC
   segments (`/infer/lesion_seg?output=dicom_seg`);
2. `monailabel-dr ohif` serves OHIF 3 on the same Orthanc; the test opens the study in OHIF's segmentation
   mode, loads the proposal and checks on screenshots that the overlay colours the pixels where the SEG has
   lesions and leaves the rest of the field of view as it was;
3. it draws a stroke with OHIF's brush in a new segmentation and saves it to the server from OHIF's export
   dialog (OHIF stores a Label Map SEG, MANUAL, segment "Segment 1", mapped to HE by
   `--conf seg_segment_names`);
4. the app's DICOMweb datastore then shows that photograph with a final label whose pixels are the stroke,
   and retrain on correction (`--conf retrain_after 1`) runs a fine-tuning job from it.

Screenshots go to the test's tmp folder, and with MLDR_OHIF3_SCREENSHOTS=DIR to DIR/ohif3_proposal.png and
DIR/ohif3_correction.png (`make ohif-screenshot` writes them to docs/). Skips, saying why, without Chromium,
Orthanc or npm (the viewer's files come from the npm registry).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pydicom
import pytest
import requests

from dicom_support import headless_chromium, wait_in_browser, phantom_label_map, require_debs, running_orthanc, write_phantom_photos
from monailabel_dr import cli
from monailabel_dr.dicom import seg as dseg
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.lesions import LESION_VALUES
from monailabel_dr.serving import running_server

pytestmark = [pytest.mark.browser, pytest.mark.dicomweb]

SIZE = (600, 800)
BRUSH_RADIUS = 25      # OHIF's default brush radius, in mm: 25 px on a photograph without pixel spacing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fov(rgb: np.ndarray) -> np.ndarray:
    """The reddish field of view of a phantom photograph (as the screenshot shows it)."""
    rgb = rgb.astype(int)
    return (rgb[..., 0] > 80) & (rgb[..., 0] > rgb[..., 2] + 40)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    require_debs(("chromium", "chromium-driver"), ("chromium", "chromedriver"))
    if shutil.which("npm") is None:
        pytest.skip("npm is not on PATH: the OHIF viewer comes from the npm registry (@ohif/app)")
    from monailabel_dr.lib.ohif_viewer import OHIFUnavailable, ensure_dist

    try:
        ensure_dist()
    except OHIFUnavailable as e:
        pytest.skip(f"the OHIF viewer cannot be fetched here: {e}")
    base = tmp_path_factory.mktemp("ohif3")
    with running_orthanc(base / "orthanc") as orthanc:
        phantoms = write_phantom_photos(base / "png", [501, 502, 503], size=SIZE)
        assert cli.main(["to-dicom", str(base / "png"), "--out", str(base / "dcm"), "--upload", orthanc.dicomweb_url]) == 0
        sources = {}
        for stem, ph in phantoms.items():
            ds = pydicom.dcmread(base / "dcm" / f"{stem}.dcm")
            sources[str(ds.SeriesInstanceUID)] = (ph, ds)
        ids = sorted(sources)
        conf = {"models": "lesion_seg", "dicomweb_cache": base / "cache", "dicomweb_refresh": "1",
                "seg_segment_names": "Segment 1=HE", "rescore_interval": "0"}
        with running_server(orthanc.dicomweb_url, base / "model", conf=conf, log_path=base / "setup.log") as url:
            for image_id in ids[:2]:   # two labelled photographs, then a tiny lesion_seg trained on them
                ph, _ = sources[image_id]
                ok, png = cv2.imencode(".png", phantom_label_map(ph).astype(np.uint8))
                r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                                 files={"label": (f"{image_id}.png", png.tobytes())}, timeout=120)
                assert r.status_code == 200, r.text
            r = requests.post(f"{url}/train/lesion_seg?run_sync=true", json={"max_epochs": 2}, timeout=900)
            assert r.status_code == 200, r.text
        # the annotators' server: retrain on correction after every new label
        conf.update({"retrain_after": "1", "retrain_epochs": "1"})
        with running_server(orthanc.dicomweb_url, base / "model", conf=conf, log_path=base / "server.log") as url:
            ohif_port = _free_port()
            ohif = subprocess.Popen([sys.executable, "-c", "from monailabel_dr.cli import main; raise SystemExit(main())",
                                     "ohif", "--dicomweb", orthanc.dicomweb_url, "--port", str(ohif_port)],
                                    stdout=open(base / "ohif.log", "w"), stderr=subprocess.STDOUT)
            try:
                ohif_url = f"http://127.0.0.1:{ohif_port}"
                deadline = time.time() + 120
                while time.time() < deadline:
                    try:
                        if requests.get(f"{ohif_url}/app-config.js", timeout=2).status_code == 200:
                            break
                    except requests.RequestException:
                        time.sleep(0.5)
                else:
                    pytest.fail(f"monailabel-dr ohif did not answer: {(base / 'ohif.log').read_text()[-2000:]}")
                yield {"url": url, "ohif": ohif_url, "orthanc": orthanc, "ids": ids, "sources": sources, "base": base}
            finally:
                ohif.terminate()
                ohif.wait(30)


@pytest.fixture()
def chrome(tmp_path):
    with headless_chromium(tmp_path / "chrome") as d:
        yield d


_wait = wait_in_browser


def _viewport(d) -> tuple[np.ndarray, dict]:
    """The screenshot's pixels inside the largest canvas (the viewport), RGB, and that canvas' rectangle."""
    rect = d.execute_script(
        "const cs=[...document.querySelectorAll('canvas')].map(c=>c.getBoundingClientRect())"
        ".filter(r=>r.width>100&&r.height>100).sort((a,b)=>b.width*b.height-a.width*a.height);"
        "return cs.length?{x:cs[0].x,y:cs[0].y,w:cs[0].width,h:cs[0].height,dpr:window.devicePixelRatio}:null;")
    assert rect, "no viewport canvas on the page"
    png = d.get_screenshot_as_png()
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    s = rect["dpr"]
    x0, y0 = int(rect["x"] * s), int(rect["y"] * s)
    return img[y0:y0 + int(rect["h"] * s), x0:x0 + int(rect["w"] * s)], rect


def _image_to_screen(photo: np.ndarray, shown: np.ndarray):
    """The affine map from photograph pixels to viewport pixels, from the field of view's bounding box in each
    (OHIF fits the image in the viewport, aspect kept, no rotation)."""
    ys, xs = np.nonzero(_fov(photo))
    vs, us = np.nonzero(_fov(shown))
    scale = ((us.max() - us.min()) / (xs.max() - xs.min()) + (vs.max() - vs.min()) / (ys.max() - ys.min())) / 2
    ox, oy = us.min() - xs.min() * scale, vs.min() - ys.min() * scale
    return scale, ox, oy


def _warp(mask: np.ndarray, scale: float, ox: float, oy: float, shape) -> np.ndarray:
    m = np.float32([[scale, 0, ox], [0, scale, oy]])
    return cv2.warpAffine(mask.astype(np.uint8), m, (shape[1], shape[0]), flags=cv2.INTER_NEAREST) > 0


def _save(png_rgb: np.ndarray, name: str, tmp_path) -> None:
    bgr = cv2.cvtColor(png_rgb, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(tmp_path / name), bgr)
    if os.environ.get("MLDR_OHIF3_SCREENSHOTS"):
        cv2.imwrite(os.path.join(os.environ["MLDR_OHIF3_SCREENSHOTS"], name), bgr)


def test_proposal_overlay_correction_in_ohif_becomes_a_label_and_retrains(loop, chrome, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    url, target = loop["url"], loop["ids"][2]
    ph, source = loop["sources"][target]
    # 1. the model's proposal, stored in the PACS; a tiny model trained for seconds has no calibrated threshold,
    # so take one whose answer covers 1-10 % of the field of view (something to see, not everything)
    fov_area = _fov(ph.image).sum()

    def area_at(threshold):
        r = requests.post(f"{url}/infer/lesion_seg", params={"image": target, "output": "image"},
                          data={"params": json.dumps({"threshold": threshold, "result_extension": ".png"})}, timeout=300)
        assert r.status_code == 200, r.text
        (tmp_path / "answer.png").write_bytes(r.content)
        return ((fio.read_label(tmp_path / "answer.png") > 0) & _fov(ph.image)).sum() / fov_area
    lo, hi = 0.0, 1.0   # bisection on the threshold (the tiny model's maps sit near 0.5 everywhere)
    for _ in range(16):
        threshold = (lo + hi) / 2
        fraction = area_at(threshold)
        if fraction > 0.1:
            lo = threshold
        elif fraction < 0.01:
            hi = threshold
        else:
            break
    r = requests.post(f"{url}/infer/lesion_seg", params={"image": target, "output": "dicom_seg"},
                      data={"params": json.dumps({"threshold": threshold})}, timeout=300)
    assert r.status_code == 200, r.text
    stored = r.json()["dicom_seg"]
    assert stored["algorithm_type"] == "AUTOMATIC"
    orthanc = loop["orthanc"]
    seg_id = next(s for s in orthanc.rest("/series")
                  if orthanc.rest(f"/series/{s}")["MainDicomTags"]["SeriesInstanceUID"] == stored["SeriesInstanceUID"])
    raw = requests.get(f"{orthanc.url}/instances/{orthanc.rest(f'/series/{seg_id}')['Instances'][0]}/file", timeout=60).content
    (tmp_path / "proposal.dcm").write_bytes(raw)
    proposal = dseg.seg_to_label_map(pydicom.dcmread(tmp_path / "proposal.dcm"), shape=SIZE) > 0
    proposal &= _fov(ph.image)
    assert 0.005 * fov_area < proposal.sum() < 0.2 * fov_area, f"proposal of {proposal.sum()} px at threshold {threshold}"

    # 2. OHIF's segmentation mode on the study; the photograph, then the proposal as an overlay
    study = str(source.StudyInstanceUID)
    chrome.get(f"{loop['ohif']}/segmentation?StudyInstanceUIDs={study}")
    def photo_shown(d):
        try:
            return _fov(_viewport(d)[0]).mean() > 0.15
        except AssertionError:   # no viewport yet
            return False
    _wait(chrome, "the photograph in the viewport", photo_shown)
    for b in chrome.find_elements(By.XPATH, "//button[normalize-space()='Confirm and hide']"):
        b.click()
    time.sleep(2)
    before, _ = _viewport(chrome)
    scale, ox, oy = _image_to_screen(ph.image, before)
    thumb = _wait(chrome, "the proposal in the study browser",
                  lambda d: d.find_elements(By.XPATH, "//*[contains(text(),'lesion_seg proposal')]"))
    ActionChains(chrome).double_click(thumb[0]).perform()
    _wait(chrome, "OHIF asking to open the SEG", lambda d: [b for b in d.find_elements(
        By.XPATH, "//button[normalize-space()='Yes']") if b.is_displayed()])[0].click()
    inside = _warp(cv2.erode(proposal.astype(np.uint8), np.ones((3, 3))), scale, ox, oy, before.shape[:2])
    outside = _warp(_fov(ph.image) & ~cv2.dilate(proposal.astype(np.uint8), np.ones((15, 15))).astype(bool),
                    scale, ox, oy, before.shape[:2])
    assert inside.sum() > 50, "the proposal is too thin to check on screen"

    def overlaid(d):
        px, _ = _viewport(d)
        diff = np.abs(px.astype(int) - before.astype(int)).sum(axis=-1)
        return (px, diff) if (diff[inside] > 30).mean() > 0.6 else False
    after, diff = _wait(chrome, "the proposal's overlay on the photograph", overlaid)
    assert (diff[outside] > 30).mean() < 0.02, "the overlay colours pixels where the SEG has no lesion"
    _save(after, "ohif3_proposal.png", tmp_path)

    # 3. a correction: a new segmentation, one brush stroke, saved to the server from OHIF
    chrome.find_element(By.CSS_SELECTOR, "[data-cy='segmentation-collapsed-more-btn-Labelmap']").click()
    _wait(chrome, "the segmentation menu", lambda d: d.find_elements(
        By.XPATH, "//*[normalize-space()='Create New Segmentation']"))[0].click()
    time.sleep(2)
    chrome.find_element(By.CSS_SELECTOR, "[data-cy='Brush-btn']").click()
    time.sleep(1)
    canvas = max((c for c in chrome.find_elements(By.TAG_NAME, "canvas") if c.is_displayed()),
                 key=lambda c: c.size["width"] * c.size["height"])
    _, rect = _viewport(chrome)
    start, end = np.array([300.0, 420.0]), np.array([420.0, 470.0])   # image pixels (x, y), inside the FOV
    dpr = rect["dpr"]

    def offset(p):   # from the canvas centre, in CSS pixels (Selenium's origin for element offsets)
        return (p[0] * scale + ox) / dpr - rect["w"] / 2, (p[1] * scale + oy) / dpr - rect["h"] / 2
    sx, sy = offset(start)
    steps = 12
    actions = ActionChains(chrome).move_to_element_with_offset(canvas, int(sx), int(sy)).click_and_hold()
    for k in range(steps):
        a, b = offset(start + (end - start) * k / steps), offset(start + (end - start) * (k + 1) / steps)
        actions = actions.move_by_offset(int(round(b[0])) - int(round(a[0])), int(round(b[1])) - int(round(a[1])))
    actions.release().perform()
    time.sleep(2)
    edited, _ = _viewport(chrome)
    _save(edited, "ohif3_correction.png", tmp_path)
    chrome.find_element(By.CSS_SELECTOR, "[data-cy='segmentation-collapsed-more-btn-Labelmap']").click()
    export = _wait(chrome, "the export entry", lambda d: d.find_elements(By.XPATH, "//*[normalize-space()='Export']"))[0]
    ActionChains(chrome).move_to_element(export).perform()
    export.click()
    _wait(chrome, "the DICOM SEG export", lambda d: d.find_elements(By.XPATH, "//*[normalize-space()='DICOM SEG']"))[0].click()
    _wait(chrome, "the store dialog", lambda d: [b for b in d.find_elements(
        By.XPATH, "//button[normalize-space()='Save']") if b.is_displayed()])[0].click()

    # 4. the app reads it back as the photograph's final label, the stroke's pixels, and retrains from it
    def final_label(_=None):
        objs = requests.get(f"{url}/datastore/?output=all", timeout=60).json()["objects"]
        return "final" in (objs.get(target, {}).get("labels") or {})
    deadline = time.time() + 120
    while not final_label() and time.time() < deadline:
        time.sleep(1)
    status = requests.get(f"{url}/datastore/", timeout=60).json().get("dicomweb", {})
    assert final_label(), f"no final label for the corrected photograph; unusable SEGs: {status.get('unusable_segs')}"
    r = requests.get(f"{url}/datastore/label", params={"label": target, "tag": "final"}, timeout=60)
    (tmp_path / "label.png").write_bytes(r.content)
    label = fio.read_label(tmp_path / "label.png")
    drawn = label == LESION_VALUES["HE"]
    assert set(np.unique(label).tolist()) <= {0, LESION_VALUES["HE"]}, np.unique(label)
    yy, xx = np.mgrid[0:SIZE[0], 0:SIZE[1]]
    t = np.clip(((xx - start[0]) * (end - start)[0] + (yy - start[1]) * (end - start)[1]) / np.dot(end - start, end - start), 0, 1)
    dist = np.hypot(xx - (start[0] + t * (end - start)[0]), yy - (start[1] + t * (end - start)[1]))
    core, hull = dist <= BRUSH_RADIUS - 4, dist <= BRUSH_RADIUS + 6
    assert drawn[core].mean() > 0.9, f"the label covers {drawn[core].mean():.0%} of the stroke's core"
    assert drawn[~hull].sum() < 0.02 * drawn.sum(), "label pixels away from the stroke"
    deadline = time.time() + 600
    while time.time() < deadline:
        job = requests.get(f"{url}/info/", timeout=60).json()["retrain"]["models"]["lesion_seg"]
        if job["jobs_done"] >= 1 or job["jobs_failed"] >= 1:
            break
        time.sleep(2)
    assert job["jobs_done"] >= 1 and job["jobs_failed"] == 0, job
