"""The bundled OHIF viewer (`/ohif/`) on the DICOMweb datastore, in a headless Chromium.

A real `monailabel start_server` process on a loopback port serves the app with
`--studies http://127.0.0.1:PORT/dicom-web` (a loopback Orthanc holding a phantom photograph
converted by `monailabel-dr to-dicom`). Selenium drives Debian's `chromium` through its
`chromium-driver` (both installed by the set-up when missing): the study list shows the OP study;
MONAI Label's OHIF mode opens it (with OHIF's single-viewport `default` hanging protocol: the
mode's own `mpr` protocol needs a volume), the MONAI Label panel connects to the server and lists
the segmentation models, and the viewport shows the fundus photograph (checked on the screenshot's
pixels). The screenshot is saved under the test's tmp folder, and to the path in
`MLDR_OHIF_SCREENSHOT` when set (`make ohif-screenshot` writes docs/ohif_fundus.png).
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
import requests

from dicom_support import headless_chromium, wait_in_browser, require_debs, running_orthanc
from monailabel_dr import cli
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.phantoms import make_phantom
from monailabel_dr.serving import running_server

pytestmark = [pytest.mark.browser, pytest.mark.dicomweb]

SEGMENTATION_MODELS = {"cam", "lesion_seg", "lesion_sam", "twlr_inpaint"}
CLASSIFICATION_MODELS = {"grading", "twlr_vlm"}


def _chromium() -> tuple[str, str]:
    require_debs(("chromium", "chromium-driver"), ("chromium", "chromedriver"))
    return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def ohif_server(tmp_path_factory):
    browser, driver = _chromium()
    base = tmp_path_factory.mktemp("ohif")
    with running_orthanc(base / "orthanc") as orthanc:
        ph = make_phantom(4, size=(600, 800), grade=3)
        fio.write_image(base / "DEMO_left.png", ph.image)
        assert cli.main(["to-dicom", str(base / "DEMO_left.png"), "--out", str(base / "dcm"), "--study-date", "20240101",
                         "--upload", orthanc.dicomweb_url]) == 0
        study = orthanc.rest("/studies?expand")[0]["MainDicomTags"]["StudyInstanceUID"]
        with running_server(orthanc.dicomweb_url, base / "model", conf={"dicomweb_cache": base / "cache"},
                            log_path=base / "server.log") as url:
            yield {"url": url, "study": study, "phantom": ph, "browser": browser, "driver": driver, "base": base}


@pytest.fixture()
def chrome(ohif_server, tmp_path):
    with headless_chromium(tmp_path / "chrome", page_load_timeout=90) as d:
        yield d


_wait = wait_in_browser


def _viewport_pixels(d, png: bytes) -> np.ndarray:
    """The screenshot's pixels inside the (largest) cornerstone viewport canvas."""
    import cv2

    rect = d.execute_script(
        "const cs=[...document.querySelectorAll('canvas')].map(c=>c.getBoundingClientRect())"
        ".filter(r=>r.width>100&&r.height>100).sort((a,b)=>b.width*b.height-a.width*a.height);"
        "return cs.length?{x:cs[0].x,y:cs[0].y,w:cs[0].width,h:cs[0].height,dpr:window.devicePixelRatio}:null;")
    assert rect, "no viewport canvas on the page"
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    s = rect["dpr"]
    x0, y0 = int(rect["x"] * s), int(rect["y"] * s)
    return img[y0:y0 + int(rect["h"] * s), x0:x0 + int(rect["w"] * s)]


def test_ohif_opens_the_fundus_study_and_lists_segmentation_models(ohif_server, chrome, tmp_path):
    from selenium.webdriver.common.by import By

    url, study = ohif_server["url"], ohif_server["study"]
    # the study list (OHIF's work list, through MONAI Label's DICOMweb proxy)
    chrome.get(f"{url}/ohif/")
    _wait(chrome, "the study list showing the OP study", lambda d: "OP" in d.find_element(By.TAG_NAME, "body").text)
    # MONAI Label's mode on the study; the panel's server address is a cookie of the page
    chrome.add_cookie({"name": "MONAILABEL_SERVER_URL", "value": f"{url}/", "path": "/"})
    chrome.get(f"{url}/ohif/monai-label?StudyInstanceUIDs={study}&hangingprotocolId=default")
    _wait(chrome, "the MONAI Label panel", lambda d: d.find_elements(By.ID, "monailabelServerURL"))
    assert chrome.find_element(By.ID, "monailabelServerURL").get_attribute("value") == f"{url}/"
    for b in chrome.find_elements(By.XPATH, "//button[normalize-space()='Confirm and Hide']"):
        b.click()
    # connect: the panel reads /info/ and lists the models it can run as segmentation
    chrome.find_element(By.CSS_SELECTOR, ".monaiLabelPanel button.actionButton").click()
    options = _wait(chrome, "the segmentation models in the MONAI Label panel",
                    lambda d: {o.text for o in d.find_elements(By.CSS_SELECTOR, ".monaiLabelPanel select option")} & SEGMENTATION_MODELS
                    and {o.text for o in d.find_elements(By.CSS_SELECTOR, ".monaiLabelPanel select option")})
    assert SEGMENTATION_MODELS <= options and not (CLASSIFICATION_MODELS & options), options
    assert "monailabel-dr" in chrome.find_element(By.CSS_SELECTOR, ".monaiLabelPanel").text
    # the viewport shows the photograph: wait for a reddish disc on the canvas
    def rendered(d):
        px = _viewport_pixels(d, d.get_screenshot_as_png()).astype(int)
        red = (px[..., 0] > 80) & (px[..., 0] > px[..., 2] + 40)
        return (px,) if red.mean() > 0.15 else False
    px, = _wait(chrome, "the fundus photograph in the viewport", rendered)
    fov = (px[..., 0] > 80) & (px[..., 0] > px[..., 2] + 40)
    ys, xs = np.nonzero(fov)
    h, w = ys.max() - ys.min(), xs.max() - xs.min()
    assert 0.8 < w / h < 1.25, (w, h)          # the circular field of view, not stretched
    # the photograph's colours: the rendered disc has the source's colours (display LUT: identity)
    img = ohif_server["phantom"].image.astype(int)
    src_sel = (img[..., 0] > 80) & (img[..., 0] > img[..., 2] + 40)
    assert np.all(np.abs(px[fov].mean(axis=0) - img[src_sel].mean(axis=0)) < 20), (px[fov].mean(axis=0), img[src_sel].mean(axis=0))
    from selenium.webdriver.support.ui import Select

    models = chrome.find_element(By.XPATH, "//*[contains(@class, 'monaiLabelPanel')]//select[option[normalize-space()='lesion_seg']]")
    Select(models).select_by_visible_text("lesion_seg")
    time.sleep(1.0)
    png = chrome.get_screenshot_as_png()
    (tmp_path / "ohif_fundus.png").write_bytes(png)
    dest = os.environ.get("MLDR_OHIF_SCREENSHOT")
    if dest:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(png)
    info = requests.get(f"{url}/info/").json()
    assert all(info["models"][m]["type"] == "segmentation" for m in SEGMENTATION_MODELS)
    assert all(info["models"][m]["type"] == "classification" for m in CLASSIFICATION_MODELS)
