"""bench/al_simulation.py: the simulated annotation loop at tiny scale, through the in-process server.

One run of ``--quick`` (tiny grader, 8 phantoms, k = 2, one round, random vs grade_uncertainty): labels
go through ``PUT /datastore/label``, the k-th save queues the retrain-on-correction fine-tune, which
resumes from the published model; the outputs (CSV, JSON, PNG) are written where asked.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("al_simulation", ROOT / "bench" / "al_simulation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sim():
    return _load_bench()


def test_learning_curve_summaries_by_hand(sim):
    # trapezoids over 2..6 labels: ((0.2 + 0.4) / 2 * 2 + (0.4 + 0.4) / 2 * 2) / 4 = 0.35
    assert sim.aulc([2, 4, 6], [0.2, 0.4, 0.4]) == pytest.approx(0.35)
    assert sim.aulc([6, 2, 4], [0.4, 0.2, 0.4]) == pytest.approx(0.35)          # order does not matter
    assert math.isnan(sim.aulc([2], [0.5])) and math.isnan(sim.aulc([2, 4], [0.1, float("nan")]))
    rows = []
    for rep, (a, b) in enumerate([((0.2, 0.4), (0.2, 0.6)), ((0.3, 0.5), (0.3, 0.5))]):
        for strategy, curve in (("random", a), ("grade_uncertainty", b)):
            rows += [{"experiment": "e", "metric_name": "kappa", "strategy": strategy, "repeat": rep,
                      "n_labels": n, "metric": m} for n, m in zip((2, 4), curve)]
    s = sim.summarise(rows)["e"]
    assert s["curve"]["random"][4] == {"mean": pytest.approx(0.45), "sd": pytest.approx(0.0707107, abs=1e-6), "n": 2}
    g = s["strategies"]["grade_uncertainty"]
    # paired differences per repeat: final +0.2 and 0.0; AULC +0.1 and 0.0
    assert g["final_minus_random_mean"] == pytest.approx(0.1) and g["final_minus_random_sd"] == pytest.approx(0.1414214)
    assert g["aulc_minus_random_mean"] == pytest.approx(0.05) and g["repeats_better_aulc"] == 1
    assert "AULC − random (paired)" in sim.markdown({"e": s})


def test_quick_loop_through_the_server(sim, tmp_path):
    out = tmp_path / "out"
    assert sim.main(["--quick", "--out", str(out), "--cache", str(tmp_path / "cache"),
                     "--workdir", str(tmp_path / "work"), "--keep"]) == 0
    with open(out / "al_simulation.csv") as f:
        rows = list(csv.DictReader(f))
    strategies = ("random", "grade_uncertainty")
    # one row per (strategy, round): the shared seed point (round 0) and one annotation round
    assert sorted((r["strategy"], r["round"]) for r in rows) == sorted((s, str(i)) for s in strategies for i in (0, 1))
    seed_rows = [r for r in rows if r["round"] == "0"]
    seed = set(seed_rows[0]["picked"].split(";"))
    assert len(seed) == 2 and all(set(r["picked"].split(";")) == seed for r in seed_rows)   # same seed for all
    work = tmp_path / "work" / "grading_phantoms" / "repeat0"
    for r in (r for r in rows if r["round"] == "1"):
        picked = r["picked"].split(";")
        assert len(picked) == 2 and len(set(picked)) == 2 and not set(picked) & seed   # never a labelled image
        assert r["n_labels"] == "4" and r["source"] == "retrain on correction"
        kappa = float(r["metric"])
        assert -1.0 <= kappa <= 1.0
        assert 0.0 <= json.loads(r["extra"])["accuracy"] <= 1.0
        # the fine-tune resumed from the model published in that strategy's model folder
        published = work / r["strategy"] / "model" / "grading.pt"
        assert Path(r["resumed_from"]).resolve() == published.resolve() and published.is_file()
        # the labels were saved through the REST API into the strategy's datastore, and nowhere else
        final = work / r["strategy"] / "store" / "labels" / "final"
        assert sorted(p.name for p in final.iterdir()) == sorted(f"{i}.grade.json" for i in seed | set(picked))
        stats = json.loads(next((work / r["strategy"] / "model" / "grading").rglob("train_stats.json")).read_text())
        assert Path(stats["resumed_from"]).resolve() == published.resolve()
        assert json.loads((work / r["strategy"] / "model" / "retrain_state.json").read_text())["grading"]["pending"] == []
    seed_labels = sorted(p.name for p in (work / "seed" / "store" / "labels" / "final").iterdir())
    assert seed_labels == sorted(f"{i}.grade.json" for i in seed)
    summary = json.loads((out / "al_simulation.json").read_text())
    assert set(summary["summary"]["grading_phantoms"]["curve"]) == set(strategies)
    assert summary["settings"]["experiments"]["grading_phantoms"]["conf"]["models"] == "grading"
    png = out / "al_simulation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "| labels | random | grade_uncertainty |" in (out / "al_simulation.md").read_text()


def test_a_strategy_that_repicks_a_labelled_image_stops_the_loop(sim, tmp_path, monkeypatch):
    """The loop's own check: a picked image that already has a final label is an error, not a silent point."""
    from monailabel.tasks.activelearning.random import Random

    def first_labelled(self, request, datastore):
        labelled = sorted(set(datastore.list_images()) - set(datastore.get_unlabeled_images()))
        return {"id": labelled[0]}

    monkeypatch.setattr(Random, "__call__", first_labelled)
    with pytest.raises(sim.SimulationError, match="already has a final label"):
        sim.main(["--quick", "--grading-strategies", "random", "--out", str(tmp_path / "out"),
                  "--cache", str(tmp_path / "cache")])
