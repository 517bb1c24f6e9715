"""Seconds of each full-size step of `lesion_seg`, the straightforward way against the served one (prints numbers;
asserts nothing).

    .venv/bin/python bench/fullsize_steps.py [--image PATH] [--repeats 7] [--json FILE]

On one photograph (default IDRiD_05, 4288x2848), best of ``--repeats``: the JPEG decode (PIL vs io.read_image), the
8-bit -> float conversion (astype / 255 vs io.to_rgb_float), the grey test (two whole-image comparisons vs
io.is_grey), the field-of-view detection (brightness by numpy after re-checking the float image vs
detect_fov(unit_rgb=True)), the restore of four working-size maps to the input grid (the previous restore: a
zero-filled array, each map warped to a box-size array, copied in and multiplied by the FOV, vs restore_channels)
and the label map (one pass over the box vs the served bands). The maps are a randomly initialised `cpu` network's, as bench/lesion_seg_speed.py times by default. Each
pair gives the same values (tests/test_fundus_io.py, tests/test_fullsize_outputs.py).
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


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(min(times), 4)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--image", default=os.path.join(ROOT, "..", "shared", "data", "idrid_train", "images", "IDRiD_05.jpg"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json")
    a = p.parse_args()

    import cv2
    import numpy as np
    import torch
    from PIL import Image

    from monailabel_dr.cli import make_app
    from monailabel_dr.fundus import geometry, io
    from monailabel_dr.lib.infers.base import channel_map, restore_channels
    from monailabel_dr.lib.infers.lesion_seg import label_map_from_probs
    from monailabel_dr.networks.lesion_net import build_lesion_net

    n = a.repeats
    steps = {}

    def pil_decode():
        with Image.open(a.image) as im:
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))

    steps["decode"] = (best(pil_decode, n), best(lambda: io.read_image(a.image), n))
    raw = io.read_image(a.image)
    steps["to_float"] = (best(lambda: raw.astype(np.float32) / 255.0, n), best(lambda: io.to_rgb_float(raw), n))
    steps["is_grey"] = (best(lambda: np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2]), n),
                        best(lambda: io.is_grey(raw), n))
    rgb = io.to_rgb_float(raw)

    def fov_before():   # the float image checked again, then (R + G) * 0.5 by numpy: what detect_fov did
        orig = geometry._brightness
        geometry._brightness = lambda f, unit_rgb=False: (lambda g: (g[..., 0] + g[..., 1]) * np.float32(0.5))(io.to_rgb_float(f))
        try:
            return geometry.detect_fov(rgb)
        finally:
            geometry._brightness = orig

    steps["fov_detection"] = (best(fov_before, n), best(lambda: geometry.detect_fov(rgb, unit_rgb=True), n))

    tmp = tempfile.mkdtemp(prefix="mldr_bench_")
    app = make_app(tempfile.mkdtemp(prefix="mldr_bench_store_"),
                   {"models": "lesion_seg", "lesion_seg_profile": "cpu", "model_dir": tmp, "device": "cpu"})
    task = app._infers["lesion_seg"]
    torch.manual_seed(0)
    torch.save({"model": build_lesion_net(task.model.network).state_dict()}, os.path.join(tmp, "lesion_seg.pt"))
    _, data = task({"image": os.path.realpath(a.image), "skip_writer": True})
    geom = geometry.FundusGeometry.from_dict(data["fundus_geometry"])
    fov = np.asarray(data["fundus_source_fov"], bool)
    work = torch.sigmoid(torch.as_tensor(data["pred"]).float()).numpy() * (np.asarray(data["fov"])[0] > 0.5)[None]
    y0, y1, x0, x1 = geom.bbox

    def restore_before():   # the previous restore: a zero-filled array, each map warped to a box-size array and
        # copied in, the FOV applied by a multiplication, the maps in the channel threads
        out = np.zeros((work.shape[0], geom.height, geom.width), np.float32)

        def one(c):
            crop = cv2.warpAffine(work[c], geom._crop_matrix(), (x1 - x0, y1 - y0),
                                  flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
            out[c, y0:y1, x0:x1] = crop
            out[c, y0:y1, x0:x1] *= fov[y0:y1, x0:x1]

        channel_map(one, range(work.shape[0]))
        return out

    steps["restore_4_maps"] = (best(restore_before, n), best(lambda: restore_channels(work, geom, fov), n))
    probs = restore_channels(work, geom, fov)
    same_restore = bool(np.array_equal(probs, restore_before()))
    thr = [0.5] * 4

    def label_before():
        lab = np.zeros(probs.shape[1:], np.uint8)
        lab[y0:y1, x0:x1] = label_map_from_probs(probs[:, y0:y1, x0:x1], thr)
        return lab

    steps["label_map"] = (best(label_before, n), best(lambda: label_map_from_probs(probs, thr, geom.bbox), n))
    report = {
        "image": os.path.basename(a.image), "image_size": list(raw.shape[:2]), "repeats": n,
        "seconds_best": {k: {"straightforward": v[0], "served": v[1]} for k, v in steps.items()},
        "labelled_fraction": round(float((label_before() > 0).mean()), 3),
        "identical": {"restore_4_maps": same_restore,
                      "label_map": bool(np.array_equal(label_before(), label_map_from_probs(probs, thr, geom.bbox)))},
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU used",
    }
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
