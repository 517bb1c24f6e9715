"""A current OHIF viewer (the npm registry's ``@ohif/app``, pinned) in front of a DICOMweb server.

MONAI Label 0.8.5 bundles an OHIF 2-era viewer built for CT / MR volumes. Current OHIF releases (3.x)
show and segment single-frame 2-D images (stack viewports) and read and write DICOM SEG through
DICOMweb, which is what an annotator needs to see a model's proposal on a fundus photograph and to
save a correction (issue 20). The npm package ships the built viewer under ``dist/`` (index.html, the
bundles, ``app-config.js``), so no build and no node_modules are needed:

- :func:`ensure_dist` fetches the package's tarball with ``npm pack`` (the registry's own client; one
  50 MB download, cached under ``~/.cache/monailabel-dr/ohif``) and unpacks ``dist/`` only;
- :func:`app_config` writes OHIF's configuration: one DICOMweb data source, on this server's own
  origin (``/dicom-web``), with the study list, and SEG storage (STOW-RS) enabled;
- :func:`make_app` serves ``dist/`` (unknown paths answer ``index.html``: OHIF routes in the browser),
  the configuration, and a reverse proxy from ``/dicom-web/...`` to the DICOMweb server. The proxy
  keeps the viewer and the PACS on one origin, so Orthanc needs no CORS set-up, and stores (POST) go
  through it too.

``monailabel-dr ohif --dicomweb http://127.0.0.1:8042/dicom-web`` starts it (``make ohif``).

Why the dist is served by this module and not by ``npx serve`` or Python's ``http.server``: OHIF's
routes (``/viewer?StudyInstanceUIDs=...``, ``/segmentation?...``) must fall back to ``index.html``,
and the DICOMweb proxy must sit on the same origin; Starlette (already here, under FastAPI) does both.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"      # pinned: the configuration below and tests/test_ohif3.py were checked against it
DICOMWEB_PREFIX = "/dicom-web"
# request / response headers the proxy passes on (hop-by-hop and length headers are the server's own)
_PASS_REQUEST = ("accept", "content-type")
_PASS_RESPONSE = ("content-type", "content-disposition", "cache-control", "etag", "last-modified")


class OHIFUnavailable(RuntimeError):
    """The viewer's files cannot be had here (no npm, no registry, a broken package)."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "monailabel-dr" / "ohif"


def ensure_dist(cache_dir: str | os.PathLike | None = None, version: str = OHIF_VERSION) -> Path:
    """The folder of ``@ohif/app@version``'s built viewer (``dist/``), fetched once with ``npm pack``."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / f"ohif-app-{version}" / "dist"
    if (target / "index.html").is_file() and (target / "app-config.js").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise OHIFUnavailable("npm is not on PATH: it fetches the OHIF viewer from the npm registry "
                              f"({OHIF_PACKAGE}@{version}); install Node.js and npm (Debian: apt-get install npm)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        try:
            out = subprocess.run([npm, "pack", f"{OHIF_PACKAGE}@{version}", "--pack-destination", tmp, "--json"],
                                 capture_output=True, text=True, timeout=900, cwd=tmp)
        except subprocess.TimeoutExpired as e:
            raise OHIFUnavailable(f"npm pack {OHIF_PACKAGE}@{version} did not finish in 15 min") from e
        if out.returncode != 0:
            raise OHIFUnavailable(f"npm pack {OHIF_PACKAGE}@{version} failed: {out.stderr.strip()[-500:]}")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise OHIFUnavailable(f"npm pack {OHIF_PACKAGE}@{version} left {len(tarballs)} tarballs")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/") and (m.isfile() or m.isdir())
                       and ".." not in Path(m.name).parts]
            if not members:
                raise OHIFUnavailable(f"{OHIF_PACKAGE}@{version} has no dist/ folder")
            if hasattr(tarfile, "data_filter"):   # Python >= 3.10.12: no links, nothing outside, no odd modes
                tar.extractall(unpacked, members=members, filter="data")
            else:   # older: the members are plain files and folders under package/dist/ (checked above)
                tar.extractall(unpacked, members=members)
        if not (unpacked / "package" / "dist" / "index.html").is_file():
            raise OHIFUnavailable(f"{OHIF_PACKAGE}@{version}: dist/index.html is missing")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():   # a half-copied earlier attempt
            shutil.rmtree(target)
        os.replace(unpacked / "package" / "dist", target)
    logger.info(f"OHIF {version} unpacked in {target}")
    return target


def app_config(dicomweb_root: str = DICOMWEB_PREFIX, name: str = "PACS") -> str:
    """OHIF's ``window.config`` for one DICOMweb data source at ``dicomweb_root`` (a path on the viewer's own
    origin, or a full URL)."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": name,
            "name": "dicomweb",
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "wadoUriRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
            "supportsStow": True,   # a segmentation drawn in OHIF is stored in the server as DICOM SEG
        },
    }
    config = {
        "name": "monailabel-dr",
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "always",
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    return "/** written by monailabel_dr.lib.ohif_viewer */\nwindow.config = " + json.dumps(config, indent=2) + ";\n"


def seg_metadata_for_ohif(body: bytes) -> bytes:
    """DICOMweb metadata (JSON) as OHIF 3 can open it: every SEG instance gets a Pixel Measures item in its shared
    functional group when it has none.

    Why: a SEG of an uncalibrated photograph has nothing to put in Pixel Measures (no Pixel Spacing), so
    :func:`monailabel_dr.dicom.seg.label_map_to_seg` writes an empty item, which is valid DICOM; Orthanc's DICOMweb
    JSON drops empty sequence items, and OHIF 3.13.2 reads ``SharedFunctionalGroupsSequence[0]
    .PixelMeasuresSequence[0]`` of every SEG and stops without it. Adding the empty item back claims nothing,
    and the SEG files themselves are left as they are. Anything that is not a JSON list passes unchanged."""
    try:
        instances = json.loads(body)
    except ValueError:
        return body
    if not isinstance(instances, list):
        return body
    changed = False
    for inst in instances:
        if not isinstance(inst, dict) or (inst.get("00080060") or {}).get("Value") != ["SEG"]:
            continue
        shared = inst.setdefault("52009229", {"vr": "SQ", "Value": [{}]})
        items = shared.setdefault("Value", [{}]) or [{}]
        shared["Value"] = items
        if not isinstance(items[0], dict):
            continue
        measures = items[0].get("00289110") or {}
        if not measures.get("Value"):
            items[0]["00289110"] = {"vr": "SQ", "Value": [{}]}
            changed = True
    return json.dumps(instances).encode() if changed else body


def make_app(dist: str | os.PathLike, dicomweb_url: str, timeout: float = 120.0):
    """The Starlette app: OHIF's files, its configuration and the DICOMweb proxy to ``dicomweb_url``."""
    import requests
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, PlainTextResponse, Response
    from starlette.routing import Route

    root = Path(dist).resolve()
    upstream = dicomweb_url.rstrip("/")
    config_js = app_config(DICOMWEB_PREFIX)
    session = requests.Session()

    async def config(_: Request) -> Response:
        return Response(config_js, media_type="application/javascript", headers={"Cache-Control": "no-store"})

    async def proxy(request: Request) -> Response:
        path = request.path_params.get("path", "")
        url = f"{upstream}/{path}" if path else upstream
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASS_REQUEST}
        body = await request.body()

        def call():
            return session.request(request.method, url, params=list(request.query_params.multi_items()),
                                   data=body or None, headers=headers, timeout=timeout)
        try:
            r = await run_in_threadpool(call)
        except requests.RequestException as e:
            return PlainTextResponse(f"the DICOMweb server at {upstream} did not answer: {e}", status_code=502)
        out = {k: v for k, v in r.headers.items() if k.lower() in _PASS_RESPONSE}
        content = r.content
        if request.method == "GET" and path.endswith("/metadata") and r.status_code == 200:
            content = seg_metadata_for_ohif(content)
        return Response(content, status_code=r.status_code, headers=out)

    async def files(request: Request) -> Response:
        rel = request.path_params.get("path", "")
        candidate = (root / rel).resolve() if rel else root / "index.html"
        if rel and candidate.is_relative_to(root) and candidate.is_file():
            return FileResponse(candidate)
        if rel and "." in rel.rsplit("/", 1)[-1] and not rel.endswith(".html"):
            return PlainTextResponse(f"not found: /{rel}", status_code=404)   # a missing asset is not the app
        return FileResponse(root / "index.html", headers={"Cache-Control": "no-store"})   # OHIF's own routes

    methods = ["GET", "POST", "PUT", "DELETE"]
    return Starlette(routes=[
        Route("/app-config.js", config),
        Route(DICOMWEB_PREFIX, proxy, methods=methods),
        Route(DICOMWEB_PREFIX + "/{path:path}", proxy, methods=methods),
        Route("/", files),
        Route("/{path:path}", files),
    ])


def serve(dicomweb_url: str, host: str = "127.0.0.1", port: int = 3000, cache_dir: str | None = None) -> None:
    """Fetch the viewer if needed and serve it until interrupted."""
    import uvicorn

    dist = ensure_dist(cache_dir)
    print(f"OHIF {OHIF_VERSION} on http://{host}:{port}/ (DICOMweb: {dicomweb_url}, through /dicom-web)", flush=True)
    uvicorn.run(make_app(dist, dicomweb_url), host=host, port=port, log_level="warning")
