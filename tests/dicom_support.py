"""Set-up shared by the DICOM tests: Debian packages (installed when missing, as root, with apt-get),
a loopback Orthanc with DICOMweb in a temporary folder, and phantom photographs as OP instances.

A test that needs a package which cannot be installed here is skipped, and says why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.lesions import label_map_from_masks
from monailabel_dr.fundus.phantoms import make_phantom

_INSTALL_TRIED: dict[tuple[str, ...], str | None] = {}


def require_debs(packages: tuple[str, ...], binaries: tuple[str, ...]) -> None:
    """Make sure ``binaries`` exist, installing ``packages`` with apt-get when they do not; else skip."""
    from monailabel_dr.dicom.orthanc import OrthancUnavailable, apt_install

    def missing() -> list[str]:
        return [b for b in binaries if not (shutil.which(b) or os.path.exists(b))]

    if not missing():
        return
    if packages not in _INSTALL_TRIED:
        try:
            apt_install(packages)
            _INSTALL_TRIED[packages] = None
        except (OrthancUnavailable, OSError) as e:
            _INSTALL_TRIED[packages] = str(e)
    if missing():
        pytest.skip(f"needs {', '.join(missing())} (Debian {' '.join(packages)}): "
                    f"{_INSTALL_TRIED.get(packages) or 'installed, but the files are still missing'}")


def require_orthanc() -> tuple[str, str]:
    from monailabel_dr.dicom.orthanc import OrthancUnavailable, ensure_installed

    try:
        return ensure_installed(install=True)
    except (OrthancUnavailable, OSError) as e:
        pytest.skip(f"Orthanc with DICOMweb is not available: {e}")


@contextlib.contextmanager
def running_orthanc(folder: Path):
    from monailabel_dr.dicom.orthanc import Orthanc

    binary, plugin = require_orthanc()
    server = Orthanc(str(folder), binary=binary, plugin=plugin).start()
    try:
        yield server
    finally:
        server.stop()


def phantom_label_map(ph) -> np.ndarray:
    return label_map_from_masks(ph.masks)


def write_phantom_photos(folder: Path, seeds: list[int], size=(240, 320)) -> dict[str, object]:
    """PNG phantoms named like camera exports (``P<seed>_left.png``); {file stem: phantom}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for s in seeds:
        ph = make_phantom(s, size=size)
        stem = f"P{s:03d}_{ph.info['laterality']}"
        fio.write_image(folder / f"{stem}.png", ph.image)
        out[stem] = ph
    return out


@contextlib.contextmanager
def headless_chromium(user_data_dir: Path, page_load_timeout: float = 120):
    """Debian's Chromium driven by Selenium (chromium-driver), headless, software WebGL, loopback only (other hosts
    fail at once, so OHIF's web-font requests do not wait on the network), with its console log readable."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_debs(("chromium", "chromium-driver"), ("chromium", "chromedriver"))
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist", "--no-first-run",
                "--disable-features=Translate,MediaRouter", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={user_data_dir}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    d.set_page_load_timeout(page_load_timeout)
    try:
        yield d
    finally:
        d.quit()


def wait_in_browser(d, what, fn, timeout=90):
    """``fn(driver)`` once truthy (its value), or an AssertionError with the page text and the browser's log."""
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(d, timeout, poll_frequency=0.5).until(lambda drv: fn(drv))
    except Exception as e:
        logs = "\n".join(f"{x['level']} {x['message'][:200]}" for x in d.get_log("browser")[-15:])
        raise AssertionError(f"OHIF: {what} did not happen within {timeout} s; page text: "
                             f"{d.find_element('tag name', 'body').text[:800]!r}\nbrowser log:\n{logs}") from e
