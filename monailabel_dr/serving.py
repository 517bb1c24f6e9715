"""Run this app in MONAI Label's real server, in-process or as a loopback process: shared by the tests,
the benchmarks (bench/load_test.py, bench/al_simulation.py) and scripts.

- :func:`serve_in_process`: MONAI Label's FastAPI app with this app loaded, driven through a
  ``TestClient`` (training jobs still run as MONAI Label runs them: a subprocess per job, which builds
  the app from the environment set here);
- :func:`running_server`: ``monailabel start_server`` on a free loopback port in its own process
  group (server and the training subprocesses it spawns), stopped on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "monailabel_dr"

# MONAI Label settings of a harnessed server: no file watcher, no background scoring, no usage tracking, no sessions
HARNESS_ENV = {"MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
               "MONAI_LABEL_TRACKING_ENABLED": "false", "MONAI_LABEL_SESSIONS": "false"}


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_root_on_pythonpath(path: str) -> str:
    paths = [p for p in path.split(os.pathsep) if p]
    return os.pathsep.join(paths if str(ROOT) in paths else [str(ROOT), *paths])


@contextlib.contextmanager
def serve_in_process(studies, conf: dict):
    """The real MONAI Label FastAPI app with this app loaded (``studies``: a folder or a DICOMweb URL;
    ``conf``: the ``--conf`` pairs), yielded as a ``fastapi.testclient.TestClient``."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    conf = {k: str(v) for k, v in conf.items()}
    conf.setdefault("infer_workers", "0")   # in-process: the served tasks are this process's (tests reach into them)
    settings.MONAI_LABEL_APP_DIR = str(APP_DIR)
    settings.MONAI_LABEL_STUDIES = str(studies)
    settings.MONAI_LABEL_APP_CONF = conf
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    settings.MONAI_LABEL_AUTO_UPDATE_SCORING = False
    settings.MONAI_LABEL_TRACKING_ENABLED = False
    settings.MONAI_LABEL_SESSIONS = False
    os.environ["MONAI_LABEL_APP_DIR"] = str(APP_DIR)
    os.environ["MONAI_LABEL_STUDIES"] = str(studies)
    os.environ["MONAI_LABEL_APP_CONF"] = json.dumps(conf)
    os.environ["PYTHONPATH"] = _with_root_on_pythonpath(os.environ.get("PYTHONPATH", ""))
    clear_cache()
    from monailabel.app import app

    try:
        with TestClient(app) as client:
            yield client
    finally:
        from monailabel.interfaces.utils.app import apps

        for instance in list(apps.values()):   # the app's background rescoring thread (lib/activelearning/common.py)
            rescorer = getattr(instance, "rescorer", None)
            if rescorer is not None:
                rescorer.stop()
            workers = getattr(instance, "infer_workers", None)
            if workers is not None:
                workers.shutdown()
        clear_cache()


@contextlib.contextmanager
def running_server(studies, model_dir: Path, conf: dict | None = None, env: dict | None = None,
                   log_path: Path | None = None, timeout: float = 180.0):
    """``monailabel start_server`` on a free loopback port; yields its URL.

    ``studies``: a folder or a DICOMweb URL (then give ``log_path``; the server runs in its folder).
    ``conf``: extra ``--conf`` pairs (profile tiny, device cpu and model_dir are set here);
    ``env``: extra environment (e.g. MONAI_LABEL_AUTH_*). The process group (server and the train
    subprocesses it spawns) is terminated on exit.
    """
    port = free_port()
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = _with_root_on_pythonpath(full_env.get("PYTHONPATH", ""))
    for k, v in HARNESS_ENV.items():
        full_env.setdefault(k, v)
    full_env.update(env or {})
    c = {"profile": "tiny", "device": "cpu", "model_dir": str(model_dir)}
    c.update({k: str(v) for k, v in (conf or {}).items()})
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    for k, v in c.items():
        cmd += ["--conf", k, v]
    if log_path is None:
        if str(studies).startswith(("http://", "https://")):
            raise ValueError("running_server: give log_path when studies is a URL")
        log_path = Path(studies).parent / f"server_{port}.log"
    log_path = Path(log_path)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(log_path.parent),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}): {log_path.read_text()[-3000:]}")
            try:
                requests.get(f"{url}/info/", timeout=2)   # any HTTP answer means uvicorn is up (401 when auth is on)
                break
            except requests.RequestException:
                if time.time() > deadline:
                    raise RuntimeError(f"server did not come up in {timeout:.0f} s: {log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)   # the group started here: server + train subprocesses
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
