"""Seconds per label-map save of a full-size photograph's annotation (prints numbers; asserts nothing).

    .venv/bin/python bench/label_save_speed.py [--image-id IDRiD_05] [--repeats 5] [--json FILE]

What `PUT /datastore/label` does with a 3D Slicer "Submit Label" of a 4288x2848 IDRiD photograph,
timed in the datastore (``FundusDatastore.save_label``: read the upload, place it on the image grid,
translate Slicer's segment numbers to lesion values, check the values, write the normalised map,
index it), without HTTP. The label map is the image's IDRiD masks (MA 1, HE 2, EX 3, SE 4), uploaded
as .nrrd with 3D Slicer's segment fields (the app's writer) and as an int16 .nii.gz (Slicer's label type)
with a ``label_info`` list; each saved map is read back and compared with the upload.
The datastore is a temporary folder holding a link to the one photograph.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
IDRID = os.path.join(ROOT, "..", "shared", "data", "idrid_train")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--idrid", default=IDRID, help="a folder in the IDRiD layout (images/, masks/<LES>/)")
    p.add_argument("--image-id", default="IDRiD_05")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()

    import numpy as np
    import SimpleITK as sitk

    from monailabel_dr.fundus import io
    from monailabel_dr.fundus.lesions import LESIONS, label_map_from_masks
    from monailabel_dr.lib.datastore import FundusDatastore

    image = os.path.join(a.idrid, "images", f"{a.image_id}.jpg")
    if not os.path.isfile(image):
        print(f"no {image}: give --idrid <folder in the IDRiD layout>", file=sys.stderr)
        return 2
    masks = {}
    for les in LESIONS:
        for ext in (".tif", ".png"):
            m = os.path.join(a.idrid, "masks", les, f"{a.image_id}_{les}{ext}")
            if os.path.isfile(m):
                masks[les] = io.read_label(m) > 0
                break
    shape = io.read_image(image).shape[:2]
    label = label_map_from_masks(masks, shape=shape).astype(np.int16)
    label_info = {"label_info": [{"name": les, "idx": i + 1} for i, les in enumerate(LESIONS)]}
    out: dict = {"image": a.image_id, "shape": list(shape), "values": io.label_values(label).tolist(),
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "seconds": {}}
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        os.makedirs(store)
        os.symlink(os.path.abspath(image), os.path.join(store, f"{a.image_id}.jpg"))
        ds = FundusDatastore(store)
        uploads = {".nrrd": os.path.join(d, "upload.nrrd"), ".nii.gz": os.path.join(d, "upload.nii.gz")}
        # .nrrd with Slicer's segment fields (the value -> name map the datastore translates by), by the app's writer
        io.write_label(uploads[".nrrd"], label)
        # .nii.gz as Slicer's int16 (W, H, 1) with identity geometry
        sitk.WriteImage(sitk.GetImageFromArray(label[None]), uploads[".nii.gz"], True)
        for ext, path in uploads.items():
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                ds.save_label(a.image_id, path, "final", dict(label_info))
                times.append(time.perf_counter() - t)
            out["seconds"][ext] = {"median": round(statistics.median(times), 3), "best": round(min(times), 3)}
            saved = io.read_label(os.path.join(store, "labels", "final", f"{a.image_id}{ext}"))
            out.setdefault("saved_equals_upload", {})[ext] = bool(np.array_equal(saved, label))
    text = json.dumps(out, indent=2)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(text)
    return 0 if all(out["saved_equals_upload"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
