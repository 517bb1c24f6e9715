"""Where the served `lesion_seg`'s false components on healthy eyes are, and how big: for the grade-0
photographs of the graded_dr validation patients, every component the served masks hold, its distance to
the optic disc the landmark detection finds (in disc diameters) and its area. Prints numbers; asserts
nothing.

    .venv/bin/python bench/grade0_components.py --checkpoint runs/X/lesion_seg.pt --profile cpu_negatives

What it answers: would optic-disc suppression (EX and HE at the bright disc) or a minimum component
size remove them? The masks are the served ones (`served_masks`, at the thresholds and `min_peak` the
task serves); the disc is `fundus/landmarks.py`'s, as the served answer reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from healthy_eyes import GRADED, add_task_args, grade0_images, lesion_task  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_task_args(p)
    p.add_argument("--graded", default=GRADED)
    p.add_argument("--json")
    a = p.parse_args()

    from monailabel_dr.fundus import geometry, io, landmarks
    from monailabel_dr.fundus.components import connected_components
    from monailabel_dr.fundus.lesions import LESIONS
    from monailabel_dr.lib.infers.lesion_seg import served_masks

    healthy = grade0_images(a.graded)
    task = lesion_task(a)
    thr, _ = task.thresholds()
    comps: dict[str, list] = {les: [] for les in LESIONS}
    no_disc = 0
    for image_id, path in healthy:
        probs, fov = task.predict(path)
        rgb = io.read_image(path)
        found = landmarks.detect_landmarks(rgb, geometry.detect_fov(io.to_rgb_float(rgb)))
        masks = served_masks(probs, thr, task.min_peak())
        for k, les in enumerate(LESIONS):
            m = masks[k] if masks is not None else (probs[k] >= thr[k]).view(np.uint8)
            c = connected_components(m & fov.view(np.uint8))
            for (x, y), area in zip(c.centroids, c.areas):
                dist = None if found.disc is None else float(np.hypot(x - found.disc[0], y - found.disc[1]) / found.disc_diameter)
                comps[les].append({"image": image_id, "disc_distance_dd": dist, "area_px": int(area)})
        no_disc += found.disc is None
    report = {"checkpoint": os.path.realpath(a.checkpoint), "grade0_images": len(healthy), "disc_not_found": no_disc,
              "per_lesion": {}}
    print(f"{len(healthy)} grade-0 validation eyes; disc not found on {no_disc}")
    print("| lesion | components | within 0.75 DD of the disc | within 1.5 DD | area px: median (quartiles) |")
    print("|---|---|---|---|---|")
    for les in LESIONS:
        rows = comps[les]
        d = np.array([r["disc_distance_dd"] for r in rows if r["disc_distance_dd"] is not None])
        areas = np.array([r["area_px"] for r in rows])
        q = np.percentile(areas, [25, 50, 75]) if len(areas) else [np.nan] * 3
        report["per_lesion"][les] = {"components": len(rows), "within_0.75dd": int((d < 0.75).sum()),
                                     "within_1.5dd": int((d < 1.5).sum()), "area_px_quartiles": [float(v) for v in q]}
        print(f"| {les} | {len(rows)} | {int((d < 0.75).sum())} | {int((d < 1.5).sum())} | {q[1]:.0f} ({q[0]:.0f}-{q[2]:.0f}) |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**report, "components": comps}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
