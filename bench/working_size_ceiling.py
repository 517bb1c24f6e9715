"""What a working resolution alone costs: the lesion targets a trainer learns at that size, restored to full
resolution the way the served maps are, scored like a prediction. Prints numbers; asserts nothing.

    .venv/bin/python bench/working_size_ceiling.py --dataset idrid:../shared/data/idrid_train --split val --size 1024

For each image the trainer's targets (``LoadLesionTargetsd``: the full-size masks area-averaged into the
``--size`` px working image of the field of view) are restored to the photograph's grid with the served
restore (``probabilities_at_input``: bilinear, zero outside the field of view) and accumulated with the same
metrics as ``evaluate lesion_seg`` (pooled pixels inside the field of view). A network that reproduced its
targets exactly at that size would score these figures: the ceiling of the working resolution, before any
learning.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="idrid:<folder> (the IDRiD layout)")
    p.add_argument("--split", default="val", choices=["val", "train", "all"])
    p.add_argument("--size", type=int, default=1024, help="working resolution of the field of view (px)")
    p.add_argument("--json")
    a = p.parse_args()

    from monailabel_dr.fundus.idrid import idrid_image_path, idrid_mask_path, idrid_masks
    from monailabel_dr.fundus.lesions import LESIONS
    from monailabel_dr.lib.evaluation import idrid_ids
    from monailabel_dr.lib.infers.base import probabilities_at_input
    from monailabel_dr.metrics.lesions import LesionSegAccumulator
    from monailabel_dr.transforms import LoadFundusd, LoadLesionTargetsd

    folder, ids = idrid_ids(a.dataset, a.split)
    load = LoadFundusd(keys="image", size=a.size, keep_source_fov=True)
    targets = LoadLesionTargetsd(keys="label")
    acc = LesionSegAccumulator()
    t0 = time.time()
    for image_id in ids:
        d = load({"image": idrid_image_path(folder, image_id)})
        d["masks"] = {les: idrid_mask_path(folder, image_id, les) for les in LESIONS}
        d = targets(d)
        cover = d["label"][: len(LESIONS)].clamp(0, 1)
        # the served restore takes logits: the coverage's logit gives back the coverage exactly after the sigmoid
        d["pred"] = torch.logit(cover.double(), eps=1e-12).float()
        probs, fov, _ = probabilities_at_input(d)
        truth = idrid_masks(folder, image_id, shape=fov.shape)
        acc.update(image_id, {les: probs[i] for i, les in enumerate(LESIONS)}, truth, fov)
    report = {"data": {"dataset": a.dataset, "split": a.split, "images": len(ids)}, "working_size": a.size,
              "segmentation": acc.compute(n_boot=0), "seconds": round(time.time() - t0, 1)}
    print(f"working size {a.size} px: targets restored to full resolution, {len(ids)} images ({a.split})")
    seg = report["segmentation"]
    print("lesion  dice_pooled@0.5  auc_pr")
    for les in (*LESIONS, "mean"):
        print(f"{les:6s}  {seg[les]['dice_pooled']:.3f}            {seg[les]['auc_pr']:.3f}")
    print(f"{report['seconds']} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
