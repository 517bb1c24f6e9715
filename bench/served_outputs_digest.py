"""Digest of what the server answers on fixed checkpoints, to show a refactor changed no served output.

    .venv/bin/python bench/served_outputs_digest.py --work /tmp/dg --lesion-checkpoint runs/x/lesion_seg.pt \
        --lesion-profile cpu_negatives --code . --json after.json
    .venv/bin/python bench/served_outputs_digest.py ... --code /tmp/old_checkout --json before.json
    .venv/bin/python bench/served_outputs_digest.py --compare before.json after.json

With ``--code`` pointing at another checkout (e.g. a ``git worktree`` of an older commit), the same
commands run from that code on the same checkpoints. Digested: the ``cam`` answer (label map pixels and
JSON) on the demo phantoms with a grading checkpoint trained once in ``--work``; the ``lesion_seg``
answer (label map and JSON) on IDRiD photographs; and the ``evaluate lesion_seg`` figures on the IDRiD
validation split. Timings, paths and file dates are left out of the JSON digests.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("seconds", "time", "latenc", "checkpoint", "modified", "trained_at", "run", "path", "file", "model_dir",
            "dataset", "label")


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in sorted(x.items()) if not any(w in k.lower() for w in VOLATILE)}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return round(x, 6)
    return x


def _digest_json(obj) -> str:
    return hashlib.sha256(json.dumps(_clean(obj), sort_keys=True).encode()).hexdigest()[:16]


def _digest_image(path: str) -> str:
    import cv2

    a = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if a is None:
        import nibabel as nib
        a = np.asarray(nib.load(path).dataobj)
    return hashlib.sha256(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()[:16]


def _cli(code: Path, *args: str, expect_json: bool = True) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, "-m", "monailabel_dr.cli", *args], capture_output=True, text=True,
                         cwd=str(code), env=env, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{out.stderr[-3000:]}")
    text = out.stdout
    return json.loads(text[text.index("{"):]) if expect_json else {}


def run(args) -> dict:
    code = Path(args.code).resolve()
    work = Path(args.work).resolve()
    store, model = work / "store", work / "model"
    if not (model / "grading.pt").is_file():   # the fixed grading checkpoint, made once with this checkout
        _cli(ROOT, "demo", str(store), "--n", "12", "--labelled", "10", "--seed", "0", "--size", "200x260")
        _cli(ROOT, "train", "grading", "--studies", str(store), "--conf", "profile", "tiny", "--conf", "models", "grading",
             "--conf", "model_dir", str(model), "--epochs", "2")
    out: dict = {"code": str(code), "cam": {}, "lesion_seg": {}}
    conf = ["--conf", "profile", "tiny", "--conf", "models", "grading", "--conf", "model_dir", str(model)]
    for image in ("fundus_0000", "fundus_0003", "fundus_0007"):
        label = work / f"cam_{image}_{code.name}.png"
        res = _cli(code, "infer", "cam", "--studies", str(store), *conf, "--image", image, "--output", str(label))
        out["cam"][image] = {"json": _digest_json(res), "label": _digest_image(str(label))}
    idrid = Path(args.idrid).resolve()
    lconf = ["--conf", "models", "lesion_seg", "--conf", "lesion_seg_profile", args.lesion_profile,
             "--conf", "lesion_seg_checkpoint", str(Path(args.lesion_checkpoint).resolve()),
             "--conf", "model_dir", str(work / "lesion_model")]
    for image in ("IDRiD_05", "IDRiD_12"):
        label = work / f"les_{image}_{code.name}.png"
        (work / "empty").mkdir(exist_ok=True)
        res = _cli(code, "infer", "lesion_seg", "--studies", str(work / "empty"), *lconf,
                   "--file", str(idrid / "images" / f"{image}.jpg"), "--output", str(label))
        out["lesion_seg"][image] = {"json": _digest_json(res), "label": _digest_image(str(label))}
    report_file = work / f"evaluate_{code.name}.json"
    _cli(code, "evaluate", "lesion_seg", "--dataset", f"idrid:{idrid}", "--split", "val",
         "--checkpoint", str(Path(args.lesion_checkpoint).resolve()), *lconf[:6], "--json", str(report_file),
         expect_json=False)
    report = json.loads(report_file.read_text())
    out["evaluate_lesion_seg"] = {"json": _digest_json(report.get("segmentation")),
                                  "mean_dice_pooled": report["segmentation"]["mean"]["dice_pooled"],
                                  "mean_auc_pr": report["segmentation"]["mean"]["auc_pr"]}
    return out


def compare(a: dict, b: dict) -> int:
    diffs = 0
    for part in ("cam", "lesion_seg", "evaluate_lesion_seg"):
        x, y = a.get(part), b.get(part)
        same = _clean(x) == _clean(y) if part != "evaluate_lesion_seg" else x == y
        print(f"{part}: {'identical' if same else 'DIFFERENT'}")
        if not same:
            diffs += 1
            print(json.dumps({"before": x, "after": y}, indent=1))
    return diffs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/served_digest")
    p.add_argument("--code", default=str(ROOT), help="checkout whose CLI answers (default: this one)")
    p.add_argument("--idrid", default=str(ROOT.parent / "shared" / "data" / "idrid_train"))
    p.add_argument("--lesion-checkpoint")
    p.add_argument("--lesion-profile", default="cpu")
    p.add_argument("--json")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        return 1 if compare(a, b) else 0
    if not args.lesion_checkpoint:
        p.error("--lesion-checkpoint is required")
    out = run(args)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
