"""Shared fixtures: phantom datastores and the app served in-process (FastAPI TestClient)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from monailabel_dr import serving

# the server harness lives in the app package (shared with bench/); the test modules import these from here
free_port = serving.free_port
serve_in_process = serving.serve_in_process

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "monailabel_dr"
SHARED = ROOT.parent / "shared"
IDRID = SHARED / "data" / "idrid_train"

# MONAI Label reads its settings from the environment at import time.
os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")
os.environ.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")
os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
os.environ.setdefault("MONAI_LABEL_SESSIONS", "false")


def write_phantom_store(folder: Path, n: int, labelled: int, seed: int = 0, size=(240, 320)) -> Path:
    from monailabel_dr.demo import write_demo

    write_demo(str(folder), n=n, labelled=labelled, seed=seed, size=size, workers=1)
    return folder


def write_idrid_phantoms(folder: Path, phantoms: list) -> Path:
    """An IDRiD-layout folder (images/PH_NN.png, masks/<LES>/PH_NN_<LES>.png) of phantoms, numbered from 1."""
    import cv2

    from monailabel_dr.fundus import io as fio
    from monailabel_dr.fundus.lesions import LESIONS

    (folder / "images").mkdir(parents=True)
    for i, ph in enumerate(phantoms, start=1):
        fio.write_image(folder / "images" / f"PH_{i:02d}.png", ph.image)
        for les in LESIONS:
            if ph.masks[les].any():
                (folder / "masks" / les).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / "masks" / les / f"PH_{i:02d}_{les}.png"), ph.masks[les].astype("uint8") * 255)
    return folder


@pytest.fixture(scope="session")
def phantom_template(tmp_path_factory) -> Path:
    """A small phantom datastore (written once; copy it before modifying)."""
    return write_phantom_store(tmp_path_factory.mktemp("phantoms") / "store", n=48, labelled=40, seed=0)


@pytest.fixture()
def phantom_store(phantom_template, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(phantom_template, dst)
    return dst


def tiny_conf(model_dir: Path, **extra) -> dict:
    # rescore_interval 0: no background rescoring unless a test asks for it (scores stay where a test put them);
    # infer_workers 0: in-process tests reach into the served tasks (the HTTP server tests use the default, 1)
    conf = {"models": "all", "profile": "tiny", "model_dir": str(model_dir), "device": "cpu", "server_mode": "true",
            "rescore_interval": "0", "infer_workers": "0"}
    conf.update({k: str(v) for k, v in extra.items()})
    return conf


@pytest.fixture()
def client(phantom_store, tmp_path):
    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model")) as c:
        yield c


def pytest_report_header(config):
    return [f"python {sys.version.split()[0]}; shared data: {'present' if IDRID.is_dir() else 'absent'}"]
