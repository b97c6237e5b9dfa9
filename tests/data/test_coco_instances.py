"""CocoInstances on a hand-made COCO: kept instances, boxes, masks, point prompts, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from spatialmerge.data import CocoInstances, DatasetLayoutError, collate_list, mask_interior_point
from spatialmerge.data.coco import rle_counts
from tests.synthetic import write_synthetic_coco


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_synthetic_coco(str(tmp_path_factory.mktemp("coco")))


def _square(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[rows, cols] = True
    return mask


def test_keeps_exactly_the_non_crowd_non_empty_instances(coco_root: str) -> None:
    dataset = CocoInstances(coco_root)
    # Image 3 has only a crowd and an empty annotation, so it is skipped as a whole.
    assert len(dataset) == 2
    items = [dataset[0], dataset[1]]
    assert [item["image_id"] for item in items] == [1, 2]
    assert items[0]["ann_ids"].tolist() == [101, 102]  # 103 is a crowd
    assert items[1]["ann_ids"].tolist() == [202, 203]  # 201 is empty


def test_item_shapes_and_types(coco_root: str) -> None:
    item = CocoInstances(coco_root)[1]  # the PNG image, 40x56
    assert item["image"].shape == (40, 56, 3) and item["image"].dtype == np.uint8
    assert item["masks"].shape == (2, 40, 56) and item["masks"].dtype == bool
    assert item["boxes"].shape == (2, 4) and item["boxes"].dtype == np.float32
    assert item["points"].shape == (2, 2) and item["points"].dtype == np.float32


def test_boxes_are_xyxy_from_coco_xywh(coco_root: str) -> None:
    dataset = CocoInstances(coco_root)
    # xywh (8, 6, 16, 16) and (30, 10, 5, 5); then (4, 4, 36, 26) and (51, 0, 5, 5).
    np.testing.assert_array_equal(dataset[0]["boxes"], [[8, 6, 24, 22], [30, 10, 35, 15]])
    np.testing.assert_array_equal(dataset[1]["boxes"], [[4, 4, 40, 30], [51, 0, 56, 5]])


def test_rle_masks_decode_to_the_hand_made_squares(coco_root: str) -> None:
    dataset = CocoInstances(coco_root)
    uncompressed = dataset[0]["masks"][1]
    compressed = dataset[1]["masks"][1]
    np.testing.assert_array_equal(uncompressed, _square(48, 64, slice(10, 15), slice(30, 35)))
    np.testing.assert_array_equal(compressed, _square(40, 56, slice(0, 5), slice(51, 56)))


def test_polygon_masks_fill_their_polygon(coco_root: str) -> None:
    dataset = CocoInstances(coco_root)
    square, triangle = dataset[0]["masks"][0], dataset[1]["masks"][0]
    assert square.sum() == 16 * 16
    assert not square[:6].any() and not square[:, :8].any()  # nothing above / left of the bbox
    # Right triangle with legs 36 and 26: about 36 * 26 / 2 = 468 pixels.
    assert abs(int(triangle.sum()) - 468) < 20


def test_point_prompt_is_the_centre_of_a_square(coco_root: str) -> None:
    dataset = CocoInstances(coco_root)
    # 5x5 square at x 30..34, y 10..14: its centre pixel.
    np.testing.assert_array_equal(dataset[0]["points"][1], [32, 12])
    # 5x5 square touching the top and right image edges at x 51..55, y 0..4: the image edge
    # counts as border, so the point is the square's centre, not a pixel on the edge.
    np.testing.assert_array_equal(dataset[1]["points"][1], [53, 2])


def test_interior_point_ties_go_to_the_first_pixel_in_row_major_order() -> None:
    # A 4x6 rectangle at y 5..8, x 10..15: distance 2 on rows 6..7 x cols 11..14; first is (11, 6).
    mask = _square(20, 20, slice(5, 9), slice(10, 16))
    assert mask_interior_point(mask) == (11.0, 6.0)


def test_interior_point_of_an_l_shape_lies_in_its_thick_part() -> None:
    mask = _square(30, 30, slice(2, 9), slice(2, 9))  # 7x7 block, centre (5, 5)
    mask[8:28, 2:4] = True  # a thin leg going down
    assert mask_interior_point(mask) == (5.0, 5.0)


def test_interior_point_of_an_empty_mask_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        mask_interior_point(np.zeros((4, 4), dtype=bool))


def test_prompts_follow_the_prompt_kind(coco_root: str) -> None:
    box_item = CocoInstances(coco_root, prompt="box")[0]
    point_item = CocoInstances(coco_root, prompt="point")[0]
    np.testing.assert_array_equal(box_item["prompts"], box_item["boxes"])
    np.testing.assert_array_equal(point_item["prompts"], point_item["points"])


def test_max_images_keeps_the_first_images(coco_root: str) -> None:
    dataset = CocoInstances(coco_root, max_images=1)
    assert len(dataset) == 1 and dataset[0]["image_id"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"prompt": "mask"}, "dataset.prompt"), ({"max_images": 0}, "dataset.max_images")],
)
def test_bad_arguments_raise(coco_root: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CocoInstances(coco_root, **kwargs)


def test_missing_annotations_raise_a_layout_error(tmp_path: Path) -> None:
    os.makedirs(tmp_path / "val2017")
    with pytest.raises(DatasetLayoutError) as info:
        CocoInstances(str(tmp_path))
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "annotations" / "instances_val2017.json") in message
    assert "dataset.root=" in message and "cocodataset.org" in message


def test_missing_image_folder_raises_a_layout_error(tmp_path: Path) -> None:
    root = write_synthetic_coco(str(tmp_path))
    os.rename(tmp_path / "val2017", tmp_path / "images")
    with pytest.raises(DatasetLayoutError, match="dataset.root="):
        CocoInstances(root)


def test_missing_image_file_is_named(tmp_path: Path) -> None:
    root = write_synthetic_coco(str(tmp_path))
    os.remove(tmp_path / "val2017" / "000000000002.png")
    with pytest.raises(DatasetLayoutError, match="000000000002.png"):
        CocoInstances(root)


def test_resized_image_is_refused(tmp_path: Path) -> None:
    root = write_synthetic_coco(str(tmp_path))
    ann_file = tmp_path / "annotations" / "instances_val2017.json"
    payload = json.loads(ann_file.read_text())
    payload["images"][0]["height"] = 96  # the file on disk is 48 px high
    payload["images"][0]["width"] = 128
    # Keep only the polygon of image 1, which rasterises at any declared size.
    payload["annotations"] = [a for a in payload["annotations"] if a["id"] == 101]
    ann_file.write_text(json.dumps(payload))
    with pytest.raises(DatasetLayoutError, match="unresized"):
        CocoInstances(root)[0]


def test_dataloader_with_worker_processes_keeps_variable_sizes(coco_root: str) -> None:
    loader = DataLoader(
        CocoInstances(coco_root), batch_size=2, num_workers=2, collate_fn=collate_list
    )
    (batch,) = list(loader)
    assert [item["image"].shape for item in batch] == [(48, 64, 3), (40, 56, 3)]


def _annotations(root: Path) -> Path:
    return root / "annotations" / "instances_val2017.json"


def test_a_truncated_annotation_file_is_named(tmp_path: Path) -> None:
    write_synthetic_coco(str(tmp_path))
    path = _annotations(tmp_path)
    path.write_text(path.read_text()[:200])
    with pytest.raises(DatasetLayoutError, match=r"cannot read the COCO annotation file .*instances_val2017.json.*truncated"):
        CocoInstances(str(tmp_path))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"segmentation": []}, "empty segmentation"),
        ({"segmentation": [[]]}, "empty segmentation"),
        ({"segmentation": None}, "no segmentation"),
        ({"segmentation": [[1.0, 1.0, 5.0, 5.0]]}, "a polygon with fewer than 3 points"),
        ({"bbox": [1.0, 1.0, 0.0, 4.0]}, "has a width or height <= 0"),
        ({"bbox": [1.0, 1.0, -5.0, 4.0]}, "has a width or height <= 0"),
        ({"image_id": 999}, "image_id 999 has no image"),
        ({"segmentation": [[0.0, 0.0, 5000.0, 0.0, 5000.0, 5000.0]]}, r"a polygon outside the \d+x\d+ image"),
        ({"segmentation": {"size": [1, 1], "counts": [1]}}, r"an RLE of size \[1, 1\] on a \d+x\d+ image"),
        ({"bbox": [1.0, float("nan"), 4.0, 4.0]}, "holds a value that is not a finite number"),
        ({"bbox": [1.0, 1.0, 4000.0, 4.0]}, r"reaches outside the \d+x\d+ image"),
    ],
)
def test_an_annotation_that_cannot_be_evaluated_is_skipped_counted_and_named(
    tmp_path: Path, change: dict, reason: str
) -> None:
    write_synthetic_coco(str(tmp_path))
    path = _annotations(tmp_path)
    data = json.loads(path.read_text())
    before = CocoInstances(str(tmp_path))
    victim = next(a for a in data["annotations"] if not a.get("iscrowd"))
    victim.update(change)
    if change.get("segmentation", "") is None:
        del victim["segmentation"]
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=f"skipped 1 annotation.*annotation {victim['id']}: .*{reason}"):
        dataset = CocoInstances(str(tmp_path))
    assert set(dataset.skipped) == {victim["id"]}
    kept = sum(len(r.ann_ids) for r in dataset.records)
    assert kept == sum(len(r.ann_ids) for r in before.records) - 1
    assert all(victim["id"] not in r.ann_ids for r in dataset.records)


def _rle_of_its_image(case: str, height: int, width: int) -> dict:
    """An RLE of the right size whose runs are wrong in the way ``case`` names."""
    counts = {
        "small": mask_utils.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))["counts"].decode(),  # 100 px
        "garbage": "!!!garbage~~~",
        "cut off": "0T",  # the second count's continuation never ends
        "negative": [-5, height * width + 5],
        "short": [3, 4],
    }[case]
    return {"size": [height, width], "counts": counts}


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("small", r"a compressed RLE whose counts cover 100 pixels, not the \d+x\d+ image"),
        ("garbage", "a compressed RLE whose counts are not run lengths"),
        ("cut off", "a compressed RLE whose counts are not run lengths"),
        ("negative", "an uncompressed RLE whose counts are not run lengths"),
        ("short", r"an uncompressed RLE whose counts cover 7 pixels, not the \d+x\d+ image"),
    ],
)
def test_an_rle_whose_runs_do_not_cover_its_image_is_skipped_not_decoded(tmp_path: Path, case: str, reason: str) -> None:
    # pycocotools decodes such runs into whatever memory follows them (a 10x10 square's runs on a
    # 40x56 image scored +11 points of mIoU) or fails deep in an evaluation, naming nothing
    write_synthetic_coco(str(tmp_path))
    path = _annotations(tmp_path)
    data = json.loads(path.read_text())
    victim = next(a for a in data["annotations"] if not a.get("iscrowd"))
    image = next(i for i in data["images"] if i["id"] == victim["image_id"])
    victim["segmentation"] = _rle_of_its_image(case, image["height"], image["width"])
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=f"skipped 1 annotation.*annotation {victim['id']}: {reason}"):
        dataset = CocoInstances(str(tmp_path))
    assert set(dataset.skipped) == {victim["id"]}
    for index in range(len(dataset)):
        assert dataset[index]["masks"].dtype == bool  # every kept RLE decodes


def test_compressed_rle_counts_are_the_run_lengths_pycocotools_encodes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        flat = mask.flatten(order="F")  # COCO runs go down the columns, starting with background
        edges = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
        runs = ([0] + runs) if flat[0] else runs
        encoded = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
        assert rle_counts(encoded) == runs
    assert rle_counts("") == [] and rle_counts("0T") is None and rle_counts("~") is None


def test_a_duplicate_annotation_id_is_skipped_not_silently_replaced(tmp_path: Path) -> None:
    write_synthetic_coco(str(tmp_path))
    path = _annotations(tmp_path)
    data = json.loads(path.read_text())
    before = CocoInstances(str(tmp_path))
    first = next(a for a in data["annotations"] if not a.get("iscrowd"))
    other = next(a for a in data["annotations"] if not a.get("iscrowd") and a["id"] != first["id"])
    data["annotations"].append({**other, "id": first["id"]})  # a second object under the same id
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=rf"annotation {first['id']}: duplicate annotation id"):
        dataset = CocoInstances(str(tmp_path))
    assert list(dataset.skipped) == [first["id"]]
    assert [r.ann_ids for r in dataset.records] == [r.ann_ids for r in before.records]
    assert [r.rles for r in dataset.records] == [r.rles for r in before.records], "the first one is kept"


@pytest.mark.parametrize(("drop", "message"), [("height", r"images\[0\] has no 'height'"),
                                               ("file_name", r"images\[0\] has no 'file_name'")])
def test_an_image_entry_without_its_size_or_file_is_named(tmp_path: Path, drop: str, message: str) -> None:
    write_synthetic_coco(str(tmp_path))
    path = _annotations(tmp_path)
    data = json.loads(path.read_text())
    del data["images"][0][drop]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetLayoutError, match=message):
        CocoInstances(str(tmp_path))
