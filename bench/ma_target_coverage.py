"""How much of each IDRiD microaneurysm survives area-averaged downsizing to a working size.

    .venv/bin/python bench/ma_target_coverage.py --dataset ../shared/data/idrid_train --size 1024 [--n 12]

For the first N MA masks: every MA component's full-size area, and the peak coverage of the
area-averaged (cv2.INTER_AREA) mask near its centroid after resizing the whole photograph so its
height is SIZE (close to the trainer's field-of-view crop, whose side is about the image height).
A peak below 0.5 would mean the trainer's soft targets cannot make that MA a confident positive.
"""
from __future__ import annotations

import argparse
import glob
import os

import cv2
import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="IDRiD-layout folder (masks/MA/*.png or .tif)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--n", type=int, default=12)
    args = ap.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.dataset, "masks", "MA", "*")))[: args.n]
    peaks, areas = [], []
    for f in files:
        m = (cv2.imread(f, cv2.IMREAD_GRAYSCALE) > 0).astype(np.float32)
        h, w = m.shape
        s = args.size / h
        small = cv2.resize(m, (int(round(w * s)), args.size), interpolation=cv2.INTER_AREA)
        n, _, stats, cents = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        for i in range(1, n):
            areas.append(int(stats[i, cv2.CC_STAT_AREA]))
            x, y = int(cents[i, 0] * s), int(cents[i, 1] * s)
            peaks.append(float(small[max(0, y - 2):y + 3, max(0, x - 2):x + 3].max()))
    peaks, areas = np.array(peaks), np.array(areas)
    print(f"{len(files)} MA masks, {len(peaks)} microaneurysms; full-size area median {np.median(areas):.0f} px")
    print(f"at {args.size} px: peak coverage median {np.median(peaks):.2f}, below 0.5: {(peaks < 0.5).sum()} "
          f"({(peaks < 0.5).mean():.1%})")


if __name__ == "__main__":
    main()
