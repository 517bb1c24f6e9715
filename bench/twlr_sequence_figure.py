"""Picture of TWLR's disease-to-healthy sequence on one photograph (prints what it drew; asserts nothing).

    .venv/bin/python bench/twlr_sequence_figure.py --image ../shared/data/idrid_train/images/IDRiD_05.jpg \
        --conf model_dir runs/twlr_small --out docs/twlr_sequence_idrid05.png [--params '{"t_max": 8}']

Runs the ``twlr_inpaint`` infer task (the same code as ``/infer/twlr_inpaint``) and draws, left to
right, every step's working image with its predicted grade and grade probability, then the input
with the union of the weak masks outlined (MA red, HE green, EX yellow, SE blue); below each step,
the region newly inpainted at that step. With ``--masks FOLDER`` (IDRiD layout) the true lesion
outlines are drawn on the last panel too (white).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

COLOURS = {1: (255, 64, 64), 2: (64, 255, 64), 3: (255, 255, 0), 4: (80, 160, 255)}   # RGB per label value


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    p.add_argument("--params", default="{}")
    p.add_argument("--panel", type=int, default=256, help="panel side in pixels")
    p.add_argument("--masks", help="IDRiD-layout folder whose masks/<LES>/<ID>_<LES>.png outline the truth")
    args = p.parse_args()

    import cv2
    import numpy as np

    from monailabel_dr import cli
    from monailabel_dr.fundus import geometry
    from monailabel_dr.fundus.lesions import GRADES, LESIONS

    conf = {"models": "twlr", **dict(args.conf)}
    task = cli.make_app(cli._tmp_studies(), conf)._infers["twlr_inpaint"]
    full, reg = task.regress(os.path.realpath(args.image), **json.loads(args.params))
    n = args.panel

    def panel(img: np.ndarray) -> np.ndarray:
        return cv2.resize(img, (n, n), interpolation=cv2.INTER_AREA)

    def caption(img: np.ndarray, text: str) -> np.ndarray:
        out = img.copy()
        cv2.rectangle(out, (0, 0), (n, 22), (0, 0, 0), -1)
        cv2.putText(out, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        return out

    top, bottom = [], []
    for k, (im, st) in enumerate(zip(reg.images, reg.steps)):
        p_g = st.grade_probabilities[st.grade]
        top.append(caption(panel(im), f"step {k}: {GRADES[st.grade]} ({p_g:.2f})"))
        m = np.zeros((*reg.images[0].shape[:2], 3), np.uint8)
        if k:
            for v, c in COLOURS.items():
                m[reg.masks[k - 1] == v] = c
        bottom.append(caption(panel(m), "input" if k == 0 else f"removed at step {k}"))
    # the weak masks on the input, at working resolution
    weak = np.zeros(reg.weak.shape[1:], np.uint8)
    for k in range(len(LESIONS) - 1, -1, -1):
        weak[reg.weak[k]] = k + 1
    over = reg.images[0].copy()
    for v, c in COLOURS.items():
        cnts, _ = cv2.findContours((weak == v).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(over, cnts, -1, c, 1)
    title = "weak masks"
    if args.masks:
        from monailabel_dr.fundus.idrid import idrid_masks

        image_id = os.path.splitext(os.path.basename(args.image))[0]
        geom = full["geometry"]
        truth = idrid_masks(args.masks, image_id, shape=full["fov"].shape)
        for les in LESIONS:
            t = geometry.to_working(truth[les].astype(np.uint8), geom, interpolation="nearest")
            cnts, _ = cv2.findContours((t > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(over, cnts, -1, (255, 255, 255), 1)
        title = "weak masks (colour), truth (white)"
    top.append(caption(panel(over), title))
    legend = np.zeros((n, n, 3), np.uint8)
    for i, (les, v) in enumerate(zip(LESIONS, COLOURS)):
        cv2.putText(legend, les, (10, 40 + 30 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.7, COLOURS[v], 2, cv2.LINE_AA)
    cv2.putText(legend, f"stop: {reg.stop_reason}", (10, 40 + 30 * 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (255, 255, 255), 1, cv2.LINE_AA)
    bottom.append(legend)
    fig = np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    cv2.imwrite(args.out, cv2.cvtColor(fig, cv2.COLOR_RGB2BGR))
    print(json.dumps({"out": args.out, "grades": [s.grade for s in reg.steps], "stop_reason": reg.stop_reason,
                      "steps": len(reg.steps) - 1, "model": task.model_json(),
                      "weak_area_px_input": {les: int((full["weak_label"] == k + 1).sum()) for k, les in enumerate(LESIONS)}},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
