"""Seconds per image: vanilla SAM vs `lesion_sam` (TP-DRSeg) fast and faithful modes (prints numbers; asserts nothing).

    .venv/bin/python bench/sam_speed.py [--profile paper|small|tiny] [--repeats 3] [--device cpu|cuda] [--json FILE]

Same SAM size and input size for all three, in one run:

- ``vanilla``: ``segment_anything.SamPredictor`` with a SAM built exactly as the profile's
  (image encoder, prompt encoder, mask decoder): ``set_image`` (encoder) + ``predict`` with one
  point (decoder), on an S x S uint8 image (S = the profile's working size, so nothing is resized).
  When the profile is tiled (working size larger than SAM's input, e.g. ``small``: 1024 px image,
  256 px SAM), vanilla SAM runs over the very same tiles (MONAI ``sliding_window_inference``, the
  profile's ``tile_overlap``, Gaussian blending, one point at each tile's centre), so the ratio
  compares like with like; the per-tile times are reported too;
- ``fast``: TP-DRSeg, all four lesions in one call, one encoder pass (CLIP prior + SAM with
  injectors) then prompt generator + decoder per lesion;
- ``faithful``: the same four lesions, one encoder pass per lesion (the paper).

Lesion text embeddings are constant at inference and cached after the warm-up call, as in the
server. Weights do not change the time, so no weights are loaded (the ``paper`` architecture, SAM
ViT-B at 1024 and CLIP ViT-B/16, is built without them). The target of the issue: ``fast_ratio``
(fast / vanilla) <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up (allocations, text-embedding cache, cudnn autotune)
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", default="small", help="a profile of configs/lesion_sam.yaml (paper, small, tiny)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--json")
    args = p.parse_args()

    import numpy as np
    import torch
    import yaml
    from segment_anything import SamPredictor

    from monailabel_dr.config import CONFIG_DIR
    from monailabel_dr.networks.tp_drseg import build_tp_drseg

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with open(CONFIG_DIR / "lesion_sam.yaml") as f:
        profile = yaml.safe_load(f)["profiles"][args.profile]
    size = int(profile["image_size"])

    model = build_tp_drseg(profile["network"], load_weights=False, image_size=size).to(device).eval()
    rng = np.random.default_rng(0)
    image_u8 = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = torch.from_numpy(image_u8).permute(2, 0, 1)[None].float().div(255).to(device)

    # vanilla: SAM's own predictor around a SAM of the same configuration (TP-DRSeg's SAM, unchanged modules)
    predictor = SamPredictor(model.sam)
    point = np.array([[size / 2, size / 2]], dtype=np.float32)

    def vanilla_one(img_u8):
        predictor.set_image(img_u8)
        masks, _, _ = predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=False)
        return masks

    tile = int(model.config.sam.img_size)
    tiled = size > tile
    if tiled:
        from monai.inferers import sliding_window_inference

        point = np.array([[tile / 2, tile / 2]], dtype=np.float32)
        tile_u8 = image_u8[:tile, :tile].copy()

        def vanilla_window(window):
            # one tile as SamPredictor takes it (H x W x 3 uint8, already SAM's size: nothing resized)
            img = (window[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
            return torch.from_numpy(vanilla_one(img).astype(np.float32))[None].to(window.device)

        def vanilla():
            sliding_window_inference(image, tile, sw_batch_size=1, predictor=vanilla_window,
                                     overlap=model.config.tile_overlap, mode="gaussian")
    else:
        def vanilla():
            vanilla_one(image_u8)

    def run(mode):
        def f():
            model(image, lesions=[0, 1, 2, 3], mode=mode)
        return f

    with torch.inference_mode():
        vanilla_s = _timed(vanilla, args.repeats, sync)
        fast_s = _timed(run("fast"), args.repeats, sync)
        faithful_s = _timed(run("faithful"), args.repeats, sync)
        if tiled:
            vanilla_tile_s = _timed(lambda: vanilla_one(tile_u8), args.repeats, sync)
            tile_image = image[..., :tile, :tile]
            fast_tile_s = _timed(lambda: model(tile_image, lesions=[0, 1, 2, 3], mode="fast"), args.repeats, sync)

    cfg = profile["network"]
    out = {
        "profile": args.profile,
        "image_size": size,
        "sam": {k: cfg["sam"].get(k) for k in ("variant", "embed_dim", "depth", "num_heads", "patch_size")},
        "clip": cfg["clip"].get("model_name") if not cfg["clip"].get("custom") else "custom",
        "lesions": 4,
        "tiled": tiled,
        "vanilla_s": round(vanilla_s, 4),
        "fast_s": round(fast_s, 4),
        "faithful_s": round(faithful_s, 4),
        "fast_ratio": round(fast_s / vanilla_s, 3),
        "faithful_ratio": round(faithful_s / vanilla_s, 3),
        "target_fast_ratio": 1.3,
        "repeats": args.repeats,
        "statistic": "median",
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(0),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    if tiled:
        from monai.data.utils import dense_patch_slices, get_valid_patch_size

        roi = get_valid_patch_size((size, size), (tile, tile))
        interval = [max(int(r * (1 - model.config.tile_overlap)), 1) for r in roi]
        out.update({
            "tile_size": tile,
            "tile_overlap": model.config.tile_overlap,
            "tiles": len(dense_patch_slices((size, size), roi, interval)),
            "vanilla_tile_s": round(vanilla_tile_s, 4),
            "fast_tile_s": round(fast_tile_s, 4),
            "fast_tile_ratio": round(fast_tile_s / vanilla_tile_s, 3),
        })
        print(f"{out['tiles']} tiles of {tile} px: one tile vanilla {vanilla_tile_s:.4f} s, "
              f"lesion_sam fast (4 lesions) {fast_tile_s:.4f} s = {out['fast_tile_ratio']:.2f}x")
    print(f"{args.profile} profile, {size}x{size}, {out['device']}: vanilla SAM {vanilla_s:.3f} s, "
          f"lesion_sam fast (4 lesions) {fast_s:.3f} s = {out['fast_ratio']:.2f}x, "
          f"faithful {faithful_s:.3f} s = {out['faithful_ratio']:.2f}x")
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
