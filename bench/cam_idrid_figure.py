"""One real IDRiD photograph with the grader's CAM, its region proposals and the true lesions.

    .venv/bin/python bench/cam_idrid_figure.py --checkpoint runs/grading_real/grading.pt \
        --image IDRiD_05 --out docs/cam_idrid05.png

The CAM and the proposals come from the served ``/infer/cam`` pipeline (``CAMInfer.predict``, the same code
as the server and ``evaluate cam``); the profile is read from the checkpoint. Left: the photograph with the
true lesion outlines (MA red, HE green, EX yellow, SE blue). Right: the min-max normalised CAM (referable-DR
target) over the photograph, proposals (CAM >= 0.65) as white boxes with their score rank.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a grading checkpoint (its profile is read from it)")
    ap.add_argument("--dataset", default=os.path.join(ROOT, "..", "shared", "data", "idrid_train"))
    ap.add_argument("--image", default="IDRiD_05")
    ap.add_argument("--target", default="referable")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "cam_idrid05.png"))
    args = ap.parse_args()

    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monailabel_dr.cli import _grading_app
    from monailabel_dr.fundus import io as fio
    from monailabel_dr.fundus.idrid import idrid_image_path, idrid_masks
    from monailabel_dr.fundus.lesions import LESION_COLORS, LESIONS

    ns = argparse.Namespace(checkpoint=args.checkpoint, conf=None, device="cpu", studies=None)
    app, record = _grading_app(ns)
    task = app._infers["cam"]
    path = idrid_image_path(args.dataset, args.image)
    cam, answer, fov = task.predict(path, target=args.target)
    rgb = fio.to_rgb_float(fio.read_image(path))
    masks = idrid_masks(args.dataset, args.image, cam.shape)

    scale = 1024 / max(rgb.shape[:2])   # draw at ~1024 px
    size = (int(rgb.shape[1] * scale), int(rgb.shape[0] * scale))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    outlined = (small * 255).astype(np.uint8).copy()
    for les in LESIONS:
        m = cv2.resize(masks[les].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outlined, contours, -1, LESION_COLORS[les], 1)
    cam_small = cv2.resize(cam, size, interpolation=cv2.INTER_LINEAR)

    fig, axes = plt.subplots(1, 2, figsize=(14, 5), dpi=110)
    axes[0].imshow(outlined)
    axes[0].set_title(f"{args.image}: true lesions (MA red, HE green, EX yellow, SE blue)", fontsize=9)
    axes[1].imshow(small)
    axes[1].imshow(np.ma.masked_where(cam_small < 0.2, cam_small), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    for les in LESIONS:
        m = cv2.resize(masks[les].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        axes[1].contour(m, levels=[0.5], colors=[np.array(LESION_COLORS[les]) / 255.0], linewidths=0.5)
    for r in answer["regions"][:15]:
        x0, y0, x1, y1 = (v * scale for v in r["bbox"])
        axes[1].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.0))
        axes[1].text(x0, y0 - 3, str(r["id"]), color="white", fontsize=7)
    p = answer["target_probability"]
    axes[1].set_title(f"CAM ({answer['target']}, p = {p:.2f}, grade {answer['grade']}), {len(answer['regions'])} "
                      f"proposals >= {answer['threshold']}; profile {record['name'] if record else '?'}", fontsize=9)
    for a in axes:
        a.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}: {len(answer['regions'])} proposals, target probability {p:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
