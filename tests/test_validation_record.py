"""The served checkpoint says how good it is (issue 17): trainers store a validation record in the file
they publish; /info and every answer carry it; a checkpoint written mid-run is an early checkpoint."""

from __future__ import annotations

import torch

from conftest import serve_in_process, tiny_conf


def test_record_published_and_served(phantom_store, tmp_path, monkeypatch):
    from monailabel_dr.lib.checkpoints import read_record
    from monailabel_dr.lib.trainers import common

    seen = []
    original = common.AtomicPublish.iteration_completed

    def spy(self):
        out = original(self)
        if self._publish_path:
            seen.append(read_record(self._publish_path))
        return out

    monkeypatch.setattr(common.AtomicPublish, "iteration_completed", spy)
    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading")) as client:
        info = client.get("/info/").json()
        assert info["model_state"]["grading"]["trained"] is False and "validation" not in info["model_state"]["grading"]
        r = client.post("/train/grading?run_sync=true", json={"max_epochs": 3})
        assert r.status_code == 200, r.text
        # while the run went on, the published file said it was an early checkpoint
        assert seen and all(rec is not None and rec["complete"] is False for rec in seen), seen
        # rewritten when a new best is published: the epoch it was written at, never later than the run
        assert len(seen) == 3 and all(rec["epochs_run"] <= i + 1 for i, rec in enumerate(seen))
        state = client.get("/info/").json()["model_state"]["grading"]
        rec = state["validation"]
        assert rec["complete"] is True and rec["max_epochs"] == 3 and rec["epochs_run"] == 3
        assert rec["metric"] and isinstance(rec["value"], float) and 1 <= rec["epoch"] <= 3
        assert rec["n_train"] > 0 and rec["n_val"] > 0 and rec["trained_at"]
        assert state["early_checkpoint"] is False and "validation" in state["quality"]
        image = sorted(client.get("/datastore/?output=all").json()["objects"])[0]
        for model in ("grading", "cam"):
            answer = client.post(f"/infer/{model}", params={"image": image, "output": "json"}).json()
            assert answer["model"]["validation"] == rec, model
            assert answer["model"]["early_checkpoint"] is False


def test_early_and_foreign_checkpoints_say_so(phantom_store, tmp_path):
    from monailabel.interfaces.utils.app import app_instance

    from monailabel_dr.lib.checkpoints import RECORD_KEY

    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading")) as client:
        task = app_instance()._infers["grading"]
        path = task.model.published_path
        weights = task.network.state_dict()
        torch.save({"model": weights, RECORD_KEY: {"metric": "val_kappa", "value": 0.1, "metrics": {}, "epoch": 1,
                                                   "epochs_run": 1, "max_epochs": 40, "complete": False,
                                                   "n_train": 30, "n_val": 8, "trained_at": "2026-12-03T10:00:00"}},
                   path)
        image = sorted(client.get("/datastore/?output=all").json()["objects"])[0]
        answer = client.post("/infer/grading", params={"image": image}).json()
        assert answer["model"]["early_checkpoint"] is True
        assert answer["model"]["quality"].startswith("EARLY CHECKPOINT") and "epoch 1 of 40" in answer["model"]["quality"]
        torch.save({"model": weights}, path)   # a checkpoint from elsewhere, without a record
        answer = client.post("/infer/grading", params={"image": image}).json()
        assert answer["model"]["validation"] is None and "no validation record" in answer["model"]["quality"]


def test_train_stats_are_never_written_in_place(phantom_store, tmp_path, monkeypatch):
    """The train stats that /info and every /infer read while a run goes on are replaced atomically: MONAI
    Label's publisher copies them over the served file in place, and a reader arriving mid-copy got an
    empty or half file and answered HTTP 500 (seen under load, 2026-12-07)."""
    import shutil

    from monailabel.tasks.train import handler

    stats_writes, real_copy = [], shutil.copy

    def copy_spy(src, dst, *args, **kwargs):
        if str(dst).endswith("train_stats.json"):
            stats_writes.append(dst)
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(handler.shutil, "copy", copy_spy)
    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading")) as client:
        r = client.post("/train/grading?run_sync=true", json={"max_epochs": 2})
        assert r.status_code == 200, r.text
        stats = client.get("/info/").json()["train_stats"]["grading"]
        assert stats["epoch"] == 2 and "resumed_from" in stats, stats   # written, by the atomic path
    assert stats_writes == [], f"train stats copied in place: {stats_writes}"
