"""bench/load_test.py at small N: parallel /infer and label saves while a training job runs on a
real server; no request fails, no accepted label is lost, the server still answers (no timing asserts)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "bench" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parallel_infer_and_label_saves_during_training(tmp_path):
    res = _load_bench().run(n_infer=6, n_labels=6, train_epochs=15, workdir=str(tmp_path / "load"))
    assert res["training_status_at_load_start"] == "RUNNING", res
    assert res["errors"] == 0, res["error_samples"]
    assert res["infer"]["ok"] == 6 and res["label"]["ok"] == 6
    assert res["labels_accepted"] == 6 and res["lost_labels"] == 0, res["lost_label_ids"]
    assert res["server_alive"] is True
    assert res["training_final_status"] == "DONE", res
    # the background job yields the CPU as --conf train_nice says (None: no /proc here)
    from monailabel_dr.config import CONF_OPTIONS

    default = CONF_OPTIONS["train_nice"][0]
    assert res["training_nice"] in ("idle" if default == "idle" else f"nice {default}", None), res
