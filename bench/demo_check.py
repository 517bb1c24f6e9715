"""Time the demo and check its grades over HTTP (prints numbers; asserts nothing).

Start the demo first (`make demo`, or `monailabel-dr demo demo_data --serve`), then:

    .venv/bin/python bench/demo_check.py --url http://127.0.0.1:8000 --studies demo_data [--t0 EPOCH_SECONDS]

Reports: seconds from --t0 (e.g. `date +%s` taken when `make demo` was typed) until
`/infer/grading` first answers 200, until background training is DONE, and the
accuracy / quadratic weighted kappa of the served grades against
`demo_truth.csv` on the demo images that carry no label (and on the labelled ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import requests

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from monailabel_dr.demo import read_truth  # noqa: E402
from monailabel_dr.metrics.grading import accuracy, quadratic_weighted_kappa  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--studies", default="demo_data")
    p.add_argument("--t0", type=float, default=None, help="start time (epoch seconds); default: now")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args()
    t0 = args.t0 or time.time()
    while not os.path.exists(os.path.join(args.studies, "demo_truth.csv")):  # `make demo` may still be installing
        if time.time() - t0 > args.timeout:
            raise SystemExit("no demo_truth.csv appeared")
        time.sleep(2)
    time.sleep(1)
    truth = read_truth(args.studies)
    probe = sorted(truth)[1]
    report: dict = {}

    deadline = t0 + args.timeout
    while time.time() < deadline:
        try:
            r = requests.post(f"{args.url}/infer/grading?image={probe}", timeout=60)
            if r.status_code == 200:
                report["first_grade_s"] = round(time.time() - t0, 1)
                break
        except requests.ConnectionError:
            pass
        time.sleep(2)
    print(json.dumps(report), flush=True)

    while time.time() < deadline:
        st = requests.get(f"{args.url}/train/", timeout=30).json()
        if st.get("status") in ("DONE", "ERROR"):
            report["training_status"] = st["status"]
            report["training_done_s"] = round(time.time() - t0, 1)
            break
        time.sleep(5)
    stats = requests.get(f"{args.url}/info/", timeout=30).json()["train_stats"].get("grading", {})
    report["epochs"] = stats.get("epoch")
    report["best_val_kappa"] = stats.get("best_metric")

    for subset in ("unlabelled", "labelled"):
        ids = [k for k, v in truth.items() if bool(v["labelled"]) == (subset == "labelled")]
        y, yhat = [], []
        t = time.time()
        for image_id in ids:
            res = requests.post(f"{args.url}/infer/grading?image={image_id}", timeout=60).json()
            y.append(truth[image_id]["grade"])
            yhat.append(res["grade"])
        report[subset] = {
            "n": len(ids),
            "accuracy": round(accuracy(np.array(y), np.array(yhat)), 4),
            "quadratic_weighted_kappa": round(quadratic_weighted_kappa(np.array(y), np.array(yhat)), 4),
            "seconds_per_infer": round((time.time() - t) / max(1, len(ids)), 3),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
