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
