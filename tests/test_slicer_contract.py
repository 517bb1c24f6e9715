"""The REST contract 3D Slicer's MONAI Label module relies on, exercised the way the module calls it.

A real `monailabel start_server` (tiny profiles, every model) on a loopback port, driven by
`SlicerStyleClient`: http.client requests shaped like the module's client
(plugins/slicer/MONAILabel/MONAILabelLib/client.py in MONAILabel 0.8.5): its multipart encoding
(boundary, `params` field, `label` / `file` parts named by the local file path), JSON bodies
with `client_id` for next sample and train, and `result_extension=.nrrd` / `result_dtype=uint8`
on every infer. Results are read as the module reads them: the multipart answer split into
form fields and files by file name, the label map opened with SimpleITK.

Checked: which models Slicer shows and their label names / colours; the segments it creates
(`/info` labels) and how it numbers them on export; that the label maps it receives have the
photograph's geometry (size, spacing, origin, directions as SimpleITK loads the png/jpg) and put
pixels where the photograph has them (an off-centre field of view; phantom lesion masks); that
label maps saved as Slicer saves them (.nii.gz, its default, and .nrrd; int16; `label_info`) are
stored with the right lesion values, can be downloaded back, and train the lesion models; and
that unusable label maps are refused with 4xx and change nothing.
"""

from __future__ import annotations

import email
import http.client
import importlib.util
import json
import mimetypes
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import quote_plus, urlparse

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, write_phantom_store
from monailabel_dr.fundus import io as fio
from monailabel_dr.fundus.geometry import detect_fov
from monailabel_dr.fundus.lesions import LESION_VALUES, LESIONS
from monailabel_dr.fundus.phantoms import make_phantom
from monailabel_dr.lib.slicer import SLICER_MODEL_TYPES

SIZE = (240, 320)


def _bench():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "bench" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- a client shaped like Slicer's
class SlicerStyleClient:
    """The HTTP requests of the Slicer module's MONAILabelClient, written with http.client as it does."""

    BOUNDARY = "----------lImIt_of_THE_fIle_eW_$"   # the module's fixed multipart boundary

    def __init__(self, url: str, tmpdir: str, client_id: str = "slicer-contract-test"):
        self.url = url
        self.tmpdir = tmpdir
        self.client_id = client_id

    def _conn(self):
        u = urlparse(self.url)
        return http.client.HTTPConnection(u.hostname, u.port, timeout=900)

    def _send(self, method, selector, body=None, content_type=None):
        headers = {}
        if body is not None:
            headers = {"content-type": content_type, "content-length": str(len(body))}
        conn = self._conn()
        conn.request(method, selector, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data, r.getheader("content-type", "")

    def _json(self, method, selector, params=None):
        body = json.dumps(params).encode() if params is not None else None
        status, data, _ = self._send(method, selector, body, "application/json" if body is not None else None)
        return status, (json.loads(data) if data else None)

    def _multipart(self, method, selector, fields: dict, files: dict):
        lines = []
        for k, v in fields.items():
            lines += [f"--{self.BOUNDARY}", f'Content-Disposition: form-data; name="{k}"', "", v]
        for k, path in files.items():
            ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
            lines += [f"--{self.BOUNDARY}", f'Content-Disposition: form-data; name="{k}"; filename="{path}"',
                      f"Content-Type: {ctype}", "", Path(path).read_bytes()]
        lines += [f"--{self.BOUNDARY}--", ""]
        body = bytearray()
        for line in lines:
            body += line if isinstance(line, bytes) else line.encode()
            body += b"\r\n"
        return self._send(method, selector, bytes(body), f"multipart/form-data; boundary={self.BOUNDARY}")

    def _with_client_id(self, params):
        p = dict(params or {})
        p["client_id"] = self.client_id
        return p

    # the module's calls
    def info(self):
        return self._json("GET", "/info/")

    def next_sample(self, strategy, params=None):
        return self._json("POST", f"/activelearning/{quote_plus(strategy)}", self._with_client_id(params))

    def upload_image(self, path, image_id, params=None):
        fields = {"params": json.dumps(self._with_client_id(params))}
        status, data, _ = self._multipart("PUT", f"/datastore/?image={quote_plus(image_id)}", fields, {"file": path})
        return status, json.loads(data)

    def save_label(self, image_id, path, tag="final", params=None):
        selector = f"/datastore/label?image={quote_plus(image_id)}&tag={quote_plus(tag)}"
        status, data, _ = self._multipart("PUT", selector, {"params": json.dumps(self._with_client_id(params))},
                                          {"label": path})
        return status, json.loads(data)

    def infer(self, model, image_id, params):
        """MONAILabelLogic.infer: adds result_extension .nrrd and result_dtype uint8; returns (file, params)."""
        p = self._with_client_id(params)
        p.update({"result_extension": ".nrrd", "result_dtype": "uint8"})
        selector = f"/infer/{quote_plus(model)}?image={quote_plus(image_id)}"
        status, data, ctype = self._multipart("POST", selector, {"params": json.dumps(p)}, {})
        if status != 200:
            return status, data, None
        form, files = {}, {}
        if "multipart" in ctype:
            msg = email.message_from_bytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + data)
            for part in msg.get_payload():
                name = part.get_param("name", header="content-disposition")
                if part.get_filename():
                    files[part.get_filename()] = part.get_payload(decode=True)
                else:
                    form[name] = part.get_payload(decode=True).decode()
        else:
            form = json.loads(data)
        result = json.loads(form["params"]) if files else form
        out = None
        for name, content in files.items():   # the module saves the first file under its own name
            out = os.path.join(self.tmpdir, name)
            Path(out).write_bytes(content)
            break
        return status, out, result

    def train_start(self, model, params):
        return self._json("POST", f"/train/{quote_plus(model)}", self._with_client_id(params))

    def train_status(self):
        return self._json("GET", "/train/")

    def download_label(self, label_id, tag):
        status, data, _ = self._send("GET", f"/datastore/label?label={quote_plus(label_id)}&tag={quote_plus(tag)}")
        return status, data

    def config(self, info, section, name):
        """MONAILabelWidget.getParamsFromConfig: the /info config of a model/trainer/strategy, lists -> first."""
        cfg = info.get(section, {}).get(name, {}).get("config", {})
        return {k: v[0] if isinstance(v, list) else v for k, v in cfg.items()}


# ----------------------------------------------------------------------------- data as Slicer has it
def slicer_label_file(label: np.ndarray, path: str) -> str:
    """What "Submit Label" writes: ExportSegmentsToLabelmapNode (int16 labelmap on the photograph's
    grid: (W, H, 1), spacing 1, origin 0, LPS identity) saved with ITK (.nii.gz by default, or .nrrd)."""
    img = sitk.GetImageFromArray(label.astype(np.int16)[None])
    sitk.WriteImage(img, path, True)
    return path


def off_centre_phantom(seed: int):
    """A phantom pasted into a larger black canvas off-centre: (image, lesion label map, FOV mask)."""
    ph = make_phantom(seed, size=SIZE, grade=3)
    canvas = np.zeros((SIZE[0] + 70, SIZE[1] + 130, 3), np.uint8)
    r0, c0 = 55, 120
    canvas[r0:r0 + SIZE[0], c0:c0 + SIZE[1]] = ph.image
    lab = np.zeros(canvas.shape[:2], np.uint8)
    fov = np.zeros(canvas.shape[:2], bool)
    for les in ("EX", "SE", "HE", "MA"):
        lab[r0:r0 + SIZE[0], c0:c0 + SIZE[1]][ph.masks[les]] = LESION_VALUES[les]
    fov[r0:r0 + SIZE[0], c0:c0 + SIZE[1]] = ph.fov
    return canvas, lab, fov


def truth_label(seed: int) -> np.ndarray:
    ph = make_phantom(seed, size=SIZE)
    lab = np.zeros(SIZE, np.uint8)
    for les in ("EX", "SE", "HE", "MA"):
        lab[ph.masks[les]] = LESION_VALUES[les]
    return lab


def _snapshot(store) -> dict:
    out = {}
    for root, _, files in os.walk(store):
        for f in files:
            if f != ".lock":
                p = os.path.join(root, f)
                st = os.stat(p)
                out[os.path.relpath(p, store)] = (st.st_size, st.st_mtime_ns)
    return out


def _geometry(img: sitk.Image):
    """Size, spacing, origin and direction of an image as 3-D (a 2-D image gets a unit third axis)."""
    d = img.GetDimension()
    size, spacing, origin = list(img.GetSize()), list(img.GetSpacing()), list(img.GetOrigin())
    direction = np.array(img.GetDirection()).reshape(d, d)
    if d == 2:
        size, spacing, origin = size + [1], spacing + [1.0], origin + [0.0]
        direction = np.block([[direction, np.zeros((2, 1))], [np.zeros((1, 2)), np.ones((1, 1))]])
    return size, np.array(spacing), np.array(origin), direction


# ----------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def slicer(tmp_path_factory):
    base = tmp_path_factory.mktemp("slicer")
    store = write_phantom_store(base / "store", n=10, labelled=8, seed=0, size=SIZE)
    tmpdir = base / "client"
    tmpdir.mkdir()
    with _bench().running_server(store, base / "model", conf={"models": "all"}, log_path=base / "server.log") as url:
        yield SlicerStyleClient(url, str(tmpdir)), store, base


def _ensure_offcentre_uploaded(slicer) -> None:
    """The off-centre photograph in the datastore, whichever test runs first (they share the server)."""
    client, store, base = slicer
    if not (store / "offcentre_eye.png").is_file():
        canvas, _, _ = off_centre_phantom(321)
        path = str(base / "client" / "offcentre_eye.png")
        fio.write_image(path, canvas)
        status, res = client.upload_image(path, "offcentre_eye")
        assert status == 200, res


def _ensure_lesion_seg_trained(slicer) -> None:
    client, store, base = slicer
    _, info = client.info()
    if not info["model_state"]["lesion_seg"]["trained"]:
        if not (store / "labels" / "final" / "offcentre_eye.nii.gz").is_file():
            _, lab, _ = off_centre_phantom(321)
            path = slicer_label_file(lab, str(base / "client" / "offcentre.nii.gz"))
            status, res = client.save_label("offcentre_eye", path, params={
                "label_info": [{"name": n, "idx": k + 1} for k, n in enumerate(LESIONS)]})
            assert status == 200, res
        status, res = client._json("POST", "/train/lesion_seg?run_sync=true", {"max_epochs": 1})
        assert status == 200, res


# ----------------------------------------------------------------------------- tests (they share the server; each
# makes what it needs with the _ensure_* helpers, so they pass in any order)
def test_info_models_labels_and_colours_as_slicer_reads_them(slicer):
    client, _, _ = slicer
    status, info = client.info()
    assert status == 200
    models = info["models"]
    shown = {k: v for k, v in models.items() if v.get("type", "segmentation") in SLICER_MODEL_TYPES}
    assert {"cam", "lesion_seg", "lesion_sam", "twlr_inpaint"} <= set(shown)
    assert "grading" not in shown and "twlr_vlm" not in shown      # classification: invisible in Slicer
    for name, m in shown.items():
        labels = m["labels"]
        assert isinstance(labels, dict) and labels, name
        # label value k = the k-th name sorted by value (ImportLabelmapToSegmentationNode): 1..N, no gaps
        assert sorted(labels.values()) == list(range(1, len(labels) + 1)), (name, labels)
        assert m["dimension"] == 2
        assert set(m["label_colors"]) == set(labels), name
        for rgb in m["label_colors"].values():
            assert len(rgb) == 3 and all(0 <= c <= 255 for c in rgb)
        # every config value the module would send back as an infer parameter is JSON-plain
        assert all(isinstance(v, (str, int, float, bool, list)) for v in m["config"].values()), name
    for name in ("lesion_seg", "lesion_sam", "twlr_inpaint"):
        assert models[name]["labels"] == {les: LESION_VALUES[les] for les in LESIONS}
    colours = models["lesion_seg"]["label_colors"]
    r, g, b = (np.array(colours[k]) for k in ("MA", "HE", "SE"))
    assert r.argmax() == 0 and g.argmax() == 1 and b.argmax() == 2          # MA red, HE green, SE blue
    assert min(colours["EX"][:2]) > 200 and colours["EX"][2] < 100          # EX yellow
    # the segments Slicer creates for an image: the lesions, in label-value order, so that the
    # export (k-th segment -> value k) gives MA 1, HE 2, EX 3, SE 4
    assert info["labels"] == list(LESIONS)
    # auto-segmentation on "Next Sample" picks the first model holding the first segment name
    first = next(k for k, v in models.items() if info["labels"][0] in v.get("labels", []))
    assert first == "lesion_seg"
    # the strategies and trainers the module lists
    assert {"random", "first"} <= set(info["strategies"]) and {"lesion_seg", "grading"} <= set(info["trainers"])


def test_next_sample_and_image_download(slicer):
    client, store, _ = slicer
    status, sample = client.next_sample("random", {})
    assert status == 200 and sample["id"]
    # the photograph's file in the datastore (jpg phantoms; png for images other tests uploaded)
    local = next(store.glob(f"{sample['id']}.*"))
    assert os.path.realpath(sample["path"]) == os.path.realpath(local)
    # a remote Slicer downloads it instead: same bytes
    status, data, _ = client._send("GET", f"/datastore/image?image={quote_plus(sample['id'])}")
    assert status == 200 and data == local.read_bytes()
    status, sample2 = client.next_sample("first", {})
    assert status == 200 and sample2["id"]


def test_upload_image_as_slicer_does(slicer):
    client, store, base = slicer
    canvas, _, _ = off_centre_phantom(322)
    path = str(base / "client" / "uploaded_eye.png")
    fio.write_image(path, canvas)
    status, res = client.upload_image(path, "uploaded_eye")
    assert status == 200, res
    assert res["image"] == "uploaded_eye" and (store / "uploaded_eye.png").is_file()
    status, res = client.upload_image(path, "uploaded_eye")
    assert status == 409, res                                  # an id is never silently overwritten


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_submitted_slicer_label_maps_are_stored_with_lesion_values(slicer, ext):
    client, store, base = slicer
    for i, image_id in enumerate(["fundus_0000", "fundus_0001"] if ext == ".nii.gz" else ["fundus_0002", "fundus_0003"]):
        seed = int(image_id[-4:])
        truth = truth_label(seed)
        if i == 0:   # segments in the app's order: values are already lesion values
            label_info = [{"name": n, "idx": k + 1} for k, n in enumerate(LESIONS)]
            exported = truth.copy()
        else:        # the annotator's own order and full names: Slicer numbers the k-th segment k
            order = ["Hard exudates", "Microaneurysms", "Soft exudates", "Haemorrhages"]
            label_info = [{"name": n, "idx": k + 1} for k, n in enumerate(order)]
            codes = ["EX", "MA", "SE", "HE"]
            exported = np.zeros_like(truth)
            for k, code in enumerate(codes):
                exported[truth == LESION_VALUES[code]] = k + 1
        path = slicer_label_file(exported, tempfile.NamedTemporaryFile(suffix=ext, dir=base / "client").name)
        status, res = client.save_label(image_id, path, params={"label_info": label_info})
        assert status == 200, res
        stored = fio.read_label(store / "labels" / "final" / f"{image_id}{ext}")
        assert np.array_equal(stored, truth), image_id
        # what the module downloads (e.g. an 'original' label on Next Sample) loads back at the same pixels
        status, data = client.download_label(image_id, "final")
        assert status == 200
        p = base / "client" / f"dl_{image_id}{ext}"
        p.write_bytes(data)
        img = sitk.ReadImage(str(p))
        assert sitk.GetArrayFromImage(img).reshape(SIZE).tolist() == truth.tolist()
        assert _geometry(img)[0] == [SIZE[1], SIZE[0], 1]
        _, info = client._json("GET", f"/datastore/label/info?label={image_id}&tag=final")
        assert info["label_info"] == label_info and info["kind"] == "lesion_map"


def test_off_centre_label_and_training_from_slicer_labels(slicer):
    client, store, base = slicer
    _ensure_offcentre_uploaded(slicer)
    _, lab, _ = off_centre_phantom(321)
    path = slicer_label_file(lab, str(base / "client" / "offcentre.nii.gz"))
    status, res = client.save_label("offcentre_eye", path,
                                    params={"label_info": [{"name": n, "idx": k + 1} for k, n in enumerate(LESIONS)]})
    assert status == 200, res
    assert np.array_equal(fio.read_label(store / "labels" / "final" / "offcentre_eye.nii.gz"), lab)

    # "Train": POST /train/lesion_seg with the trainer's config from /info, in MONAI Label's background
    # subprocess as Slicer starts it, polled through GET /train/ as the module does
    _, info = client.info()
    params = client.config(info, "trainers", "lesion_seg")
    params.update({"max_epochs": 1})
    status, res = client.train_start("lesion_seg", params)
    assert status == 200, res
    deadline = time.time() + 600
    while time.time() < deadline:
        _, st = client.train_status()
        if st.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(1)
    assert st.get("status") == "DONE", st
    _, info = client.info()
    assert info["model_state"]["lesion_seg"]["trained"] is True
    assert info["train_stats"]["lesion_seg"]["epoch"] == 1
    # the other lesion trainer reads the same Slicer labels (in-process run, to keep the test short)
    status, res = client._json("POST", "/train/lesion_sam?run_sync=true", {"max_epochs": 1, "client_id": "x"})
    assert status == 200, res
    assert res["epoch"] == 1


def _check_result_geometry(result_file: str, source: Path):
    """The label map Slicer reads (SimpleITK) lies on the grid SimpleITK gives the photograph."""
    assert result_file.endswith(".nrrd")
    lab_img = sitk.ReadImage(result_file)
    src_img = sitk.ReadImage(str(source))
    size, spacing, origin, direction = _geometry(lab_img)
    s_size, s_spacing, s_origin, s_direction = _geometry(src_img)
    assert size == s_size
    np.testing.assert_allclose(spacing, s_spacing)
    np.testing.assert_allclose(origin, s_origin)
    np.testing.assert_allclose(direction, s_direction)
    header = nrrd.read_header(result_file)
    assert header["type"] in ("unsigned char", "uint8") and header["dimension"] == 3
    assert list(header["sizes"]) == s_size
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space directions"], np.eye(3))
    np.testing.assert_allclose(header["space origin"], np.zeros(3))
    return sitk.GetArrayFromImage(lab_img)[0]   # (H, W): row, column as in the photograph


def test_infer_lesion_seg_nrrd_lands_on_the_photograph(slicer):
    client, store, _ = slicer
    _ensure_offcentre_uploaded(slicer)
    _ensure_lesion_seg_trained(slicer)
    _, info = client.info()
    params = client.config(info, "models", "lesion_seg")
    # a tiny one-epoch model: any lesion probability counts, so the map covers the field of view
    params["threshold"] = 1e-6
    status, result_file, result = client.infer("lesion_seg", "offcentre_eye", params)
    assert status == 200, result_file
    lab = _check_result_geometry(result_file, store / "offcentre_eye.png")
    assert set(np.unique(lab)) <= {0, 1, 2, 3, 4}
    names = [k for k, _ in sorted(info["models"]["lesion_seg"]["labels"].items(), key=lambda kv: kv[1])]
    assert names == list(LESIONS)          # value k -> the k-th name: MA 1 ... SE 4
    # pixel positions: the labelled pixels are the photograph's field of view (off-centre in a black canvas)
    _, _, fov = off_centre_phantom(321)
    fov_detected = detect_fov(fio.to_rgb_float(fio.read_image(store / "offcentre_eye.png")))
    inter = np.logical_and(lab > 0, fov).sum()
    assert inter / np.logical_or(lab > 0, fov).sum() > 0.9
    assert not (lab > 0)[~np.asarray(fov_detected)].any()
    assert result["image_size"] == list(lab.shape)
    # a jpg of the datastore too
    status, result_file, _ = client.infer("lesion_seg", "fundus_0004", client.config(info, "models", "lesion_seg"))
    assert status == 200
    _check_result_geometry(result_file, store / "fundus_0004.jpg")


def test_infer_cam_nrrd_lands_on_the_photograph(slicer):
    client, store, _ = slicer
    _ensure_offcentre_uploaded(slicer)
    status, res = client._json("POST", "/train/grading?run_sync=true", {"max_epochs": 1})
    assert status == 200, res
    _, info = client.info()
    status, result_file, result = client.infer("cam", "offcentre_eye", client.config(info, "models", "cam"))
    assert status == 200, result_file
    lab = _check_result_geometry(result_file, store / "offcentre_eye.png")
    assert set(np.unique(lab)) <= set(range(len(info["models"]["cam"]["labels"]) + 1))
    _, _, fov = off_centre_phantom(321)
    from scipy import ndimage

    assert (lab > 0).any() and not (lab > 0)[~ndimage.binary_dilation(fov, iterations=2)].any()
    for reg in result["regions"]:       # region boxes in the photograph's pixels, inside the field of view
        x0, y0, x1, y1 = reg["bbox"]
        assert fov[y0:y1, x0:x1].any()


def test_unusable_slicer_label_maps_are_refused_and_change_nothing(slicer):
    client, store, base = slicer
    before = _snapshot(store)
    truth = truth_label(5)
    d = base / "client"
    lesions_info = {"label_info": [{"name": n, "idx": k + 1} for k, n in enumerate(LESIONS)]}
    three = sitk.GetImageFromArray(np.stack([truth] * 3).astype(np.int16))
    sitk.WriteImage(three, str(d / "three.nii.gz"))
    cases = [
        # wrong sizes: labelled pixels off the photograph's grid (a grid of another size whose labels all
        # fall on the photograph is a cropped/padded segmentation and is placed, by design: fundus/io.py)
        (slicer_label_file(np.pad(truth, ((0, 10), (0, 0)), constant_values=1), str(d / "taller.nii.gz")),
         lesions_info, 422),
        (slicer_label_file(truth.T, str(d / "transposed.nrrd")), lesions_info, 422),
        (slicer_label_file(np.full(SIZE, 9, np.int16), str(d / "nine.nii.gz")), {}, 422),                # wrong values
        (slicer_label_file(truth, str(d / "drusen.nii.gz")),                                             # an unknown segment in use
         {"label_info": [{"name": "MA", "idx": 1}, {"name": "Drusen", "idx": 2}]}, 422),
        (slicer_label_file(np.where(truth > 0, 6, 0), str(d / "beyond.nrrd")), lesions_info, 422),      # value without a segment
        (str(d / "three.nii.gz"), lesions_info, 422),                                                   # a 3-slice volume
    ]
    for path, params, code in cases:
        status, res = client.save_label("fundus_0005", path, params=params)
        assert status == code, (path, status, res)
        assert res["detail"], path
    # an image that is not there
    status, _ = client.save_label("no_such_image", str(d / "drusen.nii.gz"), params=lesions_info)
    assert status == 404
    assert _snapshot(store) == before
    assert client.info()[0] == 200


def test_segment_list_and_name_translation_units():
    from monailabel_dr.lib.errors import ClientError
    from monailabel_dr.lib.slicer import lesion_code, segment_labels, to_lesion_values

    cam = {"type": "segmentation", "labels": {"CAM >= 0.20": 1, "CAM >= 0.40": 2}}
    grading = {"type": "classification", "labels": {"No DR": 0, "Mild NPDR": 1}}
    lesion = {"type": "segmentation", "labels": {les: LESION_VALUES[les] for les in LESIONS}}
    assert segment_labels({"grading": grading, "cam": cam}) == ["CAM >= 0.20", "CAM >= 0.40"]   # grading-only server
    assert segment_labels({"grading": grading, "cam": cam, "lesion_seg": lesion}) == list(LESIONS)
    assert [lesion_code(n) for n in ("ma", "Microaneurysm", "haemorrhages", "Hard exudates", "SE", "drusen")] == \
        ["MA", "MA", "HE", "EX", "SE", None]
    lab = np.array([[0, 1, 2], [3, 0, 1]])
    out = to_lesion_values(lab, {1: "Soft exudates", 2: "background", 3: "MA", 4: "Drusen"}, "test")
    assert out.tolist() == [[0, 4, 0], [1, 0, 4]]                    # an unused unknown segment (4) is ignored
    # label_info: Slicer numbers the k-th exported segment k; "idx" counts skipped segments (background)
    from monailabel_dr.lib.slicer import _names_from_label_info

    def names(info, present):
        return _names_from_label_info(info, present)[0]

    # idx is the segment's value in the map, whenever the map's values are among the idx
    assert names([{"name": "EX", "idx": 3}], {3}) == {3: "EX"}
    assert names([{"name": "EX", "idx": 2}, {"name": "MA", "idx": 3}], {2, 3}) == {2: "EX", 3: "MA"}
    assert names([{"name": "EX", "idx": 1}, {"name": "MA", "idx": 2}], {1, 2}) == {1: "EX", 2: "MA"}
    assert names([{"name": "HE", "idx": 2}, {"name": "MA", "idx": 1}], {1, 2}) == {2: "HE", 1: "MA"}
    # Slicer after a skipped (background) segment: idx 2, 3 but the exported values are 1, 2: by position
    assert names([{"name": "EX", "idx": 2}, {"name": "MA", "idx": 3}], {1, 2}) == {1: "EX", 2: "MA"}
    assert "position" in _names_from_label_info([{"name": "EX", "idx": 2}, {"name": "MA", "idx": 3}], {1})[1]
    assert names(json.dumps([{"name": "SE"}]), {1}) == {1: "SE"}
    assert _names_from_label_info([{"idx": 1}], {1}) is None and _names_from_label_info({"MA": 1}, {1}) is None
    with pytest.raises(ClientError) as e:
        to_lesion_values(lab, {1: "MA", 2: "Drusen"}, "test")
    assert e.value.status_code == 422 and "Drusen" in e.value.detail and "3 (no segment)" in e.value.detail


def test_label_info_idx_is_the_segment_value(phantom_store, tmp_path):
    """A client that says {"name": "EX", "idx": 3} for a map whose EX pixels are 3 is taken at its word."""
    from conftest import serve_in_process, tiny_conf
    from monailabel_dr.fundus import io as fio

    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="lesion_seg")) as client:
        image = sorted(client.get("/datastore/?output=all").json()["objects"])[0]
        h, w = fio.read_image(phantom_store / f"{image}.jpg").shape[:2]
        # (segment named, its value in the map, the box drawn): EX as 3 (its own value), SE as 2 (HE's value)
        for name, value, box in (("EX", 3, (40, 60, 50, 90)), ("SE", 2, (10, 20, 10, 30))):
            lab = np.zeros((h, w), np.uint8)
            lab[box[0]:box[1], box[2]:box[3]] = value
            path = fio.write_label(tmp_path / f"{name}.png", lab)
            with open(path, "rb") as f:
                r = client.put("/datastore/label", params={"image": image, "tag": "final"},
                               data={"params": json.dumps({"label_info": [{"name": name, "idx": value}]})},
                               files={"label": (f"{image}.png", f)})
            assert r.status_code == 200, r.text
            saved = fio.read_label(phantom_store / "labels" / "final" / f"{image}.png")
            assert set(np.unique(saved).tolist()) == {0, LESION_VALUES[name]}, name
            assert (saved == LESION_VALUES[name]).sum() == (box[1] - box[0]) * (box[3] - box[2])
