"""False lesions on healthy eyes: the served `lesion_seg` on the grade-0 photographs of the graded_dr
validation patients (the grading trainer's patient split). Prints numbers; asserts nothing.

    .venv/bin/python bench/grade0_false_positives.py --checkpoint runs/lesion_cpu/lesion_seg.pt [--json out.json]

For each grade-0 validation photograph the `/infer/lesion_seg` answer (same task, same threshold as
served): whether any lesion component is reported, per lesion and in all, and the predicted lesion
area as a fraction of the field of view. Reports the fraction of photographs with any component, the
mean and median number of components, and the mean predicted area, per lesion and in all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from healthy_eyes import GRADED, add_task_args, grade0_images, lesion_task  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=GRADED)
    add_task_args(p, profile="cpu")
    p.add_argument("--split", default="val", choices=["val", "train", "all"])
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args()

    from monailabel_dr.fundus.lesions import LESIONS

    found = grade0_images(a.folder, a.split)
    if a.max_images:
        found = found[:a.max_images]
    healthy = [i for i, _ in found]
    task = lesion_task(a)
    per_image = []
    t0 = time.time()
    for image_id, path in found:
        ans = task.answer(path)
        fov = float(ans["fov_area_px"])
        les = ans["lesions"]
        per_image.append({"image": image_id,
                          "components": {k: les[k]["components"] for k in LESIONS},
                          "area_fraction": {k: les[k]["area_px"] / fov for k in LESIONS}})
    any_comp = [sum(r["components"].values()) > 0 for r in per_image]
    report = {
        "data": {"folder": os.path.realpath(a.folder), "split": a.split, "grade0_images": len(per_image),
                 "patients": len({i.rsplit("_", 1)[0] for i in healthy})},
        "checkpoint": os.path.realpath(a.checkpoint), "threshold": ans.get("threshold") if per_image else None,
        "threshold_source": ans.get("threshold_source") if per_image else None, "tta": ans.get("tta") if per_image else None,
        "profile_overrides": a.set,
        "model": task.model_json(),
        "any_lesion_fraction_of_images": round(float(np.mean(any_comp)), 4) if per_image else None,
        "mean_area_fraction_of_fov_all_lesions": round(float(np.mean([sum(r["area_fraction"].values()) for r in per_image])), 6)
        if per_image else None,
        "per_lesion": {k: {
            "images_with_components": round(float(np.mean([r["components"][k] > 0 for r in per_image])), 4),
            "components_mean": round(float(np.mean([r["components"][k] for r in per_image])), 2),
            "components_median": float(np.median([r["components"][k] for r in per_image])),
            "mean_area_fraction_of_fov": round(float(np.mean([r["area_fraction"][k] for r in per_image])), 6),
        } for k in LESIONS} if per_image else {},
        "seconds": round(time.time() - t0, 1),
        "per_image": per_image,
    }
    text = json.dumps({k: v for k, v in report.items() if k != "per_image"}, indent=2, default=str)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
