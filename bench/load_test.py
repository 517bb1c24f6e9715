"""Concurrent load on a real `monailabel start_server` while a training job runs.

Starts the app (uvicorn, one worker, loopback port) on a phantom datastore, trains a tiny
`lesion_seg` and `grading` so /infer has models to serve, starts a background training job
(MONAI Label's train subprocess, as `POST /train/grading` from a client does), then fires
N parallel `/infer` requests (lesion_seg as .nrrd the way 3D Slicer asks, grading, cam) and
N parallel `PUT /datastore/label` saves (Slicer-style label maps with `label_info`, and grade
JSON), each save on its own image. Afterwards every accepted label is checked on disk (file
content), in the server's datastore listing and in `datastore_v2.json` once training ended,
and `/info/` must still answer. Prints one JSON object: p50/p95/max latency per endpoint, the
error count, lost labels, server state. Asserts nothing (tests/test_load.py does, at small N).

    .venv/bin/python bench/load_test.py                 # 20 infers + 20 label saves
    .venv/bin/python bench/load_test.py --n-infer 40 --n-labels 40 --json load.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "monailabel_dr"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# the server: monailabel_dr/serving.py (shared with the tests)
from monailabel_dr.serving import running_server  # noqa: E402


# ----------------------------------------------------------------------------- payloads
def slicer_label_bytes(label: np.ndarray, ext: str = ".nii.gz") -> bytes:
    """A label map as 3D Slicer's "Submit Label" writes it: int16, (W, H, 1), spacing 1, origin 0, LPS identity."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(label.astype(np.int16)[None])
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "label" + ext)
        sitk.WriteImage(img, p, True)
        return Path(p).read_bytes()


def phantom_label_map(seed: int, size=(240, 320)) -> np.ndarray:
    from monailabel_dr.fundus.lesions import label_map_from_masks
    from monailabel_dr.fundus.phantoms import make_phantom

    return label_map_from_masks(make_phantom(seed, size=size).masks)


LABEL_INFO = [{"name": n, "idx": i + 1} for i, n in enumerate(("MA", "HE", "EX", "SE"))]


def save_lesion_label(url: str, image_id: str, label: np.ndarray, ext: str = ".nii.gz", timeout: float = 600):
    return requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                        data={"params": json.dumps({"label_info": LABEL_INFO, "client_id": "load-test"})},
                        files={"label": (f"{image_id}{ext}", slicer_label_bytes(label, ext))}, timeout=timeout)


def save_grade_label(url: str, image_id: str, grade: int, timeout: float = 600):
    return requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                        files={"label": (f"{image_id}.json", json.dumps({"grade": grade}).encode())}, timeout=timeout)


def infer(url: str, model: str, image_id: str, timeout: float = 600):
    params = {"client_id": "load-test"}
    if model in ("lesion_seg", "cam"):
        params.update({"result_extension": ".nrrd", "result_dtype": "uint8"})
    return requests.post(f"{url}/infer/{model}", params={"image": image_id},
                         data={"params": json.dumps(params)}, timeout=timeout)


# ----------------------------------------------------------------------------- the run
def _pct(values, q):
    return round(float(np.percentile(values, q)), 3) if values else None


def _summary(rows):
    lat = [r["latency_s"] for r in rows]
    ok = [r for r in rows if r["ok"]]
    return {"n": len(rows), "ok": len(ok), "errors": len(rows) - len(ok),
            "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95), "max_s": round(max(lat), 3) if lat else None,
            "statuses": sorted({str(r["status"]) for r in rows})}


def wait_training(url: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    status: dict = {}
    while time.time() < deadline:
        status = requests.get(f"{url}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        time.sleep(1)
    return status


def run(n_infer: int = 20, n_labels: int = 20, workers: int | None = None, train_epochs: int = 40,
        seed: int = 0, workdir: str | None = None, keep: bool = False, log=print) -> dict:
    from monailabel_dr.demo import write_demo
    from monailabel_dr.fundus import io as fio

    t_start = time.time()
    base = Path(workdir or tempfile.mkdtemp(prefix="mldr_load_"))
    base.mkdir(parents=True, exist_ok=True)
    size = (240, 320)
    n_images = max(24, n_labels + 8)
    store = base / "store"
    write_demo(str(store), n=n_images, labelled=16, seed=seed, size=size, workers=1)
    ids = sorted(p.stem for p in store.glob("fundus_*.jpg"))
    seg_train_ids = ids[:6]                       # lesion maps for the initial lesion_seg
    label_ids = ids[8:8 + n_labels]               # one save per image under load
    rng = random.Random(seed)
    result: dict = {"n_infer": n_infer, "n_labels": n_labels, "images": n_images, "image_size": list(size)}
    with running_server(store, base / "model", conf={"models": "grading,lesion_seg"}, log_path=base / "server.log") as url:
        log(f"server up at {url} ({time.time() - t_start:.1f} s)")
        for i, image_id in enumerate(seg_train_ids):
            r = save_lesion_label(url, image_id, phantom_label_map(seed + ids.index(image_id), size))
            r.raise_for_status()
        for model in ("lesion_seg", "grading"):
            r = requests.post(f"{url}/train/{model}?run_sync=true", json={"max_epochs": 2}, timeout=900)
            r.raise_for_status()
        log(f"models trained ({time.time() - t_start:.1f} s)")

        # a training job in MONAI Label's background subprocess, running during the load
        r = requests.post(f"{url}/train/grading", json={"max_epochs": train_epochs, "name": "load_background"}, timeout=60)
        r.raise_for_status()
        t0 = time.time()
        while requests.get(f"{url}/train/", timeout=30).json().get("status") != "RUNNING" and time.time() - t0 < 120:
            time.sleep(0.5)
        result["training_status_at_load_start"] = requests.get(f"{url}/train/", timeout=30).json().get("status")
        log(f"background training: {result['training_status_at_load_start']}")

        expected: dict[str, dict] = {}
        jobs = []
        models = ["lesion_seg", "grading", "cam"]
        for i in range(n_infer):
            jobs.append(("infer", models[i % 3], rng.choice(ids)))
        for i, image_id in enumerate(label_ids):
            if i % 2 == 0:
                lab = phantom_label_map(seed + ids.index(image_id), size)
                expected[image_id] = {"kind": "lesion_map", "ext": ".nii.gz" if i % 4 == 0 else ".nrrd", "label": lab}
            else:
                expected[image_id] = {"kind": "grade", "grade": rng.randint(0, 4)}
            jobs.append(("label", expected[image_id]["kind"], image_id))
        rng.shuffle(jobs)
        barrier = threading.Barrier(len(jobs))

        def one(job):
            kind, what, image_id = job
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=60)
            t = time.perf_counter()
            status, err = None, None
            try:
                if kind == "infer":
                    resp = infer(url, what, image_id)
                elif what == "lesion_map":
                    e = expected[image_id]
                    resp = save_lesion_label(url, image_id, e["label"], e["ext"])
                else:
                    resp = save_grade_label(url, image_id, expected[image_id]["grade"])
                status = resp.status_code
                if status != 200:
                    err = resp.text[:300]
            except requests.RequestException as ex:
                err = f"{type(ex).__name__}: {ex}"
            return {"endpoint": "/infer" if kind == "infer" else "/datastore/label", "what": what, "image": image_id,
                    "status": status, "ok": status == 200, "latency_s": time.perf_counter() - t, "error": err}

        t_load = time.time()
        with ThreadPoolExecutor(max_workers=workers or len(jobs)) as ex:
            rows = list(ex.map(one, jobs))
        result["load_wall_s"] = round(time.time() - t_load, 2)
        result["training_status_at_load_end"] = requests.get(f"{url}/train/", timeout=60).json().get("status")
        log(f"load done in {result['load_wall_s']} s; training {result['training_status_at_load_end']}")

        def verify(listing_objects) -> list[str]:
            lost = []
            for image_id, e in expected.items():
                saved = any(r["ok"] for r in rows if r["image"] == image_id and r["endpoint"] == "/datastore/label")
                if not saved:
                    continue
                folder = store / "labels" / "final"
                try:
                    if e["kind"] == "grade":
                        ok = json.loads((folder / f"{image_id}.grade.json").read_text())["grade"] == e["grade"]
                    else:
                        ok = np.array_equal(fio.read_label(folder / f"{image_id}{e['ext']}"), e["label"])
                except (OSError, ValueError, KeyError, fio.FundusIOError):
                    ok = False
                obj = listing_objects.get(image_id) or {}
                if not ok or "final" not in (obj.get("labels") or {}):
                    lost.append(image_id)
            return lost

        listing = requests.get(f"{url}/datastore/?output=all", timeout=60).json()["objects"]
        lost_now = verify(listing)
        final_train = wait_training(url, timeout=900)
        result["training_final_status"] = final_train.get("status")
        on_disk = json.loads((store / "datastore_v2.json").read_text())["objects"]
        lost_after = verify(on_disk)
        info = requests.get(f"{url}/info/", timeout=60)
        result.update({
            "infer": _summary([r for r in rows if r["endpoint"] == "/infer"]),
            "label": _summary([r for r in rows if r["endpoint"] == "/datastore/label"]),
            "errors": sum(not r["ok"] for r in rows),
            "error_samples": [r for r in rows if not r["ok"]][:5],
            "labels_accepted": sum(r["ok"] for r in rows if r["endpoint"] == "/datastore/label"),
            "lost_labels": len(set(lost_now) | set(lost_after)),
            "lost_label_ids": sorted(set(lost_now) | set(lost_after)),
            "server_alive": info.status_code == 200,
            "trained_model_after": info.json().get("train_stats", {}).get("grading", {}).get("epoch")
            if info.status_code == 200 else None,
        })
    result["total_wall_s"] = round(time.time() - t_start, 1)
    if not keep and not workdir:
        shutil.rmtree(base, ignore_errors=True)
    else:
        result["workdir"] = str(base)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-infer", type=int, default=20, help="parallel /infer requests (lesion_seg, grading, cam in turn)")
    p.add_argument("--n-labels", type=int, default=20, help="parallel PUT /datastore/label saves (one image each)")
    p.add_argument("--workers", type=int, default=None, help="client threads (default: all requests at once)")
    p.add_argument("--train-epochs", type=int, default=40, help="epochs of the background grading job")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep the datastore and server log here")
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    res = run(a.n_infer, a.n_labels, a.workers, a.train_epochs, a.seed, a.workdir,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(res, indent=2, default=str)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    return 0 if res["errors"] == 0 and res["lost_labels"] == 0 and res["server_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
