"""Where a Lesion-Net checkpoint puts each lesion, at the working resolution (diagnostics).

For each image of an IDRiD-layout folder: per lesion the target pixels, the predicted pixels
(probability >= 0.5) and the mean probability on the target; for MA the highest probability
inside each annotated microaneurysm (quantiles over the MAs) and how far the predicted MA
pixels lie from the field-of-view edge; and how many MA pixels the trainer's lesion-centred
crops contain. Same transforms as the trainer (LoadFundusd, LoadLesionTargetsd,
NormalizeIntensityd, RandCropByLabelClassesd). Prints JSON; no asserts.

    .venv/bin/python bench/lesion_seg_diagnose.py --checkpoint runs/lesion_cpu3/lesion_seg.pt \\
        --dataset ../shared/data/idrid_train IDRiD_05 IDRiD_20 IDRiD_01 IDRiD_03
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import yaml
from monai.transforms import ClassesToIndicesd, NormalizeIntensityd, RandCropByLabelClassesd
from scipy import ndimage

from monailabel_dr.config import CONFIG_DIR
from monailabel_dr.fundus import idrid
from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.networks.lesion_net import build_lesion_net
from monailabel_dr.transforms import LoadFundusd, LoadLesionTargetsd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dataset", required=True, help="folder in the IDRiD layout")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("ids", nargs="+")
    args = ap.parse_args()
    prof = yaml.safe_load((CONFIG_DIR / "lesion_seg.yaml").read_text())["profiles"][args.profile]
    net = build_lesion_net(prof["network"])
    net.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    net.eval()
    t = prof["train"]
    crop = RandCropByLabelClassesd(
        keys=["image", "label"], label_key="label", spatial_size=(t["patch_size"],) * 2, ratios=t["class_ratios"],
        num_classes=len(LESIONS) + 1, num_samples=20, indices_key="label_cls_indices", allow_smaller=True)
    crop.set_random_state(0)
    out = {}
    for image_id in args.ids:
        d = {"image": idrid.idrid_image_path(args.dataset, image_id),
             "masks": {les: p for les in LESIONS if (p := idrid.idrid_mask_path(args.dataset, image_id, les))}}
        d = LoadFundusd("image", prof["image_size"])(d)
        d = NormalizeIntensityd("image")(LoadLesionTargetsd("label")(d))
        with torch.no_grad():
            prob = torch.sigmoid(net(d["image"][None]))[0].numpy()
        target = d["label"].numpy()
        fov = target[-1] > 0
        rec = {}
        for i, les in enumerate(LESIONS):
            pos = target[i] > 0
            rec[les] = {"target_px": int(pos.sum()), "predicted_px": int((prob[i] >= 0.5).sum()),
                        "mean_prob_on_target": round(float(prob[i][pos].mean()), 4) if pos.any() else None}
        lab, n = ndimage.label(target[0] > 0)
        if n:
            peak = ndimage.maximum(prob[0], lab, index=np.arange(1, n + 1))
            rec["MA"]["components"] = int(n)
            rec["MA"]["max_prob_per_component_q10_q50_q90"] = [round(float(q), 4) for q in np.quantile(peak, [.1, .5, .9])]
        pm = (prob[0] >= 0.5) & fov
        if pm.any():
            rec["MA"]["predicted_px_median_distance_to_fov_edge"] = float(np.median(ndimage.distance_transform_edt(fov)[pm]))
        samples = crop(ClassesToIndicesd(keys="label", num_classes=len(LESIONS) + 1)(d))
        rec["MA"]["target_px_per_training_crop_median"] = float(np.median([float((c["label"][0] > 0).sum()) for c in samples]))
        out[image_id] = rec
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
