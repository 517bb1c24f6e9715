"""Accuracy of the optic disc / fovea detector (monailabel_dr.fundus.landmarks).

* IDRiD (a folder in the IDRiD layout with masks/OD): disc centre error against the
  centroid of the optic-disc mask, in pixels and in disc diameters (equivalent diameter
  of the mask); "hit" = the detected centre lies inside the disc mask.
* Phantoms: disc and fovea centre errors against the generator's positions.

Prints a table and a JSON summary; no asserts (tests/test_landmarks.py has the checks).

    .venv/bin/python bench/landmarks_check.py --idrid ../shared/data/idrid_train --phantoms 100
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from monailabel_dr.fundus import geometry, idrid, io
from monailabel_dr.fundus.landmarks import detect_landmarks
from monailabel_dr.fundus.phantoms import make_phantom


def check_idrid(folder: str) -> dict:
    rows = []
    for image_id in idrid.list_idrid(folder):
        path = idrid.idrid_mask_path(folder, image_id, "OD")
        if path is None:
            continue
        img = io.read_image(idrid.idrid_image_path(folder, image_id))
        od = io.read_label(path) > 0
        t0 = time.perf_counter()
        fov = geometry.detect_fov(img)
        lm = detect_landmarks(img, fov)
        dt = time.perf_counter() - t0
        ys, xs = np.nonzero(od)
        cx, cy = xs.mean(), ys.mean()
        dd = 2.0 * np.sqrt(od.sum() / np.pi)
        if lm.disc is None:
            rows.append({"id": image_id, "found": False, "seconds": dt})
        else:
            x, y = lm.disc
            err = float(np.hypot(x - cx, y - cy))
            hit = bool(od[int(round(y)), int(round(x))])
            rows.append({"id": image_id, "found": True, "error_px": err, "error_dd": err / dd, "hit": hit,
                         "fovea_found": lm.fovea is not None, "seconds": dt})
        rows[-1]["disc_score"] = lm.disc_score
        r = rows[-1]
        print(f"{image_id}: found={r['found']} err={r.get('error_px', float('nan')):.0f}px "
              f"({r.get('error_dd', float('nan')):.2f} DD) hit={r.get('hit')} fovea={r.get('fovea_found')} {dt:.2f}s")
    found = [r for r in rows if r["found"]]
    errs = np.array([r["error_dd"] for r in found]) if found else np.array([np.nan])
    return {
        "images": len(rows),
        "disc_found": len(found),
        "disc_inside_od_mask": sum(r["hit"] for r in found),
        "disc_error_dd_median": float(np.median(errs)),
        "disc_error_dd_max": float(np.max(errs)),
        "fovea_found": sum(r.get("fovea_found", False) for r in rows),
        "disc_score_min": float(min(r["disc_score"] for r in rows)),
        "disc_score_max": float(max(r["disc_score"] for r in rows)),
        "seconds_per_image": float(np.mean([r["seconds"] for r in rows])),
    }


def check_phantoms(n: int, start: int) -> dict:
    d_err, f_err, d_found, f_found = [], [], 0, 0
    for seed in range(start, start + n):
        ph = make_phantom(seed)
        fnd = ph.info
        img = ph.image
        lm = detect_landmarks(img, geometry.detect_fov(img))
        dd = float(fnd["disc_diameter"])
        if lm.disc is not None:
            d_found += 1
            d_err.append(np.hypot(lm.disc[0] - fnd["disc_center"][0], lm.disc[1] - fnd["disc_center"][1]) / dd)
        if lm.fovea is not None:
            f_found += 1
            f_err.append(np.hypot(lm.fovea[0] - fnd["fovea_center"][0], lm.fovea[1] - fnd["fovea_center"][1]) / dd)
    d_err, f_err = np.array(d_err or [np.nan]), np.array(f_err or [np.nan])
    return {
        "phantoms": n,
        "disc_found": d_found,
        "disc_within_half_dd": int((d_err < 0.5).sum()),
        "disc_error_dd_median": float(np.median(d_err)),
        "fovea_found": f_found,
        "fovea_within_one_dd": int((f_err < 1.0).sum()),
        "fovea_error_dd_median": float(np.median(f_err)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idrid", help="folder in the IDRiD layout with masks/OD")
    ap.add_argument("--phantoms", type=int, default=0, help="number of phantoms to check")
    ap.add_argument("--seed-start", type=int, default=2_000_000)
    args = ap.parse_args()
    out = {}
    if args.idrid:
        out["idrid"] = check_idrid(args.idrid)
    if args.phantoms:
        out["phantoms"] = check_phantoms(args.phantoms, args.seed_start)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
