"""Per-image TWLR grades and inpainting steps on the IDRiD validation images (prints one JSON line each).

    .venv/bin/python bench/twlr_idrid_steps.py --conf models twlr --conf twlr_profile graded \
        --conf model_dir runs/twlr_graded --json runs/twlr_graded/idrid_val_steps.json

Runs the served ``twlr_vlm`` (grade, lesion presence) and ``twlr_inpaint`` (grades per step, steps, stop
reason, grade drop) infer tasks on each image of the lesion split's validation ids; then the means.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "data", "idrid_train"))
    ap.add_argument("--split", default="val", choices=["val", "train", "all"])
    ap.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    from monailabel_dr.cli import _tmp_studies, make_app
    from monailabel_dr.fundus.idrid import idrid_image_path
    from monailabel_dr.lib.evaluation import idrid_ids

    app = make_app(_tmp_studies(), {"device": "cpu", **dict(args.conf)})
    vlm, inp = app._infers["twlr_vlm"], app._infers["twlr_inpaint"]
    folder, ids = idrid_ids(f"idrid:{args.dataset}", args.split)
    rows = []
    for image_id in ids:
        path = idrid_image_path(folder, image_id)
        _, g = vlm({"image": path})
        label, r = inp({"image": path, "result_extension": ".png"})
        if label and os.path.isfile(label):
            os.remove(label)
        rows.append({"image": image_id, "grade": g["grade"], "lesion_presence": g["lesion_presence"],
                     "grades": r["grades"], "steps": r["steps"], "stop": r["stop_reason"], "drop": r["grade_drop"]})
        print(json.dumps(rows[-1]), flush=True)
    n = max(1, len(rows))
    print(json.dumps({"images": len(rows), "mean_grade_drop": sum(r["drop"] for r in rows) / n,
                      "mean_steps": sum(r["steps"] for r in rows) / n}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
