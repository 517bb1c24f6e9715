"""Simulated annotation loop (issue 6): does uncertainty sampling beat random selection?

    nice -n 19 .venv/bin/python bench/al_simulation.py                   # the default run (docs/results.md)
    nice -n 19 .venv/bin/python bench/al_simulation.py --quick --out /tmp/al   # smoke run, about a minute

A pool of images is put in a datastore **without labels**; their true labels are kept aside in
another folder. The real app is served in-process (MONAI Label's FastAPI app through a
``TestClient``), and an "annotator" is simulated:

1. *Seed* (per repeat, shared by every strategy of that repeat): k pool images (``--grading-k`` /
   ``--lesion-k``) drawn at random (``numpy`` seed = the repeat) get their true labels through
   ``PUT /datastore/label``; the first model is trained with ``POST /train/<model>?run_sync=true``
   (``--grading-seed-epochs`` / ``--lesion-seed-epochs``;
   retrain-on-correction is off on this server). The datastore and model folder are then copied
   once per strategy, so every strategy of a repeat starts from the same labels and weights.
2. *Rounds*: on a server with ``--conf retrain_after K --conf retrain_epochs E``, ``K`` times:
   ``POST /activelearning/<strategy>`` (with a ``client_id``) -> the picked image must be
   unlabelled (no ``final`` label) and never picked before -> its true label is saved with
   ``PUT /datastore/label``. The K-th save must queue the retrain-on-correction fine-tune (the
   app's background train queue: a subprocess, resuming from the published model); the loop waits
   for it, checks ``train_stats.<model>.resumed_from`` is the published checkpoint, and evaluates
   the newly published model on the held-out images.
3. *Evaluation* (direct route, no HTTP): the served infer task of the app
   (``app._infers[<model>]``, the object ``POST /infer`` calls, which reloads a newly published
   checkpoint) on held-out images that are not in the datastore. Grading: quadratic weighted kappa
   (``monailabel_dr.metrics.grading.grading_report``); lesion_seg: mean pooled Dice over the lesions
   present (``monailabel_dr.lib.evaluation.evaluate_lesions``, exactly what ``monailabel-dr evaluate
   lesion_seg`` reports as "mean dice_pooled", without bootstrap CIs).

Experiments (``--experiments``):

- ``grading_phantoms``: CAM grader on synthetic phantoms; ``random`` vs ``grade_uncertainty`` vs
  ``diverse_uncertainty``; held-out phantoms (seeds from 1 000 000, which no pool uses).
- ``lesion_phantoms``: Lesion-Net on phantoms; ``random`` vs ``lesion_uncertainty``; held-out
  phantoms in an IDRiD-layout folder.
- ``lesion_idrid``: Lesion-Net on the IDRiD training folder: pool = the 44 ``idrid_split`` training
  ids, held-out = the 10 validation ids (ending in 0 or 5); images and masks are downscaled once
  (``--idrid-scale``, area interpolation; a mask pixel is lesion where >= half of it was) into a
  cache folder outside the repository.

``disagreement`` (lesion_seg row) needs a second trained localiser (the grader's CAM and/or
lesion_sam) retrained every round as well; add it with ``--lesion-strategies
random,lesion_uncertainty,disagreement`` (the grading model is then served too and retrained on
the same label maps).

Outputs in ``--out`` (default ``docs/``): ``al_simulation.csv`` (one row per experiment, strategy,
repeat and round), ``al_simulation.json`` (settings, per-point mean / sd, area under the learning
curve and the paired differences to ``random``), ``al_simulation.png`` (one panel per experiment,
mean +- sd band per strategy) and ``al_simulation.md`` (the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "monailabel_dr"
IDRID_DEFAULT = ROOT.parent / "shared" / "data" / "idrid_train"
HELDOUT_SEED = 1_000_000          # phantom seeds no pool uses (the `evaluate --phantoms` convention)

# MONAI Label reads these at import time: no file watcher, no background scoring, no sessions.
for _k in ("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "MONAI_LABEL_AUTO_UPDATE_SCORING",
           "MONAI_LABEL_TRACKING_ENABLED", "MONAI_LABEL_SESSIONS"):
    os.environ.setdefault(_k, "false")

log = logging.getLogger("al_simulation")


class SimulationError(RuntimeError):
    """The loop did not behave as the app promises (a strategy re-picked an image, no fine-tune was queued, ...)."""


# ----------------------------------------------------------------------------- the server
@contextlib.contextmanager
def serve_in_process(studies: Path, conf: dict, verbose: bool = False):
    """The real MONAI Label FastAPI app with this app loaded, in-process (monailabel_dr/serving.py), with
    MONAI Label's own logging quietened unless ``verbose``."""
    from monailabel_dr.serving import serve_in_process as serve

    with serve(studies, conf) as client:
        quiet(verbose)
        yield client


def quiet(verbose: bool) -> None:
    """Only this script's progress lines (MONAI Label logs every request, transform and training line)."""
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger().setLevel(level)
    for name in list(logging.root.manager.loggerDict):
        if name != log.name and isinstance(logging.root.manager.loggerDict[name], logging.Logger):
            logging.getLogger(name).setLevel(level)


def app_instance():
    from monailabel.interfaces.utils.app import app_instance as _instance

    return _instance()


def put_label(client, image_id: str, path: Path) -> dict:
    """Save ``path`` as the ``final`` label of ``image_id`` through the REST API."""
    mime = "application/json" if path.name.endswith(".json") else "application/octet-stream"
    r = client.put(f"/datastore/label?image={image_id}&tag=final",
                   files={"label": (path.name, path.read_bytes(), mime)})
    if r.status_code != 200:
        raise SimulationError(f"PUT /datastore/label {image_id}: HTTP {r.status_code} {r.text[:300]}")
    return r.json()


def labelled_in_datastore(client) -> set[str]:
    objs = client.get("/datastore/?output=all").json()["objects"]
    return {i for i, o in objs.items() if (o.get("labels") or {}).get("final")}


def wait_jobs(client, jobs: dict[str, str], timeout: float, poll: float = 1.0) -> dict[str, dict]:
    """Wait until the retrain-on-correction jobs ({model: task id}, from the label-save answers) have finished,
    polling MONAI Label's train queue (``GET /train/?all=true``); raise unless all are DONE."""
    end = time.time() + timeout
    while time.time() < end:
        tasks = {t.get("id"): t for t in client.get("/train/?all=true").json() or []}
        missing = [j for j in jobs.values() if j not in tasks]
        if missing:
            raise SimulationError(f"retrain jobs {missing} are not in MONAI Label's train queue")
        done = {m: tasks[j] for m, j in jobs.items() if tasks[j].get("status") in ("DONE", "ERROR", "STOPPED")}
        if len(done) == len(jobs):
            bad = {m: {"status": t["status"], "last_lines": list(t.get("details") or [])[-8:]}
                   for m, t in done.items() if t["status"] != "DONE"}
            if bad:
                raise SimulationError(f"retrain job failed: {bad}")
            return done
        time.sleep(poll)
    raise SimulationError(f"retrain jobs {jobs} not finished after {timeout:.0f} s")


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    """A pool (images in ``images``: id -> path; true labels in ``truth``: id -> label file) and a held-out set."""

    images: dict[str, Path]
    truth: dict[str, Path]
    heldout: Any
    describe: dict = field(default_factory=dict)


def _write_phantom(seed: int, size: tuple[int, int], image_path: Path, kind: str, truth_dir: Path) -> Path:
    from monailabel_dr.fundus import io
    from monailabel_dr.fundus.labels import GradeLabel, write_grade_label
    from monailabel_dr.fundus.phantoms import make_phantom
    from monailabel_dr.fundus.lesions import label_map_from_masks

    ph = make_phantom(seed, size=size)
    io.write_image(image_path, ph.image)
    image_id = image_path.stem
    if kind == "grade":   # what `monailabel-dr demo` writes for a labelled phantom
        return Path(write_grade_label(str(truth_dir / f"{image_id}.grade.json"),
                                      GradeLabel(grade=int(ph.grade), lesions=ph.lesion_presence(),
                                                 extra={"source": "al_simulation phantom"})))
    # the label map `monailabel-dr import --idrid` writes (MA=1 HE=2 EX=3 SE=4, paint order EX SE HE MA)
    return Path(io.write_label(str(truth_dir / f"{image_id}.png"), label_map_from_masks(ph.masks)))


def phantom_pool(cache: Path, n: int, size: tuple[int, int], kind: str, first_seed: int = 0) -> tuple[dict, dict]:
    folder = cache / f"phantoms_{kind}_{size[0]}x{size[1]}"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "truth").mkdir(parents=True, exist_ok=True)
    images, truth = {}, {}
    for seed in range(first_seed, first_seed + n):
        image_id = f"pool_{seed:05d}"
        img = folder / "images" / f"{image_id}.png"
        lab = folder / "truth" / (f"{image_id}.grade.json" if kind == "grade" else f"{image_id}.png")
        if not (img.is_file() and lab.is_file()):
            lab = _write_phantom(seed, size, img, kind, folder / "truth")
        images[image_id], truth[image_id] = img, lab
    return images, truth


def grading_heldout(cache: Path, n: int, size: tuple[int, int]) -> list[tuple[Path, int]]:
    from monailabel_dr.fundus import io
    from monailabel_dr.fundus.phantoms import make_phantom

    folder = cache / f"heldout_grade_{size[0]}x{size[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in range(HELDOUT_SEED, HELDOUT_SEED + n):
        img, g = folder / f"heldout_{seed}.png", folder / f"heldout_{seed}.grade"
        if not (img.is_file() and g.is_file()):
            ph = make_phantom(seed, size=size)
            io.write_image(img, ph.image)
            g.write_text(str(ph.grade))
        out.append((img, int(g.read_text())))
    return out


def lesion_heldout_phantoms(cache: Path, n: int, size: tuple[int, int]) -> Path:
    """An IDRiD-layout folder (images/HO_<seed>.png, masks/<LES>/HO_<seed>_<LES>.png) of held-out phantoms."""
    import cv2

    from monailabel_dr.fundus import io
    from monailabel_dr.fundus.lesions import LESIONS
    from monailabel_dr.fundus.phantoms import make_phantom

    folder = cache / f"heldout_lesion_{size[0]}x{size[1]}_{n}"
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    for seed in range(HELDOUT_SEED, HELDOUT_SEED + n):
        ph = make_phantom(seed, size=size)
        io.write_image(folder / "images" / f"HO_{seed}.png", ph.image)
        for les in LESIONS:
            if ph.masks[les].any():
                (folder / "masks" / les).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / "masks" / les / f"HO_{seed}_{les}.png"), ph.masks[les].astype(np.uint8) * 255)
    (folder / ".complete").write_text("")
    return folder


def idrid_small(cache: Path, source: Path, scale: float) -> Path:
    """A downscaled copy of an IDRiD-layout folder (PNG images; masks area-averaged, lesion where >= 0.5)."""
    import cv2

    from monailabel_dr.fundus import io
    from monailabel_dr.fundus.idrid import idrid_image_path, idrid_masks, list_idrid

    folder = cache / f"idrid_scale{scale:g}"
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    ids = list_idrid(source)
    log.info(f"downscaling {len(ids)} IDRiD images x{scale:g} into {folder} (once)")
    for image_id in ids:
        img = io.read_image(idrid_image_path(source, image_id))
        h, w = img.shape[:2]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        io.write_image(folder / "images" / f"{image_id}.png", cv2.resize(img, size, interpolation=cv2.INTER_AREA))
        for les, m in idrid_masks(source, image_id, shape=(h, w)).items():
            if not m.any():
                continue
            small = cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5
            (folder / "masks" / les).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / "masks" / les / f"{image_id}_{les}.png"), small.astype(np.uint8) * 255)
    (folder / ".complete").write_text("")
    return folder


def idrid_pool(folder: Path) -> tuple[dict, dict, list[str]]:
    """Pool = idrid_split's training ids, with label maps as `monailabel-dr import --idrid` writes them."""
    from monailabel_dr.fundus import io
    from monailabel_dr.fundus.idrid import idrid_image_path, idrid_masks, idrid_split, list_idrid
    from monailabel_dr.fundus.lesions import label_map_from_masks

    train, val = idrid_split(list_idrid(folder))
    (folder / "truth").mkdir(exist_ok=True)
    images, truth = {}, {}
    for image_id in train:
        img = Path(idrid_image_path(folder, image_id))
        lab = folder / "truth" / f"{image_id}.png"
        if not lab.is_file():
            h, w = io.read_image(img).shape[:2]
            io.write_label(str(lab), label_map_from_masks(idrid_masks(folder, image_id, shape=(h, w))))
        images[image_id], truth[image_id] = img, lab
    return images, truth, val


# ----------------------------------------------------------------------------- evaluation (direct route)
def eval_grading(heldout: list[tuple[Path, int]]) -> tuple[float, dict]:
    from monailabel_dr.metrics.grading import grading_report

    task = app_instance()._infers["grading"]      # what POST /infer/grading runs; reloads a new checkpoint
    probs, truths = [], []
    for path, grade in heldout:
        _, res = task({"image": str(path)})
        probs.append(res["grade_probabilities"])
        truths.append(grade)
    rep = grading_report(np.asarray(truths), np.asarray(probs))
    return rep["quadratic_weighted_kappa"], {"accuracy": rep["accuracy"], "referable_auc": rep["referable_auc"]}


def eval_lesions(folder: Path, split: str) -> tuple[float, dict]:
    from monailabel_dr.fundus.lesions import LESIONS
    from monailabel_dr.lib.evaluation import evaluate_lesions

    task = app_instance()._infers["lesion_seg"]
    rep = evaluate_lesions(f"idrid:{folder}", task=task, split=split, n_boot=0)
    seg = rep["segmentation"]
    extra = {"auc_pr": seg["mean"]["auc_pr"], **{f"dice_{les}": seg[les]["dice_pooled"] for les in LESIONS}}
    return seg["mean"]["dice_pooled"], extra


# ----------------------------------------------------------------------------- experiments
@dataclass
class Experiment:
    name: str
    model: str                        # the model under test (row of configs/models.yaml)
    strategies: list[str]
    metric: str
    conf: dict                        # --conf of every server of this experiment
    k: int
    rounds: int
    seed_epochs: int
    epochs: int
    data: Data | None = None
    evaluate: Callable[[], tuple[float, dict]] | None = None
    settings: dict = field(default_factory=dict)


def _size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def _model_conf(model: str, profile: str, image_size: int, sets: list[str], val_split: float) -> dict:
    conf = {f"{model}_profile": profile, f"{model}_image_size": image_size}
    sets = [*sets, f"train.val_split={val_split:g}"]
    conf[f"{model}_set"] = ",".join(sets)
    return conf


def build_experiments(args, cache: Path) -> list[Experiment]:
    exps = []
    wanted = [e.strip() for e in args.experiments.split(",") if e.strip()]
    unknown = set(wanted) - {"grading_phantoms", "lesion_phantoms", "lesion_idrid"}
    if unknown:
        raise SystemExit(f"--experiments: unknown {sorted(unknown)}")
    lesion_strategies = [s.strip() for s in args.lesion_strategies.split(",") if s.strip()]
    lesion_models = "lesion_seg,grading" if "disagreement" in lesion_strategies else "lesion_seg"
    lesion_sets = [f"train.patch_size={args.lesion_patch}", f"train.samples_per_image={args.lesion_samples}"]
    for name in wanted:
        t0 = time.time()
        if name == "grading_phantoms":
            size = _size(args.phantom_size)
            images, truth = phantom_pool(cache, args.grading_pool, size, "grade")
            heldout = grading_heldout(cache, args.grading_heldout, size)
            exp = Experiment(
                name, "grading", [s.strip() for s in args.grading_strategies.split(",") if s.strip()],
                "quadratic weighted kappa",
                {"models": "grading", **_model_conf("grading", args.profile, args.grading_image_size, [], args.val_split)},
                args.grading_k, args.rounds, args.grading_seed_epochs, args.grading_epochs)
            exp.data = Data(images, truth, heldout, {
                "pool": f"{len(images)} phantoms, seeds 0-{len(images) - 1}, {size[0]}x{size[1]} PNG",
                "heldout": f"{len(heldout)} phantoms, seeds {HELDOUT_SEED}-{HELDOUT_SEED + len(heldout) - 1}",
                "pool_grades": {g: sum(1 for p in truth.values() if json.loads(p.read_text())["grade"] == g) for g in range(5)},
                "heldout_grades": {g: sum(1 for _, x in heldout if x == g) for g in range(5)}})
            exp.evaluate = lambda h=heldout: eval_grading(h)
        elif name == "lesion_phantoms":
            size = _size(args.phantom_size)
            images, truth = phantom_pool(cache, args.lesion_pool, size, "lesion")
            folder = lesion_heldout_phantoms(cache, args.lesion_heldout, size)
            exp = Experiment(
                name, "lesion_seg", lesion_strategies, "mean pooled lesion Dice",
                {"models": lesion_models, **_model_conf("lesion_seg", args.profile, args.lesion_image_size,
                                                        lesion_sets, args.val_split)},
                args.lesion_k, args.rounds, args.lesion_seed_epochs, args.lesion_epochs)
            exp.data = Data(images, truth, folder, {
                "pool": f"{len(images)} phantoms, seeds 0-{len(images) - 1}, {size[0]}x{size[1]} PNG",
                "heldout": f"{args.lesion_heldout} phantoms, seeds {HELDOUT_SEED}-{HELDOUT_SEED + args.lesion_heldout - 1}"})
            exp.evaluate = lambda f=folder: eval_lesions(f, "all")
        else:
            src = Path(args.idrid)
            if not (src / "images").is_dir():
                raise SystemExit(f"--idrid {src}: no images/ folder (IDRiD layout)")
            folder = idrid_small(cache, src, args.idrid_scale)
            images, truth, val = idrid_pool(folder)
            if args.idrid_pool:
                images = dict(sorted(images.items())[: args.idrid_pool])
                truth = {i: truth[i] for i in images}
            exp = Experiment(
                name, "lesion_seg", lesion_strategies, "mean pooled lesion Dice",
                {"models": lesion_models, **_model_conf("lesion_seg", args.profile, args.idrid_image_size,
                                                        lesion_sets, args.val_split)},
                args.lesion_k, args.rounds, args.lesion_seed_epochs, args.lesion_epochs)
            exp.data = Data(images, truth, folder, {
                "pool": f"{len(images)} IDRiD training-split images ({os.path.realpath(src)}), x{args.idrid_scale:g}",
                "heldout": f"{len(val)} IDRiD validation-split images ({', '.join(val)}), x{args.idrid_scale:g}"})
            exp.evaluate = lambda f=folder: eval_lesions(f, "val")
        exp.settings = {"k": exp.k, "rounds": exp.rounds, "seed_epochs": exp.seed_epochs, "epochs": exp.epochs,
                        "conf": exp.conf, "strategies": exp.strategies, **exp.data.describe}
        need = exp.k * (exp.rounds + 1)
        if len(exp.data.images) < need:
            raise SystemExit(f"{name}: the pool ({len(exp.data.images)}) is smaller than k x (rounds + 1) = {need}")
        log.info(f"{name}: data ready in {time.time() - t0:.1f} s ({exp.data.describe['pool']})")
        exps.append(exp)
    return exps


# ----------------------------------------------------------------------------- the loop
def make_store(folder: Path, images: dict[str, Path]) -> Path:
    """A datastore folder holding the pool images only (symlinks), no labels."""
    folder.mkdir(parents=True)
    for image_id, path in images.items():
        os.symlink(os.path.realpath(path), folder / f"{image_id}{path.suffix}")
    return folder


def base_conf(model_dir: Path, exp: Experiment, **extra) -> dict:
    conf = {"device": "cpu", "server_mode": "true", "model_dir": str(model_dir), **exp.conf}
    conf.update({k: str(v) for k, v in extra.items()})
    return conf


def seed_phase(exp: Experiment, repeat: int, work: Path, args) -> tuple[Path, Path, list[str], dict]:
    """Seed labels through REST, the first model via POST /train; returns the folders to copy per strategy."""
    rng = np.random.default_rng(repeat)
    ids = sorted(exp.data.images)
    seed_ids = sorted(rng.choice(ids, size=exp.k, replace=False).tolist())
    store = make_store(work / "store", exp.data.images)
    model_dir = work / "model"
    t0 = time.time()
    with serve_in_process(store, base_conf(model_dir, exp, retrain_after=0), args.verbose) as c:
        for image_id in seed_ids:
            put_label(c, image_id, exp.data.truth[image_id])
        if labelled_in_datastore(c) != set(seed_ids):
            raise SimulationError("the seed labels are not what the datastore lists as labelled")
        t1 = time.time()
        # the model under test, then any other served model (disagreement: the grader's CAM) on the same labels
        for model in dict.fromkeys([exp.model, *exp.conf["models"].split(",")]):
            r = c.post(f"/train/{model}?run_sync=true", json={"max_epochs": exp.seed_epochs})
            if r.status_code != 200:
                raise SimulationError(f"POST /train/{model}: HTTP {r.status_code} {r.text[:300]}")
        train_s = time.time() - t1
        metric, extra = exp.evaluate()
    point = {"n_labels": exp.k, "metric": metric, "extra": extra, "train_s": train_s,
             "elapsed_s": time.time() - t0, "picked": seed_ids}
    return store, model_dir, seed_ids, point


def strategy_loop(exp: Experiment, strategy: str, repeat: int, seed: tuple, work: Path, args) -> list[dict]:
    store0, model0, seed_ids, seed_point = seed
    store = work / "store"
    model_dir = work / "model"
    shutil.copytree(store0, store, symlinks=True)
    shutil.copytree(model0, model_dir)
    published = os.path.realpath(model_dir / f"{exp.model}.pt")
    base = {"experiment": exp.name, "model": exp.model, "strategy": strategy, "repeat": repeat,
            "metric_name": exp.metric}
    rows = [dict(base, round=0, source="seed (POST /train)", **seed_point, select_s=0.0, resumed_from="")]
    labelled = set(seed_ids)
    picked_ever: set[str] = set()
    client_id = f"al-sim-{exp.name}-{strategy}-{repeat}"
    random.seed(f"{exp.name}/{repeat}/{strategy}")      # MONAI Label's `random` strategy draws from `random`
    t_start = time.time()
    conf = base_conf(model_dir, exp, retrain_after=exp.k, retrain_epochs=exp.epochs)
    with serve_in_process(store, conf, args.verbose) as c:
        for rnd in range(1, exp.rounds + 1):
            t_round = time.time()
            picks, jobs, select_s = [], {}, 0.0
            for j in range(exp.k):
                t1 = time.time()
                r = c.post(f"/activelearning/{strategy}", json={"client_id": client_id, "max_inline_scoring": 100000})
                select_s += time.time() - t1
                if r.status_code != 200:
                    raise SimulationError(f"POST /activelearning/{strategy}: HTTP {r.status_code} {r.text[:300]}")
                image_id = r.json().get("id")
                if not image_id:
                    raise SimulationError(f"{strategy} returned no image with {len(exp.data.images) - len(labelled)} unlabelled")
                if image_id in labelled or image_id in picked_ever:
                    raise SimulationError(f"{strategy} picked {image_id}, which already has a final label "
                                          f"(round {rnd}, pick {j + 1})")
                picked_ever.add(image_id)
                res = put_label(c, image_id, exp.data.truth[image_id])
                labelled.add(image_id)
                picks.append(image_id)
                counted = (res.get("retrain") or {})
                if exp.model not in counted:
                    raise SimulationError(f"saving {image_id} did not count for {exp.model}'s retrain-on-correction: {res}")
                want = "queued_job" if j == exp.k - 1 else "pending"
                if counted[exp.model]["counted"] != want:
                    raise SimulationError(f"label {j + 1}/{exp.k} of round {rnd}: retrain says {counted[exp.model]}, "
                                          f"expected '{want}'")
                for m, v in counted.items():
                    if v.get("counted") == "queued_job":
                        jobs[m] = v["job"]
            if labelled_in_datastore(c) != labelled:
                raise SimulationError("the datastore's labelled images differ from the labels the loop saved")
            t1 = time.time()
            wait_jobs(c, jobs, args.job_timeout)
            train_s = time.time() - t1
            info = c.get("/info/").json()
            stats = info["train_stats"][exp.model]
            resumed = stats.get("resumed_from") or ""
            if not resumed or os.path.realpath(resumed) != published:
                raise SimulationError(f"the fine-tune of round {rnd} did not resume from the published model "
                                      f"{published}: resumed_from={resumed!r}")
            last = info["retrain"]["models"][exp.model]["last_done"] or {}
            if last.get("labels") != exp.k:
                raise SimulationError(f"the round-{rnd} job trained on {last.get('labels')} new labels, expected {exp.k}")
            metric, extra = exp.evaluate()
            rows.append(dict(base, round=rnd, source="retrain on correction", n_labels=len(labelled), metric=metric,
                             extra=extra, train_s=train_s, select_s=select_s, elapsed_s=time.time() - t_start,
                             round_s=time.time() - t_round, picked=picks, resumed_from=resumed))
            log.info(f"  {exp.name} r{repeat} {strategy:20s} round {rnd}: {len(labelled):3d} labels -> "
                     f"{metric:.4f}  (select {select_s:.1f} s, train {train_s:.1f} s)")
    return rows


def run_experiment(exp: Experiment, repeats: list[int], work: Path, args) -> list[dict]:
    rows = []
    for repeat in repeats:
        rdir = work / exp.name / f"repeat{repeat}"
        t0 = time.time()
        seed = seed_phase(exp, repeat, rdir / "seed", args)
        log.info(f"{exp.name} r{repeat}: seed {exp.k} labels -> {seed[3]['metric']:.4f} ({time.time() - t0:.1f} s)")
        for strategy in exp.strategies:
            rows += strategy_loop(exp, strategy, repeat, seed, rdir / strategy, args)
        if not args.keep:
            shutil.rmtree(rdir, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------- summaries
def _finite(vals) -> list[float]:
    return [float(v) for v in vals if v is not None and math.isfinite(float(v))]


def mean_sd(vals) -> tuple[float, float, int]:
    v = _finite(vals)
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def aulc(ns: list[int], ms: list[float]) -> float:
    """Area under the learning curve (trapezoids over the number of labels) / label range: its mean level."""
    order = np.argsort(ns)
    n, m = np.asarray(ns, float)[order], np.asarray(ms, float)[order]
    if len(n) < 2 or not np.all(np.isfinite(m)):
        return float("nan")
    return float(np.sum((n[1:] - n[:-1]) * (m[1:] + m[:-1]) / 2) / (n[-1] - n[0]))


def summarise(rows: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for exp in dict.fromkeys(r["experiment"] for r in rows):
        er = [r for r in rows if r["experiment"] == exp]
        strategies = list(dict.fromkeys(r["strategy"] for r in er))
        repeats = sorted({r["repeat"] for r in er})
        curve = {}
        for s in strategies:
            pts = {}
            for n in sorted({r["n_labels"] for r in er if r["strategy"] == s}):
                m, sd, cnt = mean_sd([r["metric"] for r in er if r["strategy"] == s and r["n_labels"] == n])
                pts[n] = {"mean": m, "sd": sd, "n": cnt}
            curve[s] = pts
        per_rep = {s: {} for s in strategies}
        for s in strategies:
            for rep in repeats:
                rr = sorted((r for r in er if r["strategy"] == s and r["repeat"] == rep), key=lambda r: r["n_labels"])
                if rr:
                    per_rep[s][rep] = {"aulc": aulc([r["n_labels"] for r in rr], [r["metric"] for r in rr]),
                                       "final": rr[-1]["metric"], "final_n": rr[-1]["n_labels"]}
        stats = {}
        for s in strategies:
            a = mean_sd([v["aulc"] for v in per_rep[s].values()])
            f = mean_sd([v["final"] for v in per_rep[s].values()])
            st = {"aulc_mean": a[0], "aulc_sd": a[1], "final_mean": f[0], "final_sd": f[1], "repeats": a[2]}
            if s != "random" and "random" in per_rep:
                both = [rep for rep in repeats if rep in per_rep[s] and rep in per_rep["random"]]
                da = [per_rep[s][rep]["aulc"] - per_rep["random"][rep]["aulc"] for rep in both]
                df = [per_rep[s][rep]["final"] - per_rep["random"][rep]["final"] for rep in both]
                dam, das, _ = mean_sd(da)
                dfm, dfs, _ = mean_sd(df)
                st.update({"aulc_minus_random_mean": dam, "aulc_minus_random_sd": das,
                           "final_minus_random_mean": dfm, "final_minus_random_sd": dfs,
                           "repeats_better_aulc": int(sum(d > 0 for d in _finite(da))), "paired_repeats": len(both)})
            stats[s] = st
        out[exp] = {"metric": er[0]["metric_name"], "curve": curve, "per_repeat": per_rep, "strategies": stats}
    return out


def markdown(summary: dict) -> str:
    def f(m, sd):
        return "n/a" if not math.isfinite(m) else f"{m:.3f} ± {sd:.3f}"

    lines = []
    for exp, s in summary.items():
        strategies = list(s["curve"])
        ns = sorted({n for c in s["curve"].values() for n in c})
        lines += [f"**{exp}** ({s['metric']}, held-out; mean ± sd over repeats)", "",
                  "| labels | " + " | ".join(strategies) + " |", "|---" * (len(strategies) + 1) + "|"]
        for n in ns:
            cells = [f(s["curve"][st][n]["mean"], s["curve"][st][n]["sd"]) if n in s["curve"][st] else "" for st in strategies]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        st = s["strategies"]
        lines.append("| AULC | " + " | ".join(f(st[x]["aulc_mean"], st[x]["aulc_sd"]) for x in strategies) + " |")
        lines.append("| AULC − random (paired) | " + " | ".join(
            "—" if x == "random" or "aulc_minus_random_mean" not in st[x] else
            f"{st[x]['aulc_minus_random_mean']:+.3f} ± {st[x]['aulc_minus_random_sd']:.3f} "
            f"({st[x]['repeats_better_aulc']}/{st[x]['paired_repeats']} better)" for x in strategies) + " |")
        lines.append("| final − random (paired) | " + " | ".join(
            "—" if x == "random" or "final_minus_random_mean" not in st[x] else
            f"{st[x]['final_minus_random_mean']:+.3f} ± {st[x]['final_minus_random_sd']:.3f}" for x in strategies) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = list(summary)
    fig, axes = plt.subplots(1, len(exps), figsize=(4.6 * len(exps), 3.8), squeeze=False)
    for ax, exp in zip(axes[0], exps):
        s = summary[exp]
        for strategy, pts in s["curve"].items():
            ns = sorted(pts)
            m = np.array([pts[n]["mean"] for n in ns])
            sd = np.array([pts[n]["sd"] for n in ns])
            (line,) = ax.plot(ns, m, marker="o", ms=3, label=strategy)
            ax.fill_between(ns, m - sd, m + sd, color=line.get_color(), alpha=0.15, lw=0)
        reps = max((v["repeats"] for v in s["strategies"].values()), default=0)
        ax.set_title(f"{exp} ({reps} repeat{'s' if reps != 1 else ''})", fontsize=10)
        ax.set_xlabel("labelled images")
        ax.set_ylabel(f"held-out {s['metric']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CSV_FIELDS = ["experiment", "model", "strategy", "repeat", "round", "n_labels", "metric_name", "metric", "source",
              "train_s", "select_s", "round_s", "elapsed_s", "resumed_from", "picked", "extra"]


def write_outputs(rows: list[dict], settings: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "al_simulation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            r = dict(r)
            r["picked"] = ";".join(r.get("picked") or [])
            r["extra"] = json.dumps({k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else None)
                                     for k, v in (r.get("extra") or {}).items()})
            for k in ("metric", "train_s", "select_s", "round_s", "elapsed_s"):
                if isinstance(r.get(k), float):
                    r[k] = f"{r[k]:.5f}" if k == "metric" else f"{r[k]:.1f}"
            w.writerow(r)
    summary = summarise(rows)
    with open(out / "al_simulation.json", "w") as f:
        json.dump(_json_safe({"settings": settings, "summary": summary}), f, indent=1)
    (out / "al_simulation.md").write_text(markdown(summary))
    plot(summary, out / "al_simulation.png")
    return summary


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiments", default="grading_phantoms,lesion_phantoms,lesion_idrid")
    p.add_argument("--repeats", type=int, default=3, help="repeats (seeds 0..N-1: seed labels and random picks)")
    p.add_argument("--rounds", type=int, default=3, help="annotation rounds after the seed")
    p.add_argument("--profile", default="tiny", help="network profile of every model (--conf profile)")
    p.add_argument("--val-split", type=float, default=0.0,
                   help="trainer validation split (0: train on every label, publish the latest weights)")
    p.add_argument("--phantom-size", default="240x320", help="phantom size HxW")
    p.add_argument("--grading-strategies", default="random,grade_uncertainty,diverse_uncertainty")
    p.add_argument("--grading-pool", type=int, default=60)
    p.add_argument("--grading-heldout", type=int, default=100)
    p.add_argument("--grading-k", type=int, default=8, help="labels per round (= retrain_after) and seed labels")
    p.add_argument("--grading-image-size", type=int, default=96)
    p.add_argument("--grading-seed-epochs", type=int, default=40)
    p.add_argument("--grading-epochs", type=int, default=15, help="retrain_epochs of each fine-tune")
    p.add_argument("--lesion-strategies", default="random,lesion_uncertainty")
    p.add_argument("--lesion-pool", type=int, default=40)
    p.add_argument("--lesion-heldout", type=int, default=24)
    p.add_argument("--lesion-k", type=int, default=4, help="labels per round (= retrain_after) and seed labels")
    p.add_argument("--lesion-image-size", type=int, default=160, help="lesion_seg working size on phantoms")
    p.add_argument("--idrid-image-size", type=int, default=256, help="lesion_seg working size on IDRiD")
    p.add_argument("--lesion-patch", type=int, default=128)
    p.add_argument("--lesion-samples", type=int, default=4, help="crops per image and epoch")
    p.add_argument("--lesion-seed-epochs", type=int, default=40)
    p.add_argument("--lesion-epochs", type=int, default=10, help="retrain_epochs of each fine-tune")
    p.add_argument("--idrid", default=str(IDRID_DEFAULT), help="IDRiD-layout folder (the pool: its idrid_split training ids)")
    p.add_argument("--idrid-scale", type=float, default=0.25, help="downscale factor of the IDRiD copy")
    p.add_argument("--idrid-pool", type=int, default=0, help="use only the first N pool ids (0: all 44)")
    p.add_argument("--out", default=str(ROOT / "docs"))
    p.add_argument("--workdir", default="", help="datastores and model folders (default: a temporary folder)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "al_sim_cache"),
                   help="generated pools / held-out sets / the downscaled IDRiD copy, reused between runs")
    p.add_argument("--keep", action="store_true", help="keep the datastores and model folders")
    p.add_argument("--job-timeout", type=float, default=1800.0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: grading_phantoms only, 1 repeat, 1 round, k=2, tiny sizes (the test)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.experiments = "grading_phantoms" if args.experiments == p.get_default("experiments") else args.experiments
        args.repeats, args.rounds = 1, 1
        args.grading_strategies = "random,grade_uncertainty" if args.grading_strategies == p.get_default(
            "grading_strategies") else args.grading_strategies
        args.grading_pool, args.grading_heldout, args.grading_k = 8, 8, 2
        args.grading_image_size, args.grading_seed_epochs, args.grading_epochs = 64, 2, 1
        args.lesion_pool, args.lesion_heldout, args.lesion_k = 6, 4, 2
        args.lesion_image_size, args.idrid_image_size, args.lesion_patch = 96, 96, 64
        args.lesion_samples, args.lesion_seed_epochs, args.lesion_epochs = 2, 1, 1
        args.idrid_pool = args.idrid_pool or 6
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root_level = logging.getLogger().level
    quiet(args.verbose)
    t0 = time.time()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="al_sim_")
        work = Path(tmp)
    try:
        exps = build_experiments(args, cache)
        rows: list[dict] = []
        for exp in exps:
            t1 = time.time()
            rows += run_experiment(exp, list(range(args.repeats)), work, args)
            log.info(f"{exp.name}: done in {time.time() - t1:.0f} s")
        settings = {
            "command": "python bench/al_simulation.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "args": vars(args),
            "experiments": {e.name: e.settings for e in exps},
            "wall_s": round(time.time() - t0, 1),
            "evaluation": "direct: the app's served infer task (the object POST /infer calls) on held-out images",
        }
        summary = write_outputs(rows, settings, Path(args.out))
        print(markdown(summary))
        log.info(f"wrote {args.out}/al_simulation.{{csv,json,md,png}} in {time.time() - t0:.0f} s total")
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        # give the caller (e.g. a test session) its logging levels back
        logging.getLogger().setLevel(root_level)
        for name, lg in logging.root.manager.loggerDict.items():
            if isinstance(lg, logging.Logger) and name != log.name:
                lg.setLevel(levels.get(name, logging.NOTSET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
