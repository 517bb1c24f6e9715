"""Scale-out: the app's trainers under MONAI Label's multi-GPU (DDP) path, run here as 2 CPU processes over gloo.

``BasicTrainTask.__call__`` spawns ``main_worker`` once per GPU with ``torch.multiprocessing.spawn`` when it
sees 2+ GPUs; this test does that spawn itself (the CPU has no GPUs to count) with the same worker, request
and datalist, so every step after it (process group, DDP wrapping, partitioned data, rank-0 publishing) is
MONAI Label's own code path. Marked ``ddp``: it starts two extra Python processes (about a minute on 2 cores).
"""

from __future__ import annotations

import socket

import pytest
import torch

from conftest import write_phantom_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_grading_trainer_runs_under_two_process_gloo_ddp(tmp_path, monkeypatch):
    from monailabel.tasks.train.basic_train import main_worker

    from monailabel_dr.config import load_model_table, parse_conf
    from monailabel_dr.lib.datastore import FundusDatastore
    from monailabel_dr.lib.infers.base import load_weights
    from monailabel_dr.lib.trainers.grading import GradingTrainer
    from monailabel_dr.networks.attention_grader import build_grader

    store = write_phantom_store(tmp_path / "store", n=12, labelled=12, seed=4)
    settings = parse_conf({"models": "grading", "profile": "tiny", "model_dir": str(tmp_path / "model"),
                           "device": "cpu"}, str(tmp_path), load_model_table())
    model = settings.models["grading"]
    task = GradingTrainer(model, settings)
    request = {**task._config, "model": "grading", "max_epochs": 2, "multi_gpu": True, "distributed_backend": "gloo",
               "distributed_url": f"tcp://127.0.0.1:{_free_port()}", "run_id": "ddp", "device": "cpu", "name": "ddp"}
    datalist = task.pre_process(request, FundusDatastore(str(store)))
    torch.multiprocessing.spawn(main_worker, nprocs=2, args=(2, request, datalist, task), join=True)

    published = tmp_path / "model" / "grading.pt"
    assert published.is_file()
    state = torch.load(published, map_location="cpu", weights_only=True)
    assert set(state) == {"model"} and not any(k.startswith("module.") for k in state["model"])   # not DDP-wrapped
    load_weights(build_grader(model.network), str(published), "cpu")    # loads strictly into the served network
    stats = (tmp_path / "model" / "grading" / "train_stats.json")
    assert stats.is_file() and '"epoch": 2' in stats.read_text()
