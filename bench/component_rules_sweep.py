"""The served `lesion_seg`'s component rules, swept: a minimum component peak (`inference.min_peak`,
hysteresis) and a minimum component area (`inference.min_area_ppm`, parts per million of the field of
view), each alone: what they cost on lesions and what they remove on healthy eyes. Prints numbers;
asserts nothing.

    .venv/bin/python bench/component_rules_sweep.py --checkpoint runs/X/lesion_seg.pt --profile cpu_negatives \
        --peaks 0.6,0.7,0.8,0.9 --areas 1,2,3,5,10 --json sweep.json

Each photograph goes once through the served inference path (`task.predict`, as `/infer/lesion_seg`);
for every rule the served masks (`lib/infers/lesion_seg.py served_masks`, at the thresholds the task
serves) are then scored:

- IDRiD validation split (`--dataset`, ids ending in 0 or 5): pooled Dice per lesion inside the field
  of view, as `evaluate lesion_seg` reports it for the served masks;
- grade-0 photographs of the graded_dr validation patients (`--graded`): the fraction with any lesion
  component, components per eye, predicted area as a fraction of the field of view.

The rule: for each kind, the largest value whose IDRiD mean Dice is within `--tolerance` of no rule; it
reads the IDRiD columns alone, the healthy-eye columns never choose.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from healthy_eyes import GRADED, ROOT, add_task_args, grade0_images, lesion_task  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_task_args(p)
    p.add_argument("--dataset", default="idrid:" + os.path.join(ROOT, "..", "shared", "data", "idrid_train"))
    p.add_argument("--graded", default=GRADED)
    p.add_argument("--peaks", default="0.6,0.7,0.8,0.9", help="minimum peaks to try (each with no area rule)")
    p.add_argument("--areas", default="1,2,3,5,10", help="minimum areas to try, ppm of the FOV (each with no peak rule)")
    p.add_argument("--tolerance", type=float, default=0.01, help="mean Dice the rule may give up on IDRiD validation")
    p.add_argument("--json")
    a = p.parse_args()

    from monailabel_dr.fundus.components import connected_components
    from monailabel_dr.fundus.idrid import idrid_image_path, idrid_masks
    from monailabel_dr.fundus.lesions import LESIONS
    from monailabel_dr.lib.evaluation import idrid_ids
    from monailabel_dr.lib.infers.lesion_seg import min_area_px, served_masks
    from monailabel_dr.metrics.regression import WeakMaskAccumulator

    rules = [("off", 0.0, 0.0)] + [("min_peak", float(x), 0.0) for x in a.peaks.split(",") if x.strip()] \
        + [("min_area_ppm", 0.0, float(x)) for x in a.areas.split(",") if x.strip()]
    names = [f"{kind} {pk if kind == 'min_peak' else ar:g}" if kind != "off" else "off" for kind, pk, ar in rules]
    task = lesion_task(a)
    thr, source = task.thresholds()
    t0 = time.time()

    def masks_at(probs, fov, rule):
        _, peak, ppm = rule
        m = served_masks(probs, thr, peak, min_area_px(ppm, int(np.count_nonzero(fov))) if ppm else 0)
        return m if m is not None else [(probs[i] >= thr[i]).astype(np.uint8) for i in range(len(LESIONS))]

    folder, ids = idrid_ids(a.dataset, "val")
    acc = {n: WeakMaskAccumulator(LESIONS) for n in names}
    for image_id in ids:
        probs, fov = task.predict(idrid_image_path(folder, image_id))
        truth = idrid_masks(folder, image_id, shape=fov.shape)
        for n, rule in zip(names, rules):
            m = masks_at(probs, fov, rule)
            acc[n].update({les: m[i] for i, les in enumerate(LESIONS)}, truth, fov)
    idrid = {}
    for n in names:
        c = acc[n].compute()
        idrid[n] = {les: c[les]["dice"] for les in LESIONS}
        idrid[n]["mean"] = float(np.mean([c[les]["dice"] for les in LESIONS]))

    healthy = grade0_images(a.graded)
    rows = {n: [] for n in names}
    for _, path in healthy:
        probs, fov = task.predict(path)
        area = float(fov.sum())
        for n, rule in zip(names, rules):
            m = masks_at(probs, fov, rule)
            comps = [connected_components(m[i] & fov.view(np.uint8)).n for i in range(len(LESIONS))]
            rows[n].append({"components": dict(zip(LESIONS, comps)),
                             "area_fraction": float(sum(int((m[i] & fov.view(np.uint8)).sum()) for i in range(len(LESIONS))) / area)})
    g0 = {n: {"images_with_any_component": float(np.mean([sum(r["components"].values()) > 0 for r in rows[n]])),
              "components_per_eye": {les: float(np.mean([r["components"][les] for r in rows[n]])) for les in LESIONS},
              "mean_area_fraction_of_fov": float(np.mean([r["area_fraction"] for r in rows[n]]))} for n in names}

    base = idrid["off"]["mean"]
    chosen = {}
    for kind in ("min_peak", "min_area_ppm"):
        ok = [(pk if kind == "min_peak" else ar) for (k, pk, ar), n in zip(rules, names)
              if k == kind and idrid[n]["mean"] >= base - a.tolerance]
        chosen[kind] = max(ok) if ok else None
    report = {"checkpoint": os.path.realpath(a.checkpoint), "profile": a.profile, "set": a.set,
              "thresholds": dict(zip(LESIONS, thr)), "threshold_source": source,
              "idrid_val_images": len(ids), "grade0_val_images": len(healthy),
              "idrid_val_dice": idrid, "grade0": g0,
              "rule": f"for each kind, the largest value with IDRiD validation mean Dice >= {base:.4f} - {a.tolerance}",
              "rule_picks": chosen,
              "seconds": round(time.time() - t0, 1)}
    print("| rule | IDRiD val Dice MA / HE / EX / SE | mean | grade-0 eyes with any component | "
          "components per eye MA / HE / EX / SE | area, % of FOV |")
    print("|---|---|---|---|---|---|")
    for n in names:
        d, g = idrid[n], g0[n]
        print(f"| {n} | " + " / ".join(f"{d[les]:.3f}" for les in LESIONS) + f" | {d['mean']:.3f} | "
              f"{100 * g['images_with_any_component']:.0f} % | "
              + " / ".join(f"{g['components_per_eye'][les]:.2f}" for les in LESIONS)
              + f" | {100 * g['mean_area_fraction_of_fov']:.3f} % |")
    print(f"rule: {report['rule']} -> {chosen}; {report['seconds']} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
