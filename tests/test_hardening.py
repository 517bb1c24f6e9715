"""Hardening: the upload size limit, ids and tags that try to leave the datastore, MONAI Label's
auth option (offline, against a local stand-in for the Keycloak realm), all through MONAI Label's
own endpoints. (Basic id checks are in test_server.py; concurrency in test_load.py.)"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import numpy as np
import pytest
import requests
from fastapi import FastAPI, File, UploadFile  # module level: the endpoint's annotations resolve here

from conftest import ROOT, free_port, serve_in_process, tiny_conf, write_phantom_store
from monailabel_dr.fundus.phantoms import make_phantom


def _snapshot(folder, skip: tuple[str, ...] = ()) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        if os.path.relpath(root, folder).split(os.sep)[0] in skip:
            continue
        for f in files:
            if f != ".lock":
                p = os.path.join(root, f)
                st = os.stat(p)
                out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def _jpg(seed=5) -> bytes:
    import cv2

    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(make_phantom(seed, size=(240, 320)).image, cv2.COLOR_RGB2BGR))
    return enc.tobytes()


# ----------------------------------------------------------------------------- upload limit: the middleware
def _tiny_app(limit: int):
    from fastapi.testclient import TestClient

    from monailabel_dr.lib.upload_limit import install

    app = FastAPI()
    seen = []

    @app.put("/up")
    async def up(file: UploadFile = File(...)):
        data = await file.read()
        seen.append(len(data))
        return {"n": len(data)}

    install(app, limit)
    return app, TestClient(app), seen


def test_upload_limit_middleware_content_length_chunked_and_reinstall():
    app, client, seen = _tiny_app(1000)
    assert client.put("/up", files={"file": ("a.bin", b"x" * 500)}).json() == {"n": 500}
    r = client.put("/up", files={"file": ("a.bin", b"x" * 5000)})
    assert r.status_code == 413 and "max_upload_mb" in r.json()["detail"]
    # no Content-Length: a chunked body is counted as it streams
    r = client.put("/up", content=(b"y" * 400 for _ in range(10)), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert seen == [500]                               # the refused bodies never reached the endpoint
    # a new app instance changes the limit in place (installed once, not stacked); 0 = no limit
    from monailabel_dr.lib.upload_limit import UploadLimitMiddleware, install

    install(app, 0)
    assert client.put("/up", files={"file": ("a.bin", b"x" * 5000)}).json() == {"n": 5000}
    install(app, 100)
    assert client.put("/up", files={"file": ("a.bin", b"x" * 500)}).status_code == 413
    stack, n = app.middleware_stack, 0
    while stack is not None:
        n += isinstance(stack, UploadLimitMiddleware)
        stack = getattr(stack, "app", None)
    assert n == 1


def test_max_upload_mb_conf_is_validated(tmp_path):
    from monailabel_dr.config import ConfError, parse_conf

    assert parse_conf({"models": "grading"}, str(tmp_path)).max_upload_bytes == 100 * 2**20
    assert parse_conf({"models": "grading", "max_upload_mb": "0.5"}, str(tmp_path)).max_upload_bytes == 2**19
    for bad in ("-1", "lots"):
        with pytest.raises(ConfError):
            parse_conf({"models": "grading", "max_upload_mb": bad}, str(tmp_path))


def test_uploads_over_the_limit_get_413_and_write_nothing(phantom_store, tmp_path):
    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading", max_upload_mb="0.25")) as c:
        before = _snapshot(phantom_store)
        big = os.urandom(400 * 1024)
        for r in (
            c.put("/datastore/image?image=big_eye", files={"file": ("big_eye.jpg", big)}),
            c.put("/datastore/", params={"image": "big_eye"}, files={"file": ("big_eye.jpg", big)}),   # Slicer's route
            c.put("/datastore/label?image=fundus_0001&tag=final", files={"label": ("l.nrrd", big)}),
            c.post("/infer/grading", files={"file": ("x.jpg", big)}),
            c.put("/datastore/image?image=big_eye", content=(big[i:i + 65536] for i in range(0, len(big), 65536)),
                  headers={"content-type": "multipart/form-data; boundary=xyz"}),                        # chunked
        ):
            assert r.status_code == 413, r.text
            assert "0.25 MB" in r.json()["detail"]
        assert _snapshot(phantom_store) == before
        assert not (phantom_store / "big_eye.jpg").exists()
        # an upload under the limit still works
        r = c.put("/datastore/image?image=small_eye", files={"file": ("small_eye.jpg", _jpg())})
        assert r.status_code == 200, r.text
        assert c.get("/info/").status_code == 200


# ----------------------------------------------------------------------------- ids and tags
BAD_IDS = ["%2e%2e%2fevil", "..%2Fevil", "%2e%2e", "..%5Cevil", "evil%00x", "%2Fetc%2Fpasswd",
           "fundus_0001%2F..%2F..%2Fevil", "%2e%2e%2f%2e%2e%2fstore%2ffundus_0001"]
BAD_TAGS = ["..%2F..%2Fevil", "%2e%2e", "final%2F..%2F..%2Fevil", "%2Ftmp%2Fevil"]


def test_ids_and_tags_with_paths_never_leave_the_datastore(phantom_store, tmp_path):
    outside = phantom_store.parent
    (outside / "secret.txt").write_text("not yours")
    good = _jpg()
    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading")) as c:
        before = _snapshot(outside, skip=("model",))   # the model dir's own state files may change
        label = {"label": ("g.json", b'{"grade": 1}')}
        for q in BAD_IDS:
            assert c.put(f"/datastore/image?image={q}", files={"file": ("x.jpg", good)}).status_code == 400, q
            assert c.put(f"/datastore/?image={q}", files={"file": ("x.jpg", good)}).status_code == 400, q
            assert c.put(f"/datastore/label?image={q}&tag=final", files=label).status_code == 400, q
            assert c.post(f"/infer/grading?image={q}").status_code == 400, q
            assert c.put(f"/datastore/image/info?image={q}", data={"info": "{}"}).status_code == 400, q
            assert c.put(f"/datastore/label/info?label={q}&tag=final", data={"info": "{}"}).status_code == 400, q
            assert c.delete(f"/datastore/image?id={q}").status_code == 400, q
            assert c.delete(f"/datastore/label?id={q}&tag=final").status_code == 400, q
            # reads of such ids find nothing (MONAI Label's own 404s), never a file outside
            assert c.get(f"/datastore/image?image={q}").status_code == 404, q
            assert c.head(f"/datastore/image?image={q}").status_code == 404, q
            assert c.get(f"/datastore/label?label={q}&tag=final").status_code == 404, q
            assert c.get(f"/datastore/image/info?image={q}").json() in ({}, None), q
        for t in BAD_TAGS:
            assert c.put(f"/datastore/label?image=fundus_0001&tag={t}", files=label).status_code == 400, t
            assert c.get(f"/datastore/label?label=fundus_0001&tag={t}").status_code == 404, t
            assert c.delete(f"/datastore/label?id=fundus_0001&tag={t}").status_code == 400, t
            assert c.put(f"/datastore/label/info?label=fundus_0001&tag={t}", data={"info": "{}"}).status_code == 400, t
        # unknown (valid) ids: 404, not MONAI Label's 500
        assert c.put("/datastore/image/info?image=nobody", data={"info": "{}"}).status_code == 404
        assert c.delete("/datastore/image?id=nobody").status_code == 404
        assert c.delete("/datastore/label?id=nobody&tag=final").status_code == 404
        # a train run name is a folder under the model dir: no paths
        r = c.post("/train/grading?run_sync=true", json={"name": "../../escape", "max_epochs": 1})
        assert r.status_code == 400, r.text
        assert not (tmp_path / "model" / ".." / ".." / "escape").exists()
        assert _snapshot(outside, skip=("model",)) == before
        # file names with paths in them: only the id (or the image's id) names what is stored, inside
        r = c.put("/datastore/image", files={"file": ("../../evil_name.jpg", good)})
        assert r.status_code == 200 and r.json()["image"] == "evil_name"
        r = c.put("/datastore/label?image=fundus_0003&tag=final", files={"label": ("../../../fundus_0003.json", b'{"grade": 2}')})
        assert r.status_code == 200, r.text
        after = _snapshot(outside, skip=("model",))
        new = sorted(set(after) - set(before))
        assert new == ["store/evil_name.jpg"] or set(new) <= {"store/evil_name.jpg", "store/labels/final/fundus_0003.grade.json"}
        assert all(p.startswith("store/") for p in set(after) ^ set(before))
        assert (outside / "secret.txt").read_text() == "not yours"
        assert c.get("/info/").status_code == 200


# ----------------------------------------------------------------------------- auth
class FakeRealm:
    """A stand-in for the Keycloak realm MONAI Label's auth talks to (public key, OpenID token endpoint)."""

    def __init__(self):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self.key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.public_b64 = base64.b64encode(der).decode()
        self.users = {"annie": ("secret", ["monailabel-user", "monailabel-annotator"]), "vic": ("secret", ["monailabel-user"])}
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}/realms/monailabel"
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def _json(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/realms/monailabel":
                    return self._json(200, {"realm": "monailabel", "public_key": realm.public_b64})
                if self.path == "/realms/monailabel/.well-known/openid-configuration":
                    return self._json(200, {"token_endpoint": f"{realm.uri}/protocol/openid-connect/token"})
                return self._json(404, {})

            def do_POST(self):
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                user, pw = form.get("username", [""])[0], form.get("password", [""])[0]
                if self.path.endswith("/token") and user in realm.users and realm.users[user][0] == pw:
                    return self._json(200, {"access_token": realm.token(user), "token_type": "Bearer", "expires_in": 300})
                return self._json(401, {"error": "invalid_grant"})

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, user, roles=None, ttl=300, key=None):
        import jwt
        from cryptography.hazmat.primitives import serialization

        k = key or self.key
        pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        now = int(time.time())
        payload = {"preferred_username": user, "email": f"{user}@example.org", "name": user,
                   "realm_access": {"roles": roles if roles is not None else self.users[user][1]},
                   "iat": now, "exp": now + ttl}
        return jwt.encode(payload, pem, algorithm="RS256")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "bench" / "load_test.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    realm = FakeRealm()
    base = tmp_path_factory.mktemp("auth")
    store = write_phantom_store(base / "store", n=6, labelled=4, seed=3)
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.uri, "MONAI_LABEL_AUTH_TIMEOUT": "10"}
    with bench.running_server(store, base / "model", conf={"models": "grading", "max_upload_mb": "0.0625"}, env=env,
                              log_path=base / "server.log") as url:
        yield url, realm, store
    realm.server.shutdown()


def test_auth_refuses_unauthenticated_calls_and_accepts_realm_tokens(auth_server):
    url, realm, store = auth_server
    before = _snapshot(store)
    # what the Slicer module asks first, then the token it fetches with the user's name and password
    assert requests.get(f"{url}/auth/").json()["enabled"] is True
    for method, path, kw in (("get", "/info/", {}), ("get", "/datastore/?output=all", {}),
                             ("post", "/infer/grading?image=fundus_0001", {}), ("post", "/activelearning/random", {"json": {}}),
                             ("put", "/datastore/image?image=intruder", {"files": {"file": ("i.jpg", _jpg())}}),
                             ("put", "/datastore/label?image=fundus_0001&tag=final", {"files": {"label": ("g.json", b'{"grade": 4}')}}),
                             ("post", "/train/grading", {"json": {"max_epochs": 1}})):
        r = requests.request(method, url + path, **kw)
        assert r.status_code == 401, (path, r.status_code, r.text)
        bad = {"Authorization": "Bearer not.a.token"}
        assert requests.request(method, url + path, headers=bad, **kw).status_code == 401, path
        forged = {"Authorization": f"Bearer {realm.token('annie', key=realm.other_key)}"}
        assert requests.request(method, url + path, headers=forged, **kw).status_code == 401, path
        expired = {"Authorization": f"Bearer {realm.token('annie', ttl=-60)}"}
        assert requests.request(method, url + path, headers=expired, **kw).status_code == 401, path
    assert _snapshot(store) == before
    assert requests.post(f"{url}/reload").status_code in (404, 405)   # MONAI Label's unauthenticated app rebuild is gone

    r = requests.post(f"{url}/auth/token", data={"username": "annie", "password": "secret", "grant_type": "password"})
    assert r.status_code == 200, r.text
    tok = r.json()
    headers = {"Authorization": f"{tok['token_type']} {tok['access_token']}"}   # as the module's update_auth sets it
    r = requests.get(f"{url}/auth/token/valid", headers=headers)
    assert r.status_code == 200 and r.json()["username"] == "annie", r.text
    assert requests.post(f"{url}/auth/token", data={"username": "annie", "password": "wrong"}).status_code != 200
    assert requests.get(f"{url}/info/", headers=headers).status_code == 200
    assert requests.post(f"{url}/infer/grading?image=fundus_0001", headers=headers).status_code == 409  # past auth: untrained
    r = requests.put(f"{url}/datastore/label?image=fundus_0001&tag=final", headers=headers,
                     files={"label": ("g.json", b'{"grade": 4}')})
    assert r.status_code == 200, r.text
    # a user without the annotator role may look but not save
    viewer = {"Authorization": f"Bearer {realm.token('vic')}"}
    assert requests.get(f"{url}/info/", headers=viewer).status_code == 200
    r = requests.put(f"{url}/datastore/label?image=fundus_0002&tag=final", headers=viewer,
                     files={"label": ("g.json", b'{"grade": 1}')})
    assert r.status_code == 403


def test_upload_limit_over_real_http(auth_server):
    url, realm, store = auth_server
    headers = {"Authorization": f"Bearer {realm.token('annie')}"}
    before = _snapshot(store)
    big = np.random.default_rng(0).bytes(300 * 1024)        # over 0.0625 MB (64 KiB)
    r = requests.put(f"{url}/datastore/image?image=big_eye", headers=headers, files={"file": ("big_eye.jpg", big)})
    assert r.status_code == 413, r.text
    # chunked (no Content-Length): a well-formed multipart body, so that the parser reads on until the limit
    # stops it (random bytes after "boundary=b" made the parser answer 400 first when the chunks came in
    # small pieces, a race with the limit)
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="big_eye.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + big + b"\r\n--b--\r\n")
    r = requests.put(f"{url}/datastore/image?image=big_eye", headers={**headers, "Content-Type": "multipart/form-data; boundary=b"},
                     data=(body[i:i + 16384] for i in range(0, len(body), 16384)))                         # chunked
    assert r.status_code == 413, r.text
    r = requests.put(f"{url}/datastore/label?image=fundus_0003&tag=final", files={"label": ("l.nrrd", big)})
    assert r.status_code == 413                                  # the limit holds before authentication too
    assert _snapshot(store) == before
    assert requests.get(f"{url}/info/", headers=headers).status_code == 200


def test_token_check_fix_unit(monkeypatch):
    """MONAI Label 0.8.5's own check refuses every token under PyJWT 2; the app's accepts the realm's
    asymmetric signatures only (an HS256 token keyed with the public key is refused)."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from monailabel.config import settings
    from monailabel.endpoints.user import auth as ml_auth

    from monailabel_dr.lib import auth

    realm = FakeRealm()
    realm.server.shutdown()
    pem = realm.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(ml_auth, "get_public_key", lambda uri: pem.decode())
    good = realm.token("annie")
    with pytest.raises(jwt.InvalidTokenError):
        ml_auth.from_token(good)                      # stock: "algorithms" missing
    user = auth.from_token(good)
    assert user.username == "annie" and "monailabel-annotator" in user.roles
    confused = jwt.encode({"preferred_username": "mallory", "exp": int(time.time()) + 60}, "k" * 32, algorithm="HS256")
    with pytest.raises(jwt.InvalidTokenError):
        auth.from_token(confused)
    with pytest.raises(jwt.InvalidTokenError):
        auth.from_token(realm.token("annie", ttl=-10))
