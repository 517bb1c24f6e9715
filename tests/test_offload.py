"""Requests off the event loop (lib/offload.py): an inference in progress holds neither /info nor a label
save; concurrent first requests load a network once; concurrent saves leave the datastore consistent;
``--conf offload false`` is MONAI Label's stock path. No timing asserts: ordering is checked with events."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import serve_in_process, tiny_conf


def _app():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _train(client, model: str, epochs: int = 1):
    r = client.post(f"/train/{model}?run_sync=true", json={"max_epochs": epochs})
    assert r.status_code == 200, r.text


def _hold_inference(task, entered: threading.Event, release: threading.Event):
    """Make ``task``'s network pass wait for ``release`` (after setting ``entered``)."""
    original = task.run_inferer

    def held(data, *a, **k):
        entered.set()
        assert release.wait(60), "never released"
        return original(data, *a, **k)

    task.run_inferer = held
    return original


def _grade_file(tmp_path, grade: int):
    p = tmp_path / f"g{grade}.json"
    p.write_text(json.dumps({"grade": grade}))
    return p


def test_info_and_label_save_answer_while_an_inference_runs(phantom_store, tmp_path):
    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading")) as client:
        _train(client, "grading")
        task = _app()._infers["grading"]
        entered, release = threading.Event(), threading.Event()
        _hold_inference(task, entered, release)
        image = client.get("/datastore/?output=all").json()["objects"]
        unlabelled = sorted(k for k, v in image.items() if "final" not in v.get("labels", {}))[0]
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(client.post, "/infer/grading", params={"image": unlabelled})
            assert entered.wait(60), "the inference did not start"
            # the inference is now held inside the server: these answer only if it does not block them
            info = client.get("/info/")
            assert info.status_code == 200
            assert info.json()["inference_slots"]["busy"].get("cpu") == 1
            assert info.json()["inference_slots"]["order"] == "response_ratio"   # --conf infer_order's default
            with open(_grade_file(tmp_path, 3), "rb") as f:
                saved = client.put("/datastore/label", params={"image": unlabelled, "tag": "final"},
                                   files={"label": ("x.json", f)})
            assert saved.status_code == 200, saved.text
            assert not fut.done(), "the inference finished before it was released"
            release.set()
            r = fut.result(timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["grade"] in range(5)


def test_pool_threads_exist_before_the_first_request(phantom_store, tmp_path):
    """Both pools' threads are started with the server, so a first burst does not start them from the event loop."""
    from monailabel_dr.lib import offload

    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading")):
        names = [t.name for t in threading.enumerate()]
        assert sum(n.startswith("mldr-io_") for n in names) == offload.IO_THREADS
        assert sum(n.startswith("mldr-infer_") for n in names) == offload.INFER_THREADS


def test_stock_mode_answers_one_request_at_a_time(phantom_store, tmp_path):
    """--conf offload false: the handlers run on the event loop (what bench/load_test.py compares with)."""
    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading", offload="false")) as client:
        _train(client, "grading")
        seen = {}
        app = _app()
        original_info = app.info

        def info():
            seen["thread"] = threading.current_thread().name
            return original_info()

        app.info = info
        assert client.get("/info/").status_code == 200
        assert not seen["thread"].startswith("mldr-"), seen
    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model2", models="grading")) as client:
        app = _app()
        original_info = app.info
        app.info = lambda: (seen.__setitem__("thread", threading.current_thread().name), original_info())[1]
        assert client.get("/info/").status_code == 200
        assert seen["thread"].startswith("mldr-io"), seen


def test_concurrent_first_requests_load_the_network_once(phantom_store, tmp_path):
    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading", infer_concurrency=4)) as client:
        _train(client, "grading")
        task = _app()._infers["grading"]
        task._networks.clear()
        task.loads = 0
        original = task.load_network
        gate = threading.Barrier(4, timeout=60)

        def slow_load(path, device):   # widen the window in which the other first requests arrive
            import time

            time.sleep(0.5)
            return original(path, device)

        task.load_network = slow_load
        ids = sorted(client.get("/datastore/?output=all").json()["objects"])[:4]

        def one(i):
            gate.wait()
            return client.post("/infer/grading", params={"image": ids[i]})

        with ThreadPoolExecutor(4) as ex:
            answers = list(ex.map(one, range(4)))
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        assert task.loads == 1
        # a new checkpoint (a retrain published it) is loaded once more, then cached again
        import os

        path = task.model.serve_path
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        with ThreadPoolExecutor(4) as ex:
            answers = list(ex.map(lambda i: client.post("/infer/grading", params={"image": ids[i]}), range(4)))
        assert all(a.status_code == 200 for a in answers)
        assert task.loads == 2


def test_concurrent_saves_keep_the_datastore_consistent(phantom_store, tmp_path):
    from monailabel_dr.fundus import io as fio
    from monailabel_dr.fundus.lesions import label_map_from_masks
    from monailabel_dr.fundus.phantoms import make_phantom

    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading,lesion_seg")) as client:
        objects = client.get("/datastore/?output=all").json()["objects"]
        ids = sorted(objects)[:8]
        h, w = fio.read_image(phantom_store / f"{ids[0]}.jpg").shape[:2]
        maps = [label_map_from_masks(make_phantom(100 + i, size=(h, w)).masks) for i in range(6)]
        files = []
        for i, lab in enumerate(maps):
            ext = ".nrrd" if i % 2 else ".png"
            p = tmp_path / f"map{i}{ext}"
            fio.write_label(p, lab)
            files.append((p, ext))

        same = ids[0]
        jobs = [("same", same, i) for i in range(6)] + [("diff", ids[1 + i], i) for i in range(6)]

        def one(job):
            kind, image, i = job
            p, ext = files[i]
            with open(p, "rb") as f:
                r = client.put("/datastore/label", params={"image": image, "tag": "final"},
                               files={"label": (f"{image}{ext}", f.read())})
            return r

        with ThreadPoolExecutor(12) as ex:
            answers = list(ex.map(one, jobs))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
        index = json.loads((phantom_store / "datastore_v2.json").read_text())   # never half-written
        final = phantom_store / "labels" / "final"
        # different images: each holds exactly what was sent to it
        for i in range(6):
            image = ids[1 + i]
            assert "final" in index["objects"][image]["labels"]
            assert np.array_equal(fio.read_label(final / f"{image}{files[i][1]}"), maps[i])
        # the same image: one lesion map remains, from one of the writes, and the index names that file
        kept = [p for p in final.iterdir() if p.name.startswith(same + ".") and not p.name.endswith(".grade.json")]
        assert len(kept) == 1, kept
        name = index["objects"][same]["labels"]["final"]["info"]["name"]
        assert kept[0].name == name
        got = fio.read_label(kept[0])
        # whole, and one of the maps written in that format (never a mix of two writes)
        assert any(np.array_equal(got, maps[i]) for i in range(6) if kept[0].name.endswith(files[i][1]))
        # a later save wins over all of them, whatever its format
        with open(files[0][0], "rb") as f:
            assert client.put("/datastore/label", params={"image": same, "tag": "final"},
                              files={"label": (f"{same}.png", f.read())}).status_code == 200
        kept = [p for p in final.iterdir() if p.name.startswith(same + ".") and not p.name.endswith(".grade.json")]
        assert [p.name for p in kept] == [f"{same}.png"] and np.array_equal(fio.read_label(kept[0]), maps[0])
        assert not [p for p in final.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("size,handoff", [(1, 0), (1, 1), (2, 1)])
def test_infer_slots_admit_size_times_one_plus_handoff(size, handoff):
    """``size`` computing per device, plus ``handoff`` waiting at each worker: the next request is admitted
    exactly when one leaves, never before."""
    from monailabel_dr.lib.offload import InferSlots

    slots = InferSlots(size, "cpu", handoff=handoff)
    capacity = size * (1 + handoff)
    inside, admitted, release = threading.Semaphore(0), [], threading.Event()

    def one(i):
        with slots.slot("cpu"):
            admitted.append(i)
            inside.release()
            release.wait(30)

    with ThreadPoolExecutor(capacity + 1) as ex:
        futures = [ex.submit(one, i) for i in range(capacity + 1)]
        for _ in range(capacity):
            assert inside.acquire(timeout=30)
        assert not inside.acquire(timeout=0.3), "admitted more than size x (1 + handoff)"
        assert slots.info()["busy"] == {"cpu": capacity} and slots.info()["pending"] == capacity + 1
        assert not slots.idle()
        release.set()
        assert inside.acquire(timeout=30)   # the last one, once a place was free
        for f in futures:
            f.result(timeout=30)
    assert len(admitted) == capacity + 1 and slots.idle() and slots.info()["busy"] == {"cpu": 0}


def _admission_order(slots, jobs, clock=None):
    """Hold the one slot, queue ``jobs`` (in this order, each (name, arrival time)), free the slot: the order
    in which the waiting ones are admitted."""
    holder_in, release, order = threading.Event(), threading.Event(), []

    def hold():
        with slots.slot("cpu", job="holder"):
            holder_in.set()
            release.wait(30)

    def one(job):
        with slots.slot("cpu", job=job):
            order.append(job)

    with ThreadPoolExecutor(len(jobs) + 1) as ex:
        futures = [ex.submit(hold)]
        assert holder_in.wait(30)
        for job, t in jobs:
            if clock is not None:
                clock[0] = t
            futures.append(ex.submit(one, job))
            deadline = time.time() + 30
            while slots.info()["waiting"].get("cpu", 0) < len(futures) - 1 and time.time() < deadline:
                time.sleep(0.005)
        if clock is not None:
            clock[0] = max(t for _, t in jobs) + 0.001
        release.set()
        for f in futures:
            f.result(timeout=30)
    return order


@pytest.mark.parametrize("order", ["response_ratio", "arrival"])
def test_infer_slots_order_quick_jobs_first_without_starving_long_ones(order, monkeypatch):
    """response_ratio: a freed slot admits the waiting request with the highest (waited + expected) / expected,
    so a quick grade queued behind segmentations goes first, but a segmentation that has waited long enough goes
    before a quick job that has only just arrived; arrival: first come, first served. A fake clock fixes the waits."""
    from monailabel_dr.lib import offload

    clock = [1000.0]
    monkeypatch.setattr(offload.time, "monotonic", lambda: clock[0])
    slots = offload.InferSlots(1, "cpu", order=order)
    slots.observe("cpu", "seg", 0.5)
    slots.observe("cpu", "grade", 0.01)
    got = _admission_order(slots, [("seg", 1000.0), ("grade", 1000.0), ("seg", 1000.0), ("grade", 1000.0)], clock)
    assert got == (["grade", "grade", "seg", "seg"] if order == "response_ratio" else ["seg", "grade", "seg", "grade"])
    # a segmentation that has waited ~2 s (ratio (1.971 + 0.5) / 0.5 = 4.9) goes before a grade that has waited 0.03 s (ratio 4)
    slots = offload.InferSlots(1, "cpu", order=order)
    slots.observe("cpu", "seg", 0.5)
    slots.observe("cpu", "grade", 0.01)
    assert _admission_order(slots, [("seg", 1000.0), ("grade", 1001.941)], clock) == ["seg", "grade"]


def test_infer_slots_report_the_estimates():
    from monailabel_dr.lib.offload import InferSlots

    slots = InferSlots(1, "cpu")
    for t in (0.2, 9.0, 0.3):   # a first request that loaded the network does not set the estimate
        slots.observe("cpu", "lesion_seg", t)
    with slots.slot("cpu", job="grading"):
        pass
    info = slots.info()
    assert info["order"] == "response_ratio" and info["expected_s"]["cpu"]["lesion_seg"] == 0.3
    assert "grading" in info["expected_s"]["cpu"] and info["waiting"] == {"cpu": 0}


@pytest.mark.parametrize("value,ok", [("response_ratio", True), ("arrival", True), ("ARRIVAL", True), ("sjf", False)])
def test_infer_order_conf(tmp_path, value, ok):
    from monailabel_dr.config import ConfError, parse_conf

    if ok:
        assert parse_conf({"infer_order": value, "models": "grading"}, str(tmp_path)).infer_order == value.lower()
    else:
        with pytest.raises(ConfError, match="infer_order"):
            parse_conf({"infer_order": value, "models": "grading"}, str(tmp_path))


@pytest.mark.parametrize("value,ok", [("auto", True), ("2", True), ("0", False), ("x", False)])
def test_infer_concurrency_conf(tmp_path, value, ok):
    from monailabel_dr.config import ConfError, parse_conf

    if ok:
        s = parse_conf({"infer_concurrency": value, "models": "grading"}, str(tmp_path))
        assert s.infer_concurrency == (None if value == "auto" else int(value))
    else:
        with pytest.raises(ConfError, match="infer_concurrency"):
            parse_conf({"infer_concurrency": value, "models": "grading"}, str(tmp_path))


def test_scoring_shares_the_served_network(phantom_store, tmp_path):
    """One network copy per model and device: the scoring methods' tasks use the serving task's cache."""
    from monailabel_dr.lib.activelearning.common import shared_infer_task

    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading")) as client:
        _train(client, "grading")
        app = _app()
        image = sorted(client.get("/datastore/?output=all").json()["objects"])[0]
        assert client.post("/infer/grading", params={"image": image}).status_code == 200
        assert client.post("/scoring/grade_uncertainty?run_sync=true", json={"max_images": 2}).status_code == 200
        serving = app._infers["grading"]
        scoring = shared_infer_task(app.app_settings, "grading", "grading")
        assert scoring is not serving and scoring._networks is serving._networks
        assert len(serving._networks) == 1 and serving.loads + scoring.loads == 1


def test_inference_in_a_worker_process_over_http(phantom_store, tmp_path):
    """The default real server (--conf infer_workers 1): answers, client errors and a reload after training
    come from the worker process as they would from the server's own tasks."""
    import requests

    from monailabel_dr.serving import running_server

    with running_server(phantom_store, tmp_path / "model", conf={"models": "grading", "rescore_interval": "0"},
                        log_path=tmp_path / "server.log") as url:
        info = requests.get(f"{url}/info/", timeout=60).json()
        assert info["inference_slots"]["worker_processes"] == 1
        # one computing, one handed to the worker beside it (InferSlots.handoff)
        assert info["inference_slots"]["per_device"] == {"cpu": 1} and info["inference_slots"]["handoff_per_slot"] == 1
        image = sorted(requests.get(f"{url}/datastore/?output=all", timeout=60).json()["objects"])[0]
        r = requests.post(f"{url}/infer/grading", params={"image": image}, timeout=300)
        assert r.status_code == 409 and "no trained weights" in r.json()["detail"]          # raised in the worker
        r = requests.post(f"{url}/infer/grading", params={"image": image}, data={"params": '{"rationale": "x"}'}, timeout=60)
        assert r.status_code == 422 and "rationale" in r.json()["detail"]
        assert requests.post(f"{url}/train/grading?run_sync=true", json={"max_epochs": 1}, timeout=600).status_code == 200
        r = requests.post(f"{url}/infer/grading", params={"image": image}, timeout=300)
        assert r.status_code == 200 and r.json()["model"]["validation"]["complete"] is True   # the new checkpoint
