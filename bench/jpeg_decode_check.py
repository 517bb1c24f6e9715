"""Do the served JPEG reads give PIL's pixels on every real photograph here? (prints counts; asserts nothing)

    .venv/bin/python bench/jpeg_decode_check.py [FOLDER ...]

Default folders: ../shared/data/idrid_train/images and ../shared/data/graded_dr/images. For each image, how
io.read_image decoded it (OpenCV for complete 8-bit colour JPEGs, io._decode_complete_jpeg; else PIL) and whether
its pixels equal PIL's own decode.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main() -> int:
    import numpy as np
    from PIL import Image

    from monailabel_dr.fundus import io

    data = Path(ROOT, "..", "shared", "data")
    folders = [Path(f) for f in sys.argv[1:]] or [data / "idrid_train" / "images", data / "graded_dr" / "images"]
    files = [f for d in folders if d.is_dir() for f in sorted(d.iterdir()) if io.file_extension(f) in (".jpg", ".jpeg")]
    opencv = differ = 0
    for f in files:
        with Image.open(f) as im:
            ref = np.asarray(im.convert("RGB")) if im.mode != "L" else np.asarray(im)
            opencv += io._decode_complete_jpeg(f, im) is not None
        if not np.array_equal(io.read_image(f), ref):
            differ += 1
            print("differs from PIL:", f, file=sys.stderr)
    print(json.dumps({"folders": [str(d) for d in folders], "jpeg_files": len(files), "decoded_by_opencv": opencv,
                      "differ_from_pil": differ}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
