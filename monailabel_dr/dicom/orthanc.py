"""A throw-away Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``) for tests, CI and demos.

The server gets its own folder (JSON configuration, SQLite index and storage, log, pid file),
answers HTTP on one port for loopback clients only (``RemoteAccessAllowed: false``; Orthanc 1.10
has no bind-address option, so the socket listens on all interfaces but refuses every request
that does not come from 127.0.0.1), has no DICOM (DIMSE) listener and no authentication, and
serves DICOMweb at ``http://127.0.0.1:PORT/dicom-web``.

  python -m monailabel_dr.dicom.orthanc install                 # apt-get install (root), if missing
  python -m monailabel_dr.dicom.orthanc start --dir D --port 8042   # prints the DICOMweb URL
  python -m monailabel_dr.dicom.orthanc stop --dir D
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import requests

PACKAGES = ("orthanc", "orthanc-dicomweb")
_BINARIES = ("Orthanc", "/usr/sbin/Orthanc")
_PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)


class OrthancUnavailable(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed and cannot be installed here (the message says why)."""


def find_binary() -> str | None:
    for b in _BINARIES:
        p = shutil.which(b) or (b if os.path.isabs(b) and os.access(b, os.X_OK) else None)
        if p:
            return p
    return None


def find_dicomweb_plugin() -> str | None:
    for pattern in _PLUGIN_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def apt_install(packages: tuple[str, ...], timeout_s: float = 1200) -> None:
    """``apt-get install -y --no-install-recommends PACKAGES`` as root; OrthancUnavailable when impossible."""
    if not shutil.which("apt-get"):
        raise OrthancUnavailable(f"{' '.join(packages)} missing and apt-get is not available (not Debian/Ubuntu)")
    if os.geteuid() != 0:
        raise OrthancUnavailable(f"{' '.join(packages)} missing; installing needs root: sudo apt-get install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if res.returncode != 0:
        upd = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=timeout_s)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if res.returncode != 0:
            raise OrthancUnavailable(
                f"apt-get install {' '.join(packages)} failed (rc {res.returncode}; apt-get update rc {upd.returncode}): "
                f"{(res.stderr or res.stdout)[-600:]}"
            )


def ensure_installed(install: bool = True) -> tuple[str, str]:
    """(Orthanc binary, DICOMweb plugin); installs the Debian packages when missing and allowed."""
    binary, plugin = find_binary(), find_dicomweb_plugin()
    if (binary is None or plugin is None) and install:
        apt_install(PACKAGES)
        binary, plugin = find_binary(), find_dicomweb_plugin()
    if binary is None:
        raise OrthancUnavailable("the Orthanc binary is not installed (Debian package 'orthanc')")
    if plugin is None:
        raise OrthancUnavailable("the Orthanc DICOMweb plugin is not installed (Debian package 'orthanc-dicomweb')")
    return binary, plugin


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Orthanc:
    """One Orthanc process with its folder; start / stop / restart keep the same port and data."""

    def __init__(self, folder: str, port: int | None = None, *, binary: str | None = None, plugin: str | None = None):
        self.folder = os.path.realpath(folder)
        self.config_path = os.path.join(self.folder, "orthanc.json")
        self.pid_path = os.path.join(self.folder, "orthanc.pid")
        self.log_path = os.path.join(self.folder, "orthanc.log")
        existing = self._read_config()
        self.port = int(port or (existing or {}).get("HttpPort") or free_port())
        self.binary = binary
        self.plugin = plugin
        self.proc: subprocess.Popen | None = None

    # --------------------------------------------------------------- urls
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    # --------------------------------------------------------------- config
    def _read_config(self) -> dict | None:
        try:
            with open(self.config_path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def write_config(self) -> None:
        if self.binary is None or self.plugin is None:
            self.binary, self.plugin = ensure_installed(install=False)
        os.makedirs(os.path.join(self.folder, "db"), exist_ok=True)
        conf = {
            "Name": "monailabel-dr",
            "StorageDirectory": os.path.join(self.folder, "db"),
            "IndexDirectory": os.path.join(self.folder, "db"),
            "HttpServerEnabled": True,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,       # loopback clients only
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,        # no DIMSE listener: DICOMweb only
            "HttpCompressionEnabled": False,
            "HttpTimeout": 60,
            "StableAge": 2,
            "Plugins": [self.plugin],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Host": f"127.0.0.1:{self.port}",
                "Ssl": False,
            },
        }
        with open(self.config_path, "w", encoding="utf-8") as f:
            json.dump(conf, f, indent=2)

    # --------------------------------------------------------------- process
    def pid(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        try:
            return requests.get(f"{self.url}/system", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def start(self, timeout_s: float = 60) -> "Orthanc":
        if self.pid() is not None and self.alive():
            return self
        if _port_open(self.port):
            raise OrthancUnavailable(f"port {self.port} is already in use by another process")
        self.write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, self.config_path], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.folder, start_new_session=True)
        log.close()
        with open(self.pid_path, "w") as f:
            f.write(str(self.proc.pid))
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise OrthancUnavailable(f"Orthanc exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                if requests.get(f"{self.dicomweb_url}/studies", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise OrthancUnavailable(f"Orthanc did not answer on port {self.port} within {timeout_s:.0f} s: {self.log_tail()}")

    def stop(self, timeout_s: float = 20) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc is not None and self.proc.pid == pid:
                if self.proc.poll() is not None:
                    break
            else:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait(5)
        self.proc = None
        with contextlib.suppress(OSError):
            os.unlink(self.pid_path)

    def restart(self) -> "Orthanc":
        self.stop()
        return self.start()

    def log_tail(self, n: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return ""

    # --------------------------------------------------------------- REST helpers (tests, diagnostics)
    def rest(self, path: str) -> object:
        r = requests.get(f"{self.url}{path}", timeout=30)
        r.raise_for_status()
        return r.json()

    def upload(self, path: str) -> dict:
        with open(path, "rb") as f:
            r = requests.post(f"{self.url}/instances", data=f.read(), timeout=60)
        r.raise_for_status()
        return r.json()

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monailabel_dr.dicom.orthanc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="apt-get install orthanc orthanc-dicomweb when missing (root)")
    st = sub.add_parser("start", help="start a loopback Orthanc with DICOMweb in --dir (kept running)")
    st.add_argument("--dir", required=True)
    st.add_argument("--port", type=int, default=None, help="HTTP port (default: the folder's, else a free one)")
    st.add_argument("--no-install", action="store_true", help="do not apt-get install when missing")
    sp = sub.add_parser("stop", help="stop the Orthanc of --dir")
    sp.add_argument("--dir", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "install":
            binary, plugin = ensure_installed(install=True)
            print(json.dumps({"orthanc": binary, "dicomweb_plugin": plugin}))
        elif args.cmd == "start":
            binary, plugin = ensure_installed(install=not args.no_install)
            o = Orthanc(args.dir, args.port, binary=binary, plugin=plugin).start()
            print(json.dumps({"dicomweb": o.dicomweb_url, "pid": o.pid(), "config": o.config_path, "log": o.log_path}))
        else:
            Orthanc(args.dir).stop()
    except OrthancUnavailable as e:
        print(f"orthanc: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
