"""lib/ohif_viewer.py without a browser: the files route, the configuration, and the metadata fix-up for SEGs."""

from __future__ import annotations

import json

from monailabel_dr.lib.ohif_viewer import DICOMWEB_PREFIX, app_config, make_app, seg_metadata_for_ohif


def test_files_config_and_routes(tmp_path):
    from starlette.testclient import TestClient

    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<html>ohif</html>")
    (dist / "app.bundle.js").write_text("bundle")
    (tmp_path / "secret.txt").write_text("outside")
    # an upstream nobody listens on: the proxy answers 502 naming it, never a 500
    client = TestClient(make_app(dist, "http://127.0.0.1:9/dicom-web", timeout=2))
    assert client.get("/app.bundle.js").text == "bundle"
    for route in ("/", "/viewer", "/segmentation?StudyInstanceUIDs=1.2.3"):   # OHIF's own routes: the app
        assert client.get(route).text == "<html>ohif</html>", route
    assert client.get("/assets/missing.png").status_code == 404                # a missing asset is not the app
    assert client.get("/../secret.txt").text != "outside"
    assert client.get("/%2e%2e/secret.txt").text != "outside"
    js = client.get("/app-config.js").text
    config = json.loads(js.split("window.config = ", 1)[1].rstrip().rstrip(";"))
    source = config["dataSources"][0]["configuration"]
    assert source["qidoRoot"] == source["wadoRoot"] == DICOMWEB_PREFIX and config["defaultDataSourceName"] == "dicomweb"
    r = client.get(f"{DICOMWEB_PREFIX}/studies")
    assert r.status_code == 502 and "127.0.0.1:9" in r.text
    assert app_config("http://pacs/dicom-web").count("http://pacs/dicom-web") == 3


def test_seg_metadata_gets_the_pixel_measures_item_ohif_needs():
    seg = {"00080060": {"vr": "CS", "Value": ["SEG"]},
           "52009229": {"vr": "SQ", "Value": [{"00209116": {"vr": "SQ", "Value": [{"00200037": {"vr": "DS", "Value": [1, 0, 0, 0, 1, 0]}}]}}]}}
    bare_seg = {"00080060": {"vr": "CS", "Value": ["SEG"]}}
    op = {"00080060": {"vr": "CS", "Value": ["OP"]}}
    out = json.loads(seg_metadata_for_ohif(json.dumps([seg, bare_seg, op]).encode()))
    assert out[0]["52009229"]["Value"][0]["00289110"] == {"vr": "SQ", "Value": [{}]}
    assert out[0]["52009229"]["Value"][0]["00209116"] == seg["52009229"]["Value"][0]["00209116"]   # kept
    assert out[1]["52009229"]["Value"][0]["00289110"] == {"vr": "SQ", "Value": [{}]}
    assert out[2] == op
    complete = json.dumps([out[0]]).encode()
    assert seg_metadata_for_ohif(complete) == complete                       # nothing to add: unchanged bytes
    assert seg_metadata_for_ohif(b"--boundary binary") == b"--boundary binary"
