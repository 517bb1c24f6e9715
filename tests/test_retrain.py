"""Retrain on correction (lib/retrain.py): the bookkeeping alone, then through the real server."""

from __future__ import annotations

import json
import time

import pytest

from monailabel_dr.config import load_model_table, parse_conf
from monailabel_dr.lib.retrain import RetrainOnCorrection


class FakeQueue:
    """MONAI Label's train queue as the scheduler sees it: task dicts whose status the worker updates."""

    def __init__(self):
        self.tasks = []

    def __call__(self, model, request):
        task = {"id": f"t{len(self.tasks)}", "status": "SUBMITTED", "model": model, "request": request}
        self.tasks.append(task)
        return task


def _scheduler(tmp_path, after=2, models="grading,lesion_seg", queue=None):
    settings = parse_conf({"models": models, "retrain_after": str(after), "retrain_epochs": "3",
                           "model_dir": str(tmp_path)}, str(tmp_path), load_model_table())
    queue = queue or FakeQueue()
    return RetrainOnCorrection(settings, set(settings.models), queue, state_path=str(tmp_path / "state.json")), queue


def test_labels_count_for_the_models_that_learn_from_their_kind(tmp_path):
    r, q = _scheduler(tmp_path)
    assert r.on_saved("a", "final", "grade") == {"grading": {"counted": "pending", "labels_pending": 1}}
    assert r.on_saved("a", "original", "lesion_map") == {}          # only final labels count
    out = r.on_saved("b", "final", "lesion_map")                     # grading reads lesion presence too
    assert out["grading"]["counted"] == "queued_job" and out["lesion_seg"]["labels_pending"] == 1
    assert [t["model"] for t in q.tasks] == ["grading"]
    assert q.tasks[0]["request"]["max_epochs"] == 3 and q.tasks[0]["request"]["pretrained"] is True
    info = r.info()["models"]
    assert info["grading"]["job"]["status"] == "SUBMITTED" and info["grading"]["labels_pending"] == 0
    assert info["grading"]["labels_since_last_model"] == 2 and info["lesion_seg"]["labels_since_last_model"] == 1


def test_no_label_is_lost_while_a_job_waits_runs_or_fails(tmp_path):
    r, q = _scheduler(tmp_path, models="grading")
    r.on_saved("a", "final", "grade")
    r.on_saved("b", "final", "grade")
    job = q.tasks[0]
    # queued, not started: the job will read this label when it starts
    assert r.on_saved("c", "final", "grade")["grading"]["counted"] == "in_queued_job"
    assert r.info()["models"]["grading"]["job"]["labels"] == 3 and len(q.tasks) == 1
    job["status"] = "RUNNING"
    assert r.on_saved("d", "final", "grade")["grading"] == {"counted": "pending", "labels_pending": 1}
    assert r.info()["models"]["grading"]["labels_since_last_model"] == 4   # 3 being trained on + 1 waiting
    assert r.on_saved("e", "final", "grade")["grading"]["counted"] == "queued_job"   # queued behind the running one
    assert len(q.tasks) == 2 and q.tasks[1]["status"] == "SUBMITTED"
    q.tasks[1]["status"] = "RUNNING"
    q.tasks[1]["status"] = "ERROR"                                       # its labels count again
    info = r.info()["models"]["grading"]
    assert info["labels_pending"] == 2 and info["jobs_failed"] == 1
    assert r.on_saved("f", "final", "grade")["grading"]["counted"] == "queued_job"   # d, e, f
    assert q.tasks[2]["status"] == "SUBMITTED" and r.info()["models"]["grading"]["job"]["labels"] == 3


def test_the_count_survives_a_restart_and_zero_turns_it_off(tmp_path):
    r, q = _scheduler(tmp_path, after=3, models="grading")
    r.on_saved("a", "final", "grade")
    r.on_saved("b", "final", "grade")
    r2, q2 = _scheduler(tmp_path, after=3, models="grading")
    assert r2.info()["models"]["grading"]["labels_pending"] == 2
    assert r2.on_saved("c", "final", "grade")["grading"]["counted"] == "queued_job" and len(q2.tasks) == 1
    off, q3 = _scheduler(tmp_path / "off", after=0, models="grading")
    assert off.on_saved("a", "final", "grade") == {} and not q3.tasks
    with pytest.raises(ValueError, match="retrain_after"):
        parse_conf({"models": "grading", "retrain_after": "-1"}, str(tmp_path), load_model_table())


# ----------------------------------------------------------------------------- through the server
def _grade_label(client, image, grade):
    files = {"label": (f"{image}.grade.json", json.dumps({"grade": grade}).encode(), "application/json")}
    r = client.put(f"/datastore/label?image={image}&tag=final", files=files)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_job(client, model, status=("DONE", "ERROR", "STOPPED"), timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        job = client.get("/info/").json()["retrain"]["models"][model]["job"]
        if job and job["status"] in status:
            return job
        time.sleep(0.5)
    raise AssertionError(f"no {model} job reached {status} in {timeout} s")


def test_saved_corrections_fine_tune_the_served_model_and_labels_saved_meanwhile_are_kept(tmp_path):
    from conftest import serve_in_process, tiny_conf, write_phantom_store

    store = write_phantom_store(tmp_path / "store", n=16, labelled=8, seed=21)
    conf = tiny_conf(tmp_path / "model", models="grading", retrain_after=2, retrain_epochs=1)
    with serve_in_process(store, conf) as c:
        r = c.post("/train/grading?run_sync=true", json={"max_epochs": 1})
        assert r.status_code == 200, r.text
        published = tmp_path / "model" / "grading.pt"
        first_mtime = published.stat().st_mtime_ns
        before = c.post("/infer/grading?image=fundus_0015").json()

        info = c.get("/info/").json()["retrain"]
        assert info["retrain_after"] == 2 and info["models"]["grading"]["labels_pending"] == 0
        objs = c.get("/datastore/?output=all").json()["objects"]
        unlabelled = sorted(i for i, o in objs.items() if not o.get("labels"))
        assert len(unlabelled) >= 4
        assert _grade_label(c, unlabelled[0], 1)["retrain"]["grading"]["counted"] == "pending"
        res = _grade_label(c, unlabelled[1], 3)
        assert res["retrain"]["grading"]["counted"] == "queued_job"
        # saved while the job waits or runs: either read by it or counted toward the next one
        _wait_job(c, "grading", status=("RUNNING", "DONE", "ERROR"))
        during = _grade_label(c, unlabelled[2], 2)["retrain"]["grading"]
        job = _wait_job(c, "grading")
        assert job["status"] == "DONE", job

        info = c.get("/info/").json()
        stats = info["train_stats"]["grading"]
        assert stats["resumed_from"] == str(published)             # fine-tuned from the served model
        assert published.stat().st_mtime_ns != first_mtime          # and a new model was published
        after = c.post("/infer/grading?image=fundus_0015").json()
        assert after != before                                      # /infer serves the new weights
        # the label saved during training is in the datastore, and counted unless the job read it
        objs = c.get("/datastore/?output=all").json()["objects"]
        assert objs[unlabelled[2]]["labels"].get("final")
        g = info["retrain"]["models"]["grading"]
        if during["counted"] == "pending":
            assert g["labels_pending"] == 1 and g["labels_since_last_model"] == 1
        else:
            assert during["counted"] == "in_queued_job" and g["last_done"]["labels"] == 3


def test_info_writes_the_state_file_only_when_it_changes(tmp_path):
    """/info reads the bookkeeping on every poll: the state file is rewritten when its content changes, not per call."""
    r, _ = _scheduler(tmp_path, after=5)
    state = tmp_path / "state.json"
    r.on_saved("a", "final", "grade")
    assert json.loads(state.read_text())["grading"]["pending"] == ["a"]
    state.write_text("sentinel")          # any rewrite would replace it
    for _ in range(3):
        r.info()
    assert state.read_text() == "sentinel"
    r.on_saved("b", "final", "grade")     # a change is written
    assert json.loads(state.read_text())["grading"]["pending"] == ["a", "b"]
