"""COCO instances with one ground-truth prompt per instance, for SAM's COCO mIoU protocol.

Layout (COCO 2017 as distributed by cocodataset.org, both zips unpacked into one folder):

    root/annotations/instances_{split}.json
    root/{split}/*.jpg

Crowd annotations and annotations whose mask is empty are skipped; images left with no instance
are skipped. Annotations that cannot be evaluated (no or empty segmentation, a polygon of fewer
than 3 points or reaching outside its image, an RLE of another size or whose run lengths do not
cover its image, a box of zero or negative
size, not finite or outside the image, an image id with no image, a second annotation with an
id already seen) are skipped too,
counted in ``CocoInstances.skipped`` and warned about; a truncated annotation file is an error
naming it. Every mask is kept as pycocotools RLE (built once in `__init__`) and decoded only when
its image is loaded, so the dataset is light to ship to DataLoader worker processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy.ndimage import distance_transform_edt
from torch.utils.data import Dataset

from spatialmerge.data.errors import DatasetLayoutError
from spatialmerge.data.images import load_rgb

Prompt = Literal["box", "point"]
PROMPTS: tuple[str, ...] = ("box", "point")


@dataclass(frozen=True)
class _ImageRecord:
    """What `__getitem__` needs of one image: its file, size and kept instances."""

    image_id: int
    path: str
    height: int
    width: int
    ann_ids: tuple[int, ...]
    bboxes_xywh: tuple[tuple[float, float, float, float], ...]
    rles: tuple[dict[str, Any], ...]


def mask_interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The pixel of `mask` (H, W) bool farthest from the mask's border, as (x, y) pixel indices.

    Distance is Euclidean to the nearest background pixel, where everything outside the image
    counts as background (so a mask touching the image edge is not "deep" there). Ties go to the
    first pixel in row-major order, so the point is deterministic. SAM's prompt encoder shifts
    integer coordinates to pixel centres itself, hence indices rather than centres.

    Raises ValueError for an empty mask (it has no interior).
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty: an empty mask has no interior point")
    # The distance transform only needs the mask's bounding box plus a one-pixel background ring:
    # any background pixel outside that ring is never closer than the ring pixel next to it. This
    # keeps the transform small for small objects in large images and gives identical results.
    top, left = int(rows[0]), int(cols[0])
    crop = mask[top : int(rows[-1]) + 1, left : int(cols[-1]) + 1]
    dist = distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]  # (h, w)
    y, x = divmod(int(np.argmax(dist)), crop.shape[1])  # argmax: first maximum, row-major
    return float(left + x), float(top + y)


def _annotation_problem(ann: Any, images: Mapping[Any, Mapping[str, Any]]) -> str | None:
    """Why a COCO annotation cannot be evaluated, or None (crowd annotations pass: the protocol
    skips them later, as it always did). ``images`` maps image id to its entry."""
    if not isinstance(ann, dict) or "id" not in ann:
        return "not an annotation object with an id"
    image = images.get(ann.get("image_id"))
    if image is None:
        return f"image_id {ann.get('image_id')!r} has no image in the file"
    if ann.get("iscrowd"):
        return None
    height, width = image["height"], image["width"]
    segmentation = ann.get("segmentation")
    if segmentation is None:
        return "no segmentation"
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and p]
        if not polygons:
            return f"empty segmentation {segmentation!r}"
        if any(len(p) < 6 or len(p) % 2 for p in polygons):
            return "a polygon with fewer than 3 points"
        values = [v for p in polygons for v in p]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return "a polygon with a coordinate that is not a finite number"
        xs, ys = [v for p in polygons for v in p[0::2]], [v for p in polygons for v in p[1::2]]
        if min(xs) < -_EDGE or max(xs) > width + _EDGE or min(ys) < -_EDGE or max(ys) > height + _EDGE:
            return (f"a polygon outside the {width}x{height} image (x {min(xs):g}..{max(xs):g}, "
                    f"y {min(ys):g}..{max(ys):g})")
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not isinstance(counts, (str, list)) or not isinstance(size, list) or len(size) != 2:
            return "an RLE without 'counts' and a [height, width] 'size'"
        if list(size) != [height, width]:
            return f"an RLE of size {size} on a {height}x{width} image"
        runs = rle_counts(counts) if isinstance(counts, str) else counts
        kind = "a compressed" if isinstance(counts, str) else "an uncompressed"
        if runs is None or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in runs):
            return f"{kind} RLE whose counts are not run lengths (whole numbers >= 0)"
        if sum(runs) != height * width:
            # pycocotools would decode whatever memory follows the runs as mask pixels
            return f"{kind} RLE whose counts cover {sum(runs)} pixels, not the {height}x{width} image"
    else:
        return f"segmentation of type {type(segmentation).__name__} (expected polygons or RLE)"
    return None


def rle_counts(compressed: str) -> list[int] | None:
    """The run lengths of a COCO compressed RLE string (the format of pycocotools' maskApi.c
    ``rleToString``: each count in 5-bit groups offset by 48, a continuation bit, a sign bit in
    the last group, counts after the second stored as the difference to the count two before),
    or None for a string that is not one. pycocotools decodes such a string without checking
    it, so an annotation is checked with this before it is decoded."""
    counts: list[int] = []
    position = 0
    while position < len(compressed):
        value, shift, more = 0, 0, True
        while more:
            if position == len(compressed):
                return None  # a count cut off mid-way
            group = ord(compressed[position]) - 48
            if not 0 <= group < 64:
                return None
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            shift += 5
            position += 1
            if not more and group & 0x10:
                value |= -1 << shift  # negative: sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


# How far (pixels) a polygon or box may reach past the image: COCO's own coordinates overshoot
# the border by rounding; more means the annotation belongs to another image size.
_EDGE = 1.0


def _box_problem(bbox: Any, height: int, width: int) -> str | None:
    """Why an instance's box cannot be a prompt, or None. Checked for instances whose mask is
    not empty only: an empty-mask annotation (skipped by the protocol) may carry a zero box."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        return f"bbox {bbox!r} is not [x, y, width, height]"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return f"bbox {bbox!r} holds a value that is not a finite number"
    if not bbox[2] > 0 or not bbox[3] > 0:
        return f"bbox {bbox!r} has a width or height <= 0"
    x, y, w, h = bbox
    if x < -_EDGE or y < -_EDGE or x + w > width + _EDGE or y + h > height + _EDGE:
        return f"bbox {bbox!r} reaches outside the {width}x{height} image"
    return None


def _image_problem(image: Any) -> str | None:
    """Why an entry of the file's ``images`` list cannot be read, or None."""
    if not isinstance(image, dict):
        return "is not an object"
    missing = [key for key in ("id", "file_name", "height", "width") if key not in image]
    if missing:
        return f"has no {', '.join(repr(k) for k in missing)}"
    if not all(isinstance(image[k], int) and not isinstance(image[k], bool) and image[k] > 0
               for k in ("height", "width")):
        return f"has height {image['height']!r} and width {image['width']!r}, not positive whole numbers"
    if not isinstance(image["file_name"], str) or not image["file_name"]:
        return f"has file_name {image['file_name']!r}"
    return None


def collate_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DataLoader `collate_fn` that keeps items as a list: images differ in size, so no stacking.

    A module-level function (not a lambda) so spawn-started worker processes can pickle it.
    """
    return batch


def _layout_error(problem: str, root: str, split: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"{problem}. Expected the COCO layout {root}/annotations/instances_{split}.json and "
        f"{root}/{split}/*.jpg. Get the COCO 2017 val images (val2017.zip) and annotations "
        "(annotations_trainval2017.zip) from https://cocodataset.org/#download, unzip both into "
        "one folder and point the config at it: dataset.root=/path/to/coco"
    )


class CocoInstances(Dataset):
    """COCO instance masks with their box and point prompts; one item per image.

    Args:
        root: folder holding `annotations/` and the `{split}/` image folder.
        split: image folder / annotation suffix, e.g. "val2017".
        prompt: which prompt `item["prompts"]` holds: "box" (xyxy) or "point" (interior point).
        max_images: keep at most this many images (the first ones by image id); None keeps all.

    Each item is a dict:
        image:    (H, W, 3) uint8 RGB
        image_id: int
        masks:    (K, H, W) bool, one per kept instance
        boxes:    (K, 4) float32 xyxy, from the annotation's xywh bbox
        points:   (K, 2) float32 (x, y), see `mask_interior_point`
        prompts:  `boxes` or `points`, following `prompt`
        ann_ids:  (K,) int64 annotation ids
    """

    def __init__(
        self,
        root: str,
        split: str = "val2017",
        prompt: Prompt = "box",
        max_images: int | None = None,
    ) -> None:
        if prompt not in PROMPTS:
            raise ValueError(
                f"dataset.prompt={prompt!r} is not one of {PROMPTS}; set dataset.prompt=box or "
                "dataset.prompt=point"
            )
        if max_images is not None and max_images < 1:
            raise ValueError(
                f"dataset.max_images={max_images} must be >= 1; use dataset.max_images=null for "
                "all images"
            )
        self.root = root
        self.split = split
        self.prompt = prompt
        ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
        image_dir = os.path.join(root, split)
        if not os.path.isdir(root):
            raise _layout_error(f"COCO root folder not found: {root}", root, split)
        if not os.path.isfile(ann_file):
            raise _layout_error(f"COCO annotation file not found: {ann_file}", root, split)
        if not os.path.isdir(image_dir):
            raise _layout_error(f"COCO image folder not found: {image_dir}", root, split)
        self.records = self._index(ann_file, image_dir, max_images)
        if not self.records:
            raise _layout_error(
                f"{ann_file} has no image with a non-crowd, non-empty instance", root, split
            )

    def _index(
        self, ann_file: str, image_dir: str, max_images: int | None
    ) -> list[_ImageRecord]:
        try:
            with open(ann_file) as handle:
                data = json.load(handle)
        except (OSError, ValueError) as err:
            raise _layout_error(
                f"cannot read the COCO annotation file {ann_file} ({type(err).__name__}: {err}); "
                "it is truncated or not JSON: download and unzip it again",
                self.root,
                self.split,
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list
        ):
            raise _layout_error(
                f"{ann_file} is JSON but not a COCO instances file (no 'images' and 'annotations' lists)",
                self.root,
                self.split,
            )
        for position, image in enumerate(data["images"]):
            problem = _image_problem(image)
            if problem is not None:
                raise _layout_error(
                    f"{ann_file}: images[{position}] {problem}; every image entry needs id, file_name, "
                    "height and width (a COCO instances file as released)",
                    self.root,
                    self.split,
                )
        data = dict(data, annotations=self._valid_annotations(data, ann_file))
        coco = COCO()
        coco.dataset = data
        # pycocotools prints progress lines to stdout; keep evaluation logs clean.
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        records: list[_ImageRecord] = []
        for image_id in sorted(coco.getImgIds()):
            info = coco.imgs[image_id]
            kept = []
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False)):
                rle = coco.annToRLE(ann)
                # The RLE area is exactly what annToMask would decode, without decoding it.
                if int(mask_utils.area(rle)) > 0:
                    problem = _box_problem(ann.get("bbox"), int(info["height"]), int(info["width"]))
                    if problem is not None:
                        self.skipped[ann["id"]] = problem
                        continue
                    kept.append((int(ann["id"]), tuple(float(v) for v in ann["bbox"]), rle))
            if not kept:
                continue
            path = os.path.join(image_dir, info["file_name"])
            if not os.path.isfile(path):
                raise _layout_error(
                    f"image {info['file_name']} (id {image_id}) listed in {ann_file} is missing "
                    f"from {image_dir}",
                    self.root,
                    self.split,
                )
            ann_ids, bboxes, rles = zip(*kept)
            records.append(
                _ImageRecord(
                    image_id=int(image_id),
                    path=path,
                    height=int(info["height"]),
                    width=int(info["width"]),
                    ann_ids=ann_ids,
                    bboxes_xywh=bboxes,
                    rles=rles,
                )
            )
            if max_images is not None and len(records) == max_images:
                break
        self._warn_skipped(ann_file)
        return records

    def _valid_annotations(self, data: dict[str, Any], ann_file: str) -> list[dict[str, Any]]:
        """The non-crowd annotations whose mask and box can be evaluated; the others are
        skipped, counted in ``self.skipped`` (annotation id -> reason) and warned about once,
        so a broken annotation neither crashes deep inside pycocotools nor changes mIoU
        silently."""
        images = {image["id"]: image for image in data["images"]}
        self.skipped: dict[Any, str] = {}
        kept, seen = [], set()
        for ann in data["annotations"]:
            reason = _annotation_problem(ann, images)
            if reason is None and ann["id"] in seen:  # pycocotools would keep only the last one
                reason = f"duplicate annotation id {ann['id']!r} (the first one is kept)"
            if reason is None:
                kept.append(ann)
                seen.add(ann["id"])
            else:
                key = ann.get("id") if isinstance(ann, dict) else None
                self.skipped[key if key not in self.skipped else f"{key} ({len(self.skipped)})"] = reason
        return kept

    def _warn_skipped(self, ann_file: str) -> None:
        if self.skipped:
            listed = "; ".join(f"annotation {k}: {v}" for k, v in list(self.skipped.items())[:5])
            more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            warnings.warn(
                f"{ann_file}: skipped {len(self.skipped)} annotation(s) that cannot be evaluated: "
                f"{listed}{more}",
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = np.asarray(load_rgb(record.path))  # (H, W, 3) uint8
        if image.shape[:2] != (record.height, record.width):
            raise _layout_error(
                f"{record.path} is {image.shape[1]}x{image.shape[0]} (WxH) but its annotation "
                f"says {record.width}x{record.height}; the images must be the original, "
                "unresized COCO files",
                self.root,
                self.split,
            )
        masks = mask_utils.decode(list(record.rles)).transpose(2, 0, 1).astype(bool)  # (K, H, W)
        xywh = np.asarray(record.bboxes_xywh, dtype=np.float32)  # (K, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # (K, 4) xyxy
        points = np.asarray([mask_interior_point(m) for m in masks], dtype=np.float32)  # (K, 2)
        return {
            "image": image,
            "image_id": record.image_id,
            "masks": masks,
            "boxes": boxes,
            "points": points,
            "prompts": boxes if self.prompt == "box" else points,
            "ann_ids": np.asarray(record.ann_ids, dtype=np.int64),
        }
