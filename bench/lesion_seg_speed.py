"""Seconds per full-size image for `lesion_seg` inference (prints numbers; asserts nothing).

    .venv/bin/python bench/lesion_seg_speed.py [--image PATH] [--checkpoint CKPT] [--profile cpu] [--repeats 5] [--json FILE]

Runs the same infer task as `/infer/lesion_seg` (read + field of view + resize, Lesion-Net at
the profile's working resolution, restore to the input geometry, label map + statistics, png
written) on one image, default IDRiD_05 from ../shared/data/idrid_train (4288x2848). Without
--checkpoint it times a randomly initialised network saved to a temporary folder: the time
does not depend on the weights, and nothing of it is served.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--image", default=os.path.join(ROOT, "..", "shared", "data", "idrid_train", "images", "IDRiD_05.jpg"))
    p.add_argument("--checkpoint")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--set", help="profile overrides as --conf lesion_seg_set takes them, e.g. inference.tta=flips")
    p.add_argument("--json")
    args = p.parse_args()

    import torch

    from monailabel_dr.cli import make_app
    from monailabel_dr.networks.lesion_net import build_lesion_net

    tmp = tempfile.mkdtemp(prefix="mldr_bench_")
    conf = {"models": "lesion_seg", "lesion_seg_profile": args.profile, "model_dir": tmp, "device": "cpu"}
    if args.checkpoint:
        conf["lesion_seg_checkpoint"] = os.path.realpath(args.checkpoint)
    if args.set:
        conf["lesion_seg_set"] = args.set
    app = make_app(tempfile.mkdtemp(prefix="mldr_bench_store_"), conf)
    task = app._infers["lesion_seg"]
    if not args.checkpoint:
        torch.save({"model": build_lesion_net(task.model.network).state_dict()}, os.path.join(tmp, "lesion_seg.pt"))
    times, lats = [], []
    for _ in range(args.repeats + 1):  # first run warms up
        t = time.time()
        path, result = task({"image": os.path.realpath(args.image)})
        times.append(time.time() - t)
        lats.append(result["latencies"])
        os.remove(path)
    best = 1 + min(range(args.repeats), key=lambda i: times[1 + i])
    lat = lats[best]
    report = {
        "image": os.path.basename(args.image),
        "image_size": result["image_size"],
        "profile": args.profile, "profile_overrides": args.set,
        "working_size": task.model.image_size,
        "seconds_per_image": round(min(times[1:]), 2),
        "median_s": round(float(sorted(times[1:])[len(times[1:]) // 2]), 2),
        "all_runs_s": [round(t, 2) for t in times],
        # MONAI Label's stage timer of the best run: pre = read + field of view + resize (+ landmarks when
        # they are not overlapped), infer = the network, write = restore to the input grid + label map + stats + file
        "breakdown_best_run_s": {"read_fov_resize": lat.get("pre"), "network": lat.get("infer"),
                                 "restore_write": lat.get("write"), "total": lat.get("total")},
        "latencies_best_run": lat,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU used",
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
