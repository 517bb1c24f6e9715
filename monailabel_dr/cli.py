"""`monailabel-dr`: the command line of the app.

Subcommands run the same infer tasks and trainers as the server, in-process:

  monailabel-dr demo DIR [--serve]          write the demo datastore (and start the demo server)
  monailabel-dr serve --studies DIR         start the MONAI Label server with this app
  monailabel-dr import --studies DIR --grades CSV | --idrid PATH
  monailabel-dr train MODEL --studies DIR   run a trainer on the datastore's final labels
  monailabel-dr infer MODEL --studies DIR --image ID | --file PATH | --all
  monailabel-dr evaluate MODEL (--studies DIR | --phantoms N)
  monailabel-dr twlr-pseudolabels --studies DIR [--images ID,ID | --unlabelled-only]
                (--to-datastore | --idrid-out FOLDER) [--params JSON] [--overwrite]
                                            TWLR weak lesion masks (twlr_inpaint) as pseudo-labels: each
                                            image's `original` label, or an IDRiD-layout folder for
                                            `train lesion_seg --dataset idrid:FOLDER`
  monailabel-dr to-dicom FILE|DIR... --out DIR [--laterality L|R] [--csv CSV] [--patient-id ID] [--upload URL]
                                            photographs -> DICOM Ophthalmic Photography 8 Bit (modality OP),
                                            optionally stored (STOW-RS) in a DICOMweb server
  monailabel-dr conf                        print the --conf options
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

APP_DIR = os.path.dirname(os.path.realpath(__file__))


def _conf(args) -> dict[str, str]:
    conf = {k: v for k, v in (args.conf or [])}
    if getattr(args, "device", None):
        conf["device"] = args.device
    # the TP-DRSeg ablations (the paper's Table 3) as profile overrides of the model
    sets = []
    if getattr(args, "text_mode", None):
        sets.append(f"network.text_mode={args.text_mode}")
    if getattr(args, "injector", None):
        sets.append(f"network.injector={'true' if args.injector == 'on' else 'false'}")
    if sets:
        key = f"{args.model}_set"
        conf[key] = ",".join([conf[key]] + sets) if conf.get(key) else ",".join(sets)
    return conf


def _ablation_args(sp) -> None:
    sp.add_argument("--text-mode", choices=["description", "name"],
                    help="lesion_sam ablation: prompt with the explicit descriptions (default) or the bare lesion names")
    sp.add_argument("--injector", choices=["on", "off"],
                    help="lesion_sam ablation: prior-aligned injectors on (default) or off (train and evaluate alike)")


def _quiet_settings() -> None:
    """MONAI Label settings for an in-process (non-server) app: no file watcher, no background scoring."""
    os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")
    os.environ.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")
    os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    os.environ.setdefault("MONAI_LABEL_SESSIONS", "false")
    from monailabel.config import settings

    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    settings.MONAI_LABEL_AUTO_UPDATE_SCORING = False
    settings.MONAI_LABEL_TRACKING_ENABLED = False
    settings.MONAI_LABEL_SESSIONS = False


def make_app(studies: str, conf: dict[str, str]):
    _quiet_settings()
    from monailabel_dr.main import MONAILabelDRApp

    if studies.startswith(("http://", "https://")):   # a DICOMweb server (lib/dicomweb.py)
        return MONAILabelDRApp(app_dir=APP_DIR, studies=studies, conf=conf)
    if not os.path.isdir(studies):
        raise SystemExit(f"--studies {studies}: no such folder")
    return MONAILabelDRApp(app_dir=APP_DIR, studies=os.path.realpath(studies), conf=conf)


def json_safe(obj):
    """NaN / inf -> None, recursively: the JSON files are read by strict parsers (jq, JavaScript)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _print(obj) -> None:
    print(json.dumps(json_safe(obj), indent=2, default=str))


# ----------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    from monailabel_dr.demo import write_demo

    h, w = (int(v) for v in args.size.lower().split("x"))
    if os.path.isdir(args.dir) and os.path.exists(os.path.join(args.dir, "demo_truth.csv")) and not args.overwrite:
        print(f"demo datastore already present at {args.dir} (use --overwrite to regenerate)")
    else:
        if args.overwrite and os.path.isdir(args.dir):
            shutil.rmtree(args.dir)
        _print(write_demo(args.dir, n=args.n, labelled=args.labelled, seed=args.seed, size=(h, w)))
    if args.serve:
        conf = [["train_on_start", "grading"], ["models", "all"]] + (args.conf or [])
        return _serve(args.dir, conf, args.host, args.port)
    return 0


def _serve(studies: str, conf: list, host: str, port: int) -> int:
    remote = studies.startswith(("http://", "https://"))   # a DICOMweb server: not a folder
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", APP_DIR, "--studies",
           studies if remote else os.path.realpath(studies), "--host", host, "--port", str(port)]
    for k, v in conf:
        cmd += ["--conf", k, v]
    env = dict(os.environ)
    env.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    print("starting:", " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def cmd_serve(args) -> int:
    return _serve(args.studies, args.conf or [], args.host, args.port)


def cmd_ohif(args) -> int:
    """The current OHIF viewer (npm's @ohif/app, pinned) in front of a DICOMweb server (lib/ohif_viewer.py)."""
    from monailabel_dr.lib.ohif_viewer import OHIFUnavailable, ensure_dist, serve

    if not str(args.dicomweb).startswith(("http://", "https://")):
        raise SystemExit(f"ohif: --dicomweb must be a DICOMweb URL (e.g. http://127.0.0.1:8042/dicom-web), got {args.dicomweb!r}")
    try:
        if args.fetch_only:
            print(ensure_dist(args.cache))
            return 0
        serve(args.dicomweb, host=args.host, port=args.port, cache_dir=args.cache)
    except OHIFUnavailable as e:
        raise SystemExit(f"ohif: {e}") from e
    return 0


def cmd_import(args) -> int:
    from monailabel_dr.lib.importers import import_grades, import_idrid

    if not args.grades and not args.idrid and not args.lesion_presence:
        raise SystemExit("import: give --grades CSV, --idrid PATH and/or --lesion-presence DIR")
    os.makedirs(args.studies, exist_ok=True)
    app = make_app(args.studies, _conf(args))
    ds = app.datastore()
    out = {}
    if args.idrid:
        out.update(import_idrid(ds, args.idrid, limit=args.limit))
    if args.grades:
        out.update(import_grades(ds, args.grades, images_dir=args.images))
    if args.lesion_presence:
        from monailabel_dr.lib.importers import import_lesion_presence

        out.update(import_lesion_presence(ds, args.lesion_presence))
    _print(out)
    return 0


def cmd_train(args) -> int:
    import logging

    # the app's own progress lines (which ensemble member is training, what was published) beside ignite's epochs
    log = logging.getLogger("monailabel_dr")
    if not log.handlers and not logging.getLogger().handlers:   # not when something (pytest, a server) set logging up
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if not args.studies:
        if not args.dataset:
            raise SystemExit("train: give --studies DATASTORE or --dataset idrid:<folder>")
        args.studies = _tmp_studies()
    app = make_app(args.studies, _conf(args))
    request = {"model": args.model}
    if args.epochs:
        request["max_epochs"] = args.epochs
    if args.name:
        request["name"] = args.name
    if args.val_split is not None:
        request["val_split"] = args.val_split
    if args.dataset:
        request["dataset_source"] = args.dataset
    if args.params:
        request.update(json.loads(args.params))
    if args.members_from:
        from monailabel_dr.lib.errors import ClientError

        trainer = app._trainers.get(args.model)
        if not hasattr(trainer, "combine"):
            raise SystemExit(f"train --members-from: {args.model} has no ensemble profiles (lesion_seg has)")
        try:
            stats = trainer.combine([os.path.realpath(p) for p in args.members_from], request, app.datastore())
        except ClientError as e:
            raise SystemExit(f"train --members-from: {e}") from e
    else:
        stats = app.train(request)
    _print(stats)
    return 0


def cmd_infer(args) -> int:
    app = make_app(read_only_view(args.studies), _conf(args))   # the folder is only read
    request = {"model": args.model}
    if args.params:
        request.update(json.loads(args.params))
    if args.all:
        return _infer_all(app, request, args.output)
    if args.file:
        task = app._infers.get(args.model)
        if task is None:
            raise SystemExit(f"unknown model {args.model}; available: {sorted(app._infers)}")
        label, result = task({**request, "image": os.path.realpath(args.file)})
    elif args.image:
        res = app.infer({**request, "image": args.image})
        label, result = res.get("file"), res.get("params")
    else:
        raise SystemExit("infer: give --image ID (datastore) or --file PATH")
    if label and args.output:
        shutil.copy(label, args.output)
        result["label_file"] = os.path.realpath(args.output)
    elif label:
        result["label_file"] = label
    _print(result)
    return 0


def _infer_all(app, request: dict, output: str | None) -> int:
    """Every image of the studies folder: one JSON line per image; label files into `output`."""
    from monailabel_dr.lib.errors import ClientError

    if output:
        os.makedirs(output, exist_ok=True)
    failures = 0
    for image_id in sorted(app.datastore().list_images()):
        try:
            res = app.infer({**request, "image": image_id})
        except ClientError as e:  # one unusable image does not stop the batch
            failures += 1
            print(json.dumps({"image": image_id, "error": e.detail, "status": e.status_code}), flush=True)
            continue
        result = dict(res.get("params") or {})
        label = res.get("file")
        if label and output:
            ext = next((e for e in (".nii.gz", ".nrrd", ".png") if label.endswith(e)), os.path.splitext(label)[1])
            dst = os.path.join(output, f"{image_id}_{request['model']}{ext}")
            shutil.move(label, dst)
            result["label_file"] = dst
        if output:
            with open(os.path.join(output, f"{image_id}_{request['model']}.json"), "w") as f:
                json.dump(result, f, indent=1)
        result.pop("latencies", None)
        print(json.dumps({"image": image_id, **result}, default=str), flush=True)
    return 1 if failures else 0


def cmd_preannotate(args) -> int:
    """A model's proposal as a DICOM SEG (AUTOMATIC segments) beside every photograph of a DICOMweb server that
    has none from this model yet; one JSON line per image. ``--watch S``: then again every S seconds, for the
    photographs that arrive, until interrupted."""
    import time

    from monailabel_dr.lib.errors import ClientError

    if not str(args.studies).startswith(("http://", "https://")):
        raise SystemExit("preannotate: --studies must be a DICOMweb URL (e.g. http://127.0.0.1:8042/dicom-web); "
                         "the proposals are stored in that server as DICOM SEG")
    app = make_app(args.studies, _conf(args))
    if args.model not in app._infers:
        raise SystemExit(f"preannotate: unknown model {args.model}; available: {sorted(app._infers)}")
    params = json.loads(args.params) if args.params else {}
    only = set(args.images.split(",")) if args.images else None
    failures = 0
    while True:
        ds = app.datastore()
        ds.refresh_remote(force=True)
        done = {img for img, props in ds.proposals().items() if any(p["model"] == args.model for p in props)}
        todo = [i for i in sorted(ds.list_images()) if (only is None or i in only) and (args.overwrite or i not in done)]
        for image_id in todo:
            try:
                answer = app.infer_to_dicom_seg(args.model, image_id, params)
            except ClientError as e:   # one unusable image does not stop the batch
                failures += 1
                print(json.dumps({"image": image_id, "error": e.detail, "status": e.status_code}), flush=True)
                if e.status_code == 409 or e.status_code == 503:   # untrained model, server gone: nothing else will work
                    return 1
                continue
            print(json.dumps({"image": image_id, "model": args.model, "stored": answer["dicom_seg"]}, default=str), flush=True)
        skipped = sorted(set(ds.list_images()) & done) if not args.overwrite else []
        print(json.dumps({"summary": {"model": args.model, "stored": len(todo) - failures, "failed": failures,
                                      "already_proposed": len([i for i in skipped if only is None or i in only])}}),
              flush=True)
        if not args.watch:
            return 1 if failures else 0
        time.sleep(float(args.watch))
        failures = 0


# infer tasks with predict(path) -> (4, H, W) probabilities (twlr_inpaint: its weak masks as a ranking),
# and the model row serving each
LESION_MODELS = {"lesion_seg": "lesion_seg", "lesion_sam": "lesion_sam", "twlr_inpaint": "twlr"}


def _model_task(args, infer: str):
    """The infer task of a model row built from --conf; --checkpoint: exactly that checkpoint."""
    conf = _conf(args)
    row = LESION_MODELS.get(infer, infer)
    conf.setdefault("models", row)
    if args.checkpoint:  # an empty model dir, so nothing shadows the given checkpoint
        if not os.path.isfile(args.checkpoint):
            raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
        if row == "lesion_seg" and "preprocess" not in conf.get("lesion_seg_set", ""):
            # the preprocessing the checkpoint records it was trained with, unless --conf lesion_seg_set says one
            from monailabel_dr.lib.checkpoints import checkpoint_preprocess

            sets = [f"preprocess.{k}={v}" for k, v in checkpoint_preprocess(args.checkpoint).items()]
            conf["lesion_seg_set"] = ",".join(filter(None, [conf.get("lesion_seg_set"), *sets]))
        conf[f"{row}_checkpoint"] = os.path.realpath(args.checkpoint)
        conf["model_dir"] = _tmp_studies()
    return make_app(read_only_view(args.studies) or _tmp_studies(), conf)._infers[infer]


def cmd_evaluate(args) -> int:
    from monailabel_dr.lib.evaluation import evaluate_grading, evaluate_lesions, evaluate_twlr_phantoms, lesion_summary

    if args.model == "twlr_inpaint" and args.phantoms:
        params = json.loads(args.params) if args.params else {}
        report = evaluate_twlr_phantoms(_model_task(args, "twlr_inpaint"), args.phantoms, seed=args.seed,
                                        size=args.size, params=params, min_grade=args.min_grade)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(json_safe(report), f, indent=1, default=str)
        _print({k: report[k] for k in ("data", "summary", "weak_masks", "model", "params", "seconds")})
        return 0
    if args.model in LESION_MODELS:
        if not args.dataset:
            raise SystemExit(f"evaluate {args.model}: give --dataset idrid:<folder>")
        task = None if args.predictions else _model_task(args, args.model)
        params = json.loads(args.params) if args.params else {}
        report = evaluate_lesions(args.dataset, task=task, predictions=args.predictions, split=args.split,
                                  n_boot=args.n_boot, threshold=args.threshold, froc_mode=args.froc_mode,
                                  froc_overlap=args.froc_overlap, params=params)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(json_safe(report), f, indent=1, default=str)
        print(lesion_summary(report))
        return 0
    if args.model == "cam":
        return _evaluate_cam(args)
    if args.model not in ("grading",):
        raise SystemExit(f"evaluate: {args.model} is not evaluable yet (grading, {', '.join(LESION_MODELS)} are)")
    if args.dataset:
        return _evaluate_graded_folder(args)
    app = make_app(read_only_view(args.studies) or _tmp_studies(), _conf(args))
    report = evaluate_grading(app, studies=args.studies if args.phantoms is None else None,
                              phantoms=args.phantoms, seed=args.seed, size=args.size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(report), f, indent=2)
    _print(report)
    return 0


def _grading_app(args):
    """The app serving the grading row, with ``--checkpoint`` exactly that file and its recorded profile (so no
    --conf is needed to match it): ``(app, profile record or None)``."""
    from monailabel_dr.config import load_model_table
    from monailabel_dr.lib.evaluation import checkpoint_profile, conf_for_checkpoint

    conf = _conf(args)
    conf.setdefault("models", "grading")
    record = None
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
        record = checkpoint_profile(args.checkpoint)
        if record and not any(k in conf for k in ("grading_profile", "grading_set", "profile")):
            conf.update(conf_for_checkpoint("grading", record, load_model_table()["grading"].network_profiles()["profiles"]))
        conf["grading_checkpoint"] = os.path.realpath(args.checkpoint)
        conf["model_dir"] = _tmp_studies()   # an empty model dir, so nothing shadows the given checkpoint
    return make_app(read_only_view(args.studies) or _tmp_studies(), conf), record


def _evaluate_cam(args) -> int:
    """evaluate cam --dataset idrid:<folder> [--checkpoint grading.pt]: the CAM paper's FROC of the served proposals."""
    from monailabel_dr.lib.evaluation import cam_summary, evaluate_cam_lesions

    if not args.dataset:
        raise SystemExit("evaluate cam: give --dataset idrid:<folder> (lesion masks)")
    app, record = _grading_app(args)
    params = json.loads(args.params) if args.params else {}
    try:
        report = evaluate_cam_lesions(app._infers["cam"], args.dataset, split=args.split, params=params,
                                      overlap=args.froc_overlap)
    except ValueError as e:
        raise SystemExit(f"evaluate: {e}") from e
    return _report(args, report, record, cam_summary)


def _evaluate_graded_folder(args) -> int:
    """evaluate grading --dataset grades:<folder> [--checkpoint CKPT] [--split val]: the profile is read from the
    checkpoint (no --conf needed to match it)."""
    from monailabel_dr.lib.evaluation import evaluate_graded_folder, grading_summary

    kind, _, folder = args.dataset.partition(":")
    if kind != "grades" or not folder:
        raise SystemExit(f"--dataset {args.dataset!r}: evaluate grading takes grades:<folder> (images/ and grades.csv)")
    app, record = _grading_app(args)
    task = app._infers["grading"]
    train = app.app_settings.models["grading"].train
    try:
        report = evaluate_graded_folder(task, folder, split=args.split, n_boot=args.n_boot,
                                        val_split=float((record or {}).get("val_split", train.val_split)),
                                        split_seed=int((record or {}).get("split_seed", train.split_seed)))
    except ValueError as e:
        raise SystemExit(f"evaluate: {e}") from e
    return _report(args, report, record, grading_summary)


def _report(args, report: dict, record: dict | None, summary) -> int:
    """--json (NaN -> null) and the terminal summary of a report made from a checkpoint's recorded profile."""
    report["profile_from_checkpoint"] = record
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(report), f, indent=1)
    print(summary(report))
    return 0


def cmd_rationale(args) -> int:
    """Fit the lesion-statistics grade on a graded folder's training patients and report it on its validation
    patients beside the ICDR rule (and the CNN grader, given its `evaluate --split val` report)."""
    from monailabel_dr.lib.evaluation import read_graded_folder
    from monailabel_dr.lib.rationale import RATIONALE_FILE, fit_and_evaluate, read_lesion_answers

    kind, _, folder = args.dataset.partition(":")
    if kind != "grades" or not folder:
        raise SystemExit(f"--dataset {args.dataset!r}: use grades:<folder> (images/ and grades.csv)")
    try:
        grades = {i: g for i, _, g in read_graded_folder(folder)}
        answers = read_lesion_answers(args.lesion_answers, sorted(grades))
        cnn = None
        if args.cnn_report:
            with open(args.cnn_report) as f:
                cnn = json.load(f)
        model, report = fit_and_evaluate(answers, grades, val_split=args.val_split, split_seed=args.split_seed,
                                         n_boot=args.n_boot, cnn_report=cnn)
    except ValueError as e:
        raise SystemExit(f"rationale: {e}") from e
    out = args.out or os.path.join(str(_conf(args).get("model_dir") or os.path.join(APP_DIR, "model")), RATIONALE_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    model.info["lesion_answers"] = os.path.realpath(args.lesion_answers)
    model.save(out)
    report["model_file"] = os.path.realpath(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(report), f, indent=1)
    rows = [k for k in ("rule", "learned", "cnn", "cnn_plus_learned") if k in report]
    print(f"validation patients: {report['split']['val_patients']}, images: {report['split']['val_images']}; C = {report['C']}")
    for k in rows:
        r = report[k]
        ci = r.get("ci95", {}).get("quadratic_weighted_kappa")
        print(f"  {k:18s} kappa {r['quadratic_weighted_kappa']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
              + f"  acc {r['accuracy']:.3f}  referable AUC {r['referable_auc']:.3f}")
    print(f"model written to {out}")
    return 0


def read_only_view(studies: str | None) -> str | None:
    """A working copy of a studies folder for commands that only read it (infer, evaluate): the datastore
    MONAI Label opens writes ``datastore_v2.json``, ``.lock`` and ``labels/`` into its folder (an infer on
    an image id even saves its result there as an ``original`` label), so the folder the user gave is never
    opened as a datastore. The view holds symbolic links to its images and labels and a copy of its
    ``datastore_v2.json``, in a temporary folder removed when the command ends; a DICOMweb URL is returned
    as it is (its cache is already outside any user folder)."""
    import atexit
    import tempfile

    if not studies or studies.startswith(("http://", "https://")):
        return studies
    src = os.path.realpath(studies)
    if not os.path.isdir(src):
        raise SystemExit(f"--studies {studies}: no such folder")
    view = tempfile.mkdtemp(prefix="mldr_readonly_")
    atexit.register(shutil.rmtree, view, True)
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if name == "datastore_v2.json" and os.path.isfile(path):
            shutil.copyfile(path, os.path.join(view, name))
        elif os.path.isfile(path) and not name.startswith("."):
            os.symlink(path, os.path.join(view, name))
    labels = os.path.join(src, "labels")
    if os.path.isdir(labels):
        for tag in os.listdir(labels):
            if not os.path.isdir(os.path.join(labels, tag)):
                continue
            os.makedirs(os.path.join(view, "labels", tag), exist_ok=True)
            for name in os.listdir(os.path.join(labels, tag)):
                os.symlink(os.path.join(labels, tag, name), os.path.join(view, "labels", tag, name))
    return view


def _tmp_studies() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="mldr_eval_")


def cmd_conf(args) -> int:
    from monailabel_dr.config import conf_table_markdown

    print(conf_table_markdown())
    return 0


def cmd_twlr_pseudolabels(args) -> int:
    """TWLR weak lesion masks as pseudo-labels: one JSON line per image, then a summary line."""
    from monailabel_dr.lib.pseudolabels import (
        PseudoLabelError,
        default_models,
        parse_params,
        run_pseudolabels,
        select_images,
    )

    try:
        params = parse_params(args.params)
    except PseudoLabelError as e:
        raise SystemExit(f"twlr-pseudolabels: {e}") from e
    conf = _conf(args)
    conf.setdefault("models", default_models(params))
    app = make_app(args.studies, conf)
    images = args.images.split(",") if args.images else None
    ids = select_images(app.datastore(), images, unlabelled_only=args.unlabelled_only)
    if not ids:
        raise SystemExit("twlr-pseudolabels: no images selected")
    emit = lambda rec: print(json.dumps(json_safe(rec), default=str), flush=True)  # noqa: E731
    try:
        summary = run_pseudolabels(app, ids, params, to_datastore=args.to_datastore, idrid_out=args.idrid_out,
                                   overwrite=args.overwrite, copy_images=args.copy_images, emit=emit)
    except PseudoLabelError as e:
        raise SystemExit(f"twlr-pseudolabels: {e}") from e
    emit({"summary": summary})
    return 1 if summary["failed"] else 0


def cmd_to_dicom(args) -> int:
    from monailabel_dr.dicom import photo

    try:
        files = photo.image_files(args.inputs)
        sidecar = photo.read_sidecar_csv(args.csv) if args.csv else None
        lat = photo.normalise_laterality(args.laterality) if args.laterality else None
    except (photo.DicomConversionError, OSError) as e:
        raise SystemExit(f"to-dicom: {e}") from e
    if not files:
        raise SystemExit("to-dicom: no photographs found")
    web = None
    if args.upload:
        from monailabel_dr.lib.dicomweb import DicomWeb

        web = DicomWeb(args.upload)
    failed = 0
    for f in files:
        try:
            rec = photo.convert_file(f, args.out, laterality=lat, patient_id=args.patient_id,
                                     patient_name=args.patient_name, study_date=args.study_date, sidecar=sidecar)
        except photo.DicomConversionError as e:
            failed += 1
            print(json.dumps({"source": f, "error": str(e)}), flush=True)
            continue
        if rec["laterality"] is None:
            print(f"to-dicom: {os.path.basename(f)}: laterality unknown (no left/right/OS/OD in the name, no --csv row, "
                  f"no --laterality): Image Laterality left out", file=sys.stderr)
        if web is not None:
            import pydicom

            from monailabel_dr.lib.errors import ClientError

            try:
                web.store([pydicom.dcmread(rec["dicom"])])
                rec["stored"] = web.url
            except ClientError as e:
                failed += 1
                rec["error"] = e.detail
        print(json.dumps(rec), flush=True)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- parser
def _common_args(sp, studies_required=True) -> None:
    sp.add_argument("--studies", required=studies_required, help="datastore folder (images + labels/)")
    sp.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help="app option, as for start_server")
    sp.add_argument("--device", help="cpu, cuda, cuda:N (default: auto)")


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="write the demo datastore of synthetic fundus phantoms")
    d.add_argument("dir")
    d.add_argument("--n", type=int, default=600, help="number of images (default 600)")
    d.add_argument("--labelled", type=int, default=240, help="how many get a grade label (default 240)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", default="480x640", help="HxW of the phantoms (default 480x640)")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--serve", action="store_true", help="then start the server on it and train the grader in the background")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"))
    d.set_defaults(func=cmd_demo)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="start the MONAI Label server with this app")
    s.add_argument("--studies", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"))
    s.set_defaults(func=cmd_serve)


def _add_import(sub) -> None:
    i = sub.add_parser("import", help="import a grades CSV and/or an IDRiD-layout lesion dataset into a datastore")
    _common_args(i)
    i.add_argument("--grades", help="CSV with columns image,grade")
    i.add_argument("--images", help="folder to take images from when the CSV names images not yet in the datastore")
    i.add_argument("--idrid", help="folder in the IDRiD layout: images/NAME.jpg, masks/<LES>/NAME_<LES>.png")
    i.add_argument("--limit", type=int, help="import only the first N IDRiD images")
    i.add_argument("--lesion-presence", metavar="DIR",
                   help="lesion-presence flags from lesion_seg answers (<id>_lesion_seg.json, `infer lesion_seg --all "
                        "--output DIR`) into the graded images' grade labels, marked as model predictions (TWLR targets)")
    i.set_defaults(func=cmd_import)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a model on the datastore's final labels (same trainer as the server)")
    t.add_argument("model")
    _common_args(t, studies_required=False)
    t.add_argument("--epochs", type=int)
    t.add_argument("--name", help="run name (reusing one resumes from its best model)")
    t.add_argument("--val-split", type=float)
    t.add_argument("--dataset", help="train from a folder instead of the datastore's labels: idrid:<folder> (lesion_seg, lesion_sam)")
    t.add_argument("--params", help="extra train request JSON")
    t.add_argument("--members-from", nargs="+", metavar="CKPT",
                   help="lesion_seg with an ensemble profile (network.members K): combine K checkpoints of the profile's "
                        "single network (e.g. trained elsewhere) instead of training them: validated on the trainer's "
                        "validation images and published like a trained ensemble")
    _ablation_args(t)
    t.set_defaults(func=cmd_train)


def _add_infer(sub) -> None:
    f = sub.add_parser("infer", help="run a model's infer task on a datastore image or a file")
    f.add_argument("model")
    _common_args(f)
    f.add_argument("--image", help="datastore image id")
    f.add_argument("--file", help="image file (not added to the datastore)")
    f.add_argument("--all", action="store_true", help="every image of --studies (a datastore or a plain folder of images)")
    f.add_argument("--output", help="copy the result label file here (with --all: a folder for labels and JSON)")
    f.add_argument("--params", help="request parameters as JSON, e.g. '{\"target\": \"MA\"}'")
    f.set_defaults(func=cmd_infer)


def _add_preannotate(sub) -> None:
    pa = sub.add_parser("preannotate", help="store a model's proposals as DICOM SEG (AUTOMATIC) beside the "
                                            "photographs of a DICOMweb server that have none from it")
    _common_args(pa)
    pa.add_argument("--model", required=True, help="a segmentation model: lesion_seg, lesion_sam, cam, twlr_inpaint")
    pa.add_argument("--images", help="comma list of image ids (SeriesInstanceUIDs); default: every photograph")
    pa.add_argument("--overwrite", action="store_true", help="store a new proposal even where this model has one")
    pa.add_argument("--params", help="infer request parameters as JSON, e.g. '{\"target\": \"MA\"}'")
    pa.add_argument("--watch", type=float, metavar="SECONDS",
                    help="keep running: look for new photographs every SECONDS and pre-annotate them")
    pa.set_defaults(func=cmd_preannotate)


def _add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="metrics of a model on a datastore's labels or on fresh phantoms")
    e.add_argument("model")
    _common_args(e, studies_required=False)
    e.add_argument("--phantoms", type=int, help="grading, twlr_inpaint: evaluate on N fresh phantoms instead of a datastore")
    e.add_argument("--min-grade", type=int, default=0, help="twlr_inpaint --phantoms: skip phantoms of a lower true grade")
    e.add_argument("--seed", type=int, default=1_000_000, help="first phantom seed (default 1000000: never used by the demo)")
    e.add_argument("--size", default="480x640")
    e.add_argument("--json", help="also write the report here")
    e.add_argument("--dataset", help="lesion_seg / lesion_sam / twlr_inpaint: idrid:<folder> with images/ and masks/<LES>/; "
                                     "grading: grades:<folder> with images/ and grades.csv (image,grade)")
    e.add_argument("--checkpoint", help="evaluate exactly this checkpoint (grading: its profile is read from the file)")
    e.add_argument("--predictions", help="lesion models: evaluate a folder of predicted masks (<LES>/<ID>_<LES>.png) instead of a model")
    e.add_argument("--params", help="lesion models: infer request parameters as JSON, e.g. '{\"mode\": \"fast\"}' for lesion_sam")
    e.add_argument("--split", default="all", choices=["val", "train", "all"],
                   help="which images of the folder: all (default; e.g. a test folder), or val / train of the split the "
                        "trainer uses (lesion models: IDRiD ids ending in 0 or 5 validate; grading: the patient split "
                        "with the checkpoint's val_split / split_seed)")
    e.add_argument("--threshold", type=float, default=0.5, help="lesion_seg: probability threshold for Dice / IoU")
    e.add_argument("--froc-mode", default="gt", choices=["gt", "iou", "pixel"],
                   help="lesion_seg FROC hit rule: intersection / lesion area (gt, the documented default), "
                        "intersection / union (iou) or one shared pixel (pixel, the lenient variant)")
    e.add_argument("--froc-overlap", type=float, default=0.5, help="lesion_seg FROC overlap for gt / iou (default 0.5)")
    _ablation_args(e)
    e.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95 %% CIs")
    e.set_defaults(func=cmd_evaluate)


def _add_twlr_pseudolabels(sub) -> None:
    w = sub.add_parser("twlr-pseudolabels", help="TWLR weak lesion masks (twlr_inpaint) as pseudo-labels for lesion_seg")
    _common_args(w)
    sel = w.add_mutually_exclusive_group()
    sel.add_argument("--images", help="comma list of datastore image ids (default: every image)")
    sel.add_argument("--unlabelled-only", action="store_true",
                     help="only images without a final lesion label map (grade-only labels do not count)")
    dst = w.add_mutually_exclusive_group(required=True)
    dst.add_argument("--to-datastore", action="store_true",
                     help="save each weak label map as the image's `original` label (never `final`)")
    dst.add_argument("--idrid-out", metavar="FOLDER",
                     help="write images/NAME.ext (symlink) + masks/<LES>/NAME_<LES>.png (0/255, non-empty only)")
    w.add_argument("--params", help="twlr_inpaint request parameters as JSON, e.g. '{\"tau\": 0.3, \"t_max\": 4}'")
    w.add_argument("--overwrite", action="store_true",
                   help="replace an existing `original` label / the image's files in --idrid-out (default: skip)")
    w.add_argument("--copy-images", action="store_true", help="--idrid-out: copy the photographs instead of symlinking")
    w.set_defaults(func=cmd_twlr_pseudolabels)


def _add_to_dicom(sub) -> None:
    dc = sub.add_parser("to-dicom", help="convert jpg/png/tif fundus photographs to DICOM Ophthalmic Photography (OP)")
    dc.add_argument("inputs", nargs="+", metavar="FILE|DIR", help="photographs, or folders of them")
    dc.add_argument("--out", required=True, help="output folder (one NAME.dcm per photograph)")
    dc.add_argument("--laterality", help="eye of every photograph: L/R (left/right, OS/OD); default: the CSV, else the file name")
    dc.add_argument("--csv", help="CSV with an image column (file name) and any of laterality (eye), patient_id, patient_name, study_date")
    dc.add_argument("--patient-id", help="PatientID of every photograph (default: the CSV, else the file name without its eye token)")
    dc.add_argument("--patient-name", help="PatientName (default: the patient id)")
    dc.add_argument("--study-date", help="YYYYMMDD (default: today)")
    dc.add_argument("--upload", metavar="DICOMWEB_URL", help="also store the instances there (STOW-RS), e.g. http://127.0.0.1:8042/dicom-web")
    dc.set_defaults(func=cmd_to_dicom)


def _add_rationale(sub) -> None:
    ra = sub.add_parser("rationale", help="fit the lesion-statistics grade (grade rationale) on a graded folder's "
                                          "training patients; report it with the ICDR rule on the validation patients")
    ra.add_argument("--dataset", required=True, help="grades:<folder> with images/ and grades.csv")
    ra.add_argument("--lesion-answers", required=True,
                    help="folder of <id>_lesion_seg.json answers (monailabel-dr infer lesion_seg --all --output FOLDER)")
    ra.add_argument("--cnn-report", help="an `evaluate grading --split val --json` report of the same folder: "
                                         "compare with the CNN grader and report the average of both")
    ra.add_argument("--out", help="model file (default <model_dir>/grade_rationale.json); /infer/grading serves it from beside "
                                  "the served grading checkpoint or from the model dir")
    ra.add_argument("--val-split", type=float, default=0.2, help="as the grader's profile (default 0.2)")
    ra.add_argument("--split-seed", type=int, default=0)
    ra.add_argument("--n-boot", type=int, default=1000)
    ra.add_argument("--json", help="also write the report here")
    ra.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"))
    ra.set_defaults(func=cmd_rationale)


def _add_ohif(sub) -> None:
    from monailabel_dr.lib.ohif_viewer import OHIF_VERSION

    o = sub.add_parser("ohif", help=f"start OHIF {OHIF_VERSION} (npm's @ohif/app) on a DICOMweb server: "
                                     "photographs, model proposals and corrections as DICOM SEG")
    o.add_argument("--dicomweb", required=True, help="the DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web (Orthanc)")
    o.add_argument("--host", default="127.0.0.1")
    o.add_argument("--port", type=int, default=3000)
    o.add_argument("--cache", default=None, help="where the viewer's files are kept (default ~/.cache/monailabel-dr/ohif)")
    o.add_argument("--fetch-only", action="store_true", help="fetch the viewer's files, print their folder and exit")
    o.set_defaults(func=cmd_ohif)


def _add_conf(sub) -> None:
    c = sub.add_parser("conf", help="print the --conf options as a table")
    c.set_defaults(func=cmd_conf)


# the subcommands, in the order `monailabel-dr --help` lists them
_COMMANDS = (_add_demo, _add_serve, _add_import, _add_train, _add_infer, _add_preannotate, _add_evaluate,
             _add_twlr_pseudolabels, _add_to_dicom, _add_ohif, _add_rationale, _add_conf)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monailabel-dr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from monailabel_dr.config import ConfError
    from monailabel_dr.lib.evaluation import EvaluationError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EvaluationError as e:   # lib/ raises, the CLI decides how a command ends
        raise SystemExit(str(e)) from e
    except ConfError as e:         # a bad --conf / profile key: the message, not a traceback
        raise SystemExit(f"monailabel-dr {args.command}: {e}") from e


if __name__ == "__main__":
    sys.exit(main())
