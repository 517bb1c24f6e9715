"""Does TWLR's stage-1 grader see lesions at all? Lesion-presence ROC AUC on tiles of the IDRiD validation
images (prints numbers; asserts nothing).

    .venv/bin/python bench/twlr_crop_probe.py --dataset ../shared/data/idrid_train \
        --conf model_dir runs/twlr_idrid --conf profile real [--tile 256]

Each validation image (the trainer's split: ids ending in a multiple of 5) is loaded at the profile's
working size, cut into non-overlapping ``tile`` px tiles (those at least half inside the field of view),
and each tile is graded on its own by the published ``twlr`` checkpoint (the tile size the ``real``
profile trains on). A tile is positive for a lesion when it holds at least ``--min-px`` lesion pixels at
the working size (area-averaged masks). Also prints the lesion probabilities of the whole images,
which is what ``twlr_inpaint`` thresholds at tau. Chance is an AUC of 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=True, help="IDRiD-layout folder")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--min-px", type=float, default=1.0)
    args = p.parse_args()

    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from monailabel_dr import cli
    from monailabel_dr.fundus.lesions import LESIONS
    from monailabel_dr.lib.trainers.lesion_data import idrid_items
    from monailabel_dr.networks.cam_grader import split_outputs
    from monailabel_dr.transforms import LoadFundusd, LoadLesionTargetsd

    task = cli.make_app(cli._tmp_studies(), {"models": "twlr", **dict(args.conf)})._infers["twlr_vlm"]
    net = task.load_network(task.model.serve_path, "cpu").eval()
    size, t = task.model.image_size, args.tile
    tiles, truth, whole = [], [], {}
    for d in (d for d in idrid_items(os.path.realpath(args.dataset)) if d["split"] == "val"):
        x = LoadLesionTargetsd(keys="lesions", masks_key="masks")(LoadFundusd(keys="image", size=size)(dict(d)))
        img, les = x["image"], x["lesions"]
        with torch.no_grad():
            whole[d["id"]] = [round(float(v), 3) for v in split_outputs(net(img[None]))["lesions"][0]]
        for i in range(0, size - t + 1, t):
            for j in range(0, size - t + 1, t):
                if float(les[-1, i:i + t, j:j + t].mean()) >= 0.5:
                    tiles.append(img[:, i:i + t, j:j + t])
                    truth.append((les[:-1, i:i + t, j:j + t].sum((1, 2)) >= args.min_px).numpy())
    x, y = torch.stack(tiles), np.stack(truth)
    # the conv tower takes a crop at the working resolution as it is only in training mode (otherwise it resizes
    # it to image_size): set that module's own flag alone, so batch norm and dropout stay in evaluation mode
    net.clip.visual.training = True
    prob = []
    with torch.no_grad():
        for k in range(0, len(x), 16):
            prob.append(split_outputs(net(x[k:k + 16]))["lesions"].numpy())
    prob = np.concatenate(prob)
    out = {"checkpoint": task.model.serve_path, "profile": task.model.profile_name, "working_size": size, "tile": t,
           "n_tiles": len(x), "positive_fraction": dict(zip(LESIONS, y.mean(0).round(3).tolist())),
           "tile_auc": {les: (round(float(roc_auc_score(y[:, k], prob[:, k])), 3) if 0 < y[:, k].sum() < len(y) else None)
                        for k, les in enumerate(LESIONS)},
           "tile_mean_prob_pos_neg": {les: [round(float(prob[y[:, k], k].mean()), 3) if y[:, k].any() else None,
                                            round(float(prob[~y[:, k], k].mean()), 3) if (~y[:, k]).any() else None]
                                      for k, les in enumerate(LESIONS)},
           "whole_image_lesion_prob": whole}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
