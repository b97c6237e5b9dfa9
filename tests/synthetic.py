"""Tiny datasets written in the real on-disk layouts, for tests without the data.

The content is fixed and small enough to check by hand; the docstrings list it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with 0s."""
    flat = mask.flatten(order="F").astype(np.int64)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def _box(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[rows, cols] = True
    return mask


def write_synthetic_coco(root: str, split: str = "val2017") -> str:
    """Write a three-image COCO instances set under `root`; return `root`.

    Image 1 (`000000000001.jpg`, 48x64, HxW):
        ann 101  polygon square x 8..24, y 6..22           bbox xywh (8, 6, 16, 16)
        ann 102  uncompressed RLE, 5x5 square x 30..34, y 10..14   bbox (30, 10, 5, 5)
        ann 103  crowd                                      -> skipped
    Image 2 (`000000000002.png`, 40x56):
        ann 201  uncompressed RLE of an empty mask          -> skipped
        ann 202  polygon triangle (4, 4), (40, 4), (4, 30)  bbox (4, 4, 36, 26)
        ann 203  compressed RLE, 5x5 square x 51..55, y 0..4 (touches the top and right image
                 edges)                                     bbox (51, 0, 5, 5)
    Image 3 (`000000000003.jpg`, 48x64): only a crowd and an empty annotation -> image skipped.

    So the dataset holds images 1 and 2 with 2 instances each.
    """
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images = [
        {"id": 1, "file_name": "000000000001.jpg", "height": 48, "width": 64},
        {"id": 2, "file_name": "000000000002.png", "height": 40, "width": 56},
        {"id": 3, "file_name": "000000000003.jpg", "height": 48, "width": 64},
    ]
    for info in images:
        pixels = _noise(info["height"], info["width"], seed=info["id"])
        Image.fromarray(pixels).save(os.path.join(image_dir, info["file_name"]))

    def ann(
        ann_id: int, image_id: int, segmentation: Any, bbox: list[float], crowd: int = 0
    ) -> dict[str, Any]:
        return {
            "id": ann_id,
            "image_id": image_id,
            "category_id": 1,
            "segmentation": segmentation,
            "bbox": bbox,
            "area": float(bbox[2] * bbox[3]),
            "iscrowd": crowd,
        }

    square_102 = _box(48, 64, slice(10, 15), slice(30, 35))
    crowd_103 = _box(48, 64, slice(30, 40), slice(0, 60))
    square_203 = _box(40, 56, slice(0, 5), slice(51, 56))
    crowd_301 = _box(48, 64, slice(0, 20), slice(0, 20))
    annotations = [
        ann(101, 1, [[8, 6, 24, 6, 24, 22, 8, 22]], [8, 6, 16, 16]),
        ann(102, 1, _uncompressed_rle(square_102), [30, 10, 5, 5]),
        ann(103, 1, _uncompressed_rle(crowd_103), [0, 30, 60, 10], crowd=1),
        ann(201, 2, _uncompressed_rle(np.zeros((40, 56), dtype=bool)), [0, 0, 0, 0]),
        ann(202, 2, [[4, 4, 40, 4, 4, 30]], [4, 4, 36, 26]),
        ann(203, 2, _compressed_rle(square_203), [51, 0, 5, 5]),
        ann(301, 3, _uncompressed_rle(crowd_301), [0, 0, 20, 20], crowd=1),
        ann(302, 3, _uncompressed_rle(np.zeros((48, 64), dtype=bool)), [0, 0, 0, 0]),
    ]
    payload = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(payload, f)
    return root


def write_synthetic_imagefolder(
    root: str,
    split: str = "val",
    counts: Sequence[int] = (3, 2, 2),
    size: tuple[int, int] = (36, 40),
) -> str:
    """Write `root/split/class_<i>/<i>_<j>.JPEG`, `counts[i]` noise images of `size` (H, W) per
    class; return `root`.
    """
    for label, count in enumerate(counts):
        class_dir = os.path.join(root, split, f"class_{label}")
        os.makedirs(class_dir, exist_ok=True)
        for j in range(count):
            pixels = _noise(*size, seed=100 * label + j)
            Image.fromarray(pixels).save(os.path.join(class_dir, f"{label}_{j}.JPEG"), "JPEG")
    return root
