""""Next sample" never dead-ends (issue 17): right after a publish an uncertainty strategy answers by a
documented fallback rule and says which; the stale scores are recomputed in the background, yielding to
inference; only a model that was never trained answers 409."""

from __future__ import annotations

import threading
import time

from conftest import serve_in_process, tiny_conf


def _wait_rescored(client, after_passes: int, timeout: float = 180.0) -> dict:
    """Until a background pass that started after ``after_passes`` finished passes has finished."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.get("/info/").json()["rescoring"]
        if r["passes"] > after_passes and not r["running"] and r["remaining"] == 0:
            return r
        time.sleep(0.5)
    raise AssertionError(f"background rescoring did not finish: {r}")


def _next(client, strategy: str):
    r = client.post(f"/activelearning/{strategy}", json={"max_inline_scoring": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_strategy_answers_right_after_a_publish(phantom_store, tmp_path):
    conf = tiny_conf(tmp_path / "model", models="grading,lesion_seg", rescore_interval=3600)   # woken, not timed
    with serve_in_process(phantom_store, conf) as client:
        # never trained: the only 409
        r = client.post("/activelearning/lesion_uncertainty", json={})
        assert r.status_code == 409 and "trained" in r.json()["detail"]
        assert client.post("/train/grading?run_sync=true", json={"max_epochs": 1}).status_code == 200
        listing = client.get("/datastore/?output=all").json()["objects"]
        unlabelled = {k for k, v in listing.items() if "final" not in v.get("labels", {})}
        assert len(unlabelled) == 8

        passes = client.get("/info/").json()["rescoring"]["passes"]
        first = _next(client, "grade_uncertainty")            # no score at all yet
        assert first["rule"] == "random_unlabelled" and first["id"] in unlabelled and first["rule_description"]
        passes = _wait_rescored(client, passes)["passes"]     # the strategy woke the background rescoring
        scored = _next(client, "grade_uncertainty")
        assert scored["rule"] == "score" and scored["id"] in unlabelled and scored["score"] is not None

        # a retrain publishes a new model: every score is stale, the answer comes at once from the old scores
        assert client.post("/train/grading?run_sync=true", json={"max_epochs": 1}).status_code == 200
        after = _next(client, "grade_uncertainty")
        assert after["rule"] == "best_previous_model_score" and after["id"] in unlabelled
        assert "background" in after["rule_description"]
        diverse = _next(client, "diverse_uncertainty")
        assert diverse["rule"] in ("best_previous_model_score", "best_current_score") and diverse["id"] in unlabelled
        _wait_rescored(client, passes)
        again = _next(client, "grade_uncertainty")
        assert again["rule"] == "score"
        info = client.get("/info/").json()["rescoring"]
        assert info["enabled"] is True and info["done"] >= 16 and info["last_error"] is None


def test_background_rescoring_waits_for_inference(phantom_store, tmp_path):
    from monailabel.interfaces.utils.app import app_instance

    from monailabel_dr.lib.activelearning.common import BackgroundRescorer

    with serve_in_process(phantom_store, tiny_conf(tmp_path / "model", models="grading")) as client:
        assert client.post("/train/grading?run_sync=true", json={"max_epochs": 1}).status_code == 200
        app = app_instance()
        busy = threading.Event()
        busy.set()
        r = BackgroundRescorer(app._scoring_methods, app.datastore(), is_idle=lambda: not busy.is_set(), interval=3600)
        method = r.methods["grade_uncertainty"]
        # a periodic pass leaves a just-published model alone until it has settled (a training run goes on)
        assert r.run_once(urgent=False) == 0 and not any(method.stored(app.datastore(), i) for i in
                                                        app.datastore().list_images())
        done = []
        t = threading.Thread(target=lambda: done.append(r.run_once()), daemon=True)
        t.start()
        t.join(timeout=3)
        assert t.is_alive(), "scored while an inference was running"
        unlabelled = app.datastore().get_unlabeled_images()
        assert not any(method.stored(app.datastore(), i) for i in unlabelled)
        busy.clear()                                          # the inference ended
        t.join(timeout=120)
        expected = len(app.datastore().list_images()) if method.default_images == "all" else len(unlabelled)
        assert done == [expected]
        identity = method.identity()
        assert all(method.is_current(method.stored(app.datastore(), i), identity) for i in unlabelled)
        r.stop()
