"""ImageFolderUnlabeled: recursive discovery, sorted order, RGB arrays, layout errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialmerge.data import DatasetLayoutError, ImageFolderUnlabeled


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    os.makedirs(tmp_path / "b" / "deep")
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "z.png")
    Image.new("RGB", (5, 3)).save(tmp_path / "a.JPG")
    Image.new("L", (7, 2), 128).save(tmp_path / "b" / "gray.bmp")
    Image.new("RGB", (3, 3)).save(tmp_path / "b" / "deep" / "c.webp")
    Image.new("RGB", (3, 3)).save(tmp_path / "b" / "deep" / "d.jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_finds_every_image_recursively_in_sorted_order(folder: Path) -> None:
    dataset = ImageFolderUnlabeled(str(folder))
    expected = ["a.JPG", "b/deep/c.webp", "b/deep/d.jpeg", "b/gray.bmp", "z.png"]
    assert dataset.paths == [os.path.normpath(p) for p in expected]


def test_items_are_rgb_uint8_arrays(folder: Path) -> None:
    dataset = ImageFolderUnlabeled(str(folder))
    gray = dataset[3]
    assert gray.shape == (2, 7, 3) and gray.dtype == np.uint8
    assert (gray == 128).all()  # greyscale expanded to three channels
    np.testing.assert_array_equal(dataset[4][0, 0], [255, 0, 0])


def test_transform_receives_the_pil_image(folder: Path) -> None:
    dataset = ImageFolderUnlabeled(str(folder), transform=lambda image: image.size)
    assert dataset[0] == (5, 3)


def test_empty_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetLayoutError, match="dataset.root="):
        ImageFolderUnlabeled(str(tmp_path))


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=re.escape(str(tmp_path / "nope"))):
        ImageFolderUnlabeled(str(tmp_path / "nope"))


def test_a_truncated_or_fake_image_is_named_in_one_line(tmp_path):
    from PIL import Image

    from spatialmerge.data import CorruptImageError, ImageFolderUnlabeled

    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "good.png")
    whole = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "fake.jpg").write_text("not an image at all")
    dataset = ImageFolderUnlabeled(str(tmp_path))
    assert dataset[dataset.paths.index("good.png")].shape == (32, 32, 3)
    for name in ("cut.png", "fake.jpg"):
        with pytest.raises(CorruptImageError, match=f"cannot read image .*{name}.*replace or remove the file"):
            dataset[dataset.paths.index(name)]


def test_a_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    import numpy as np
    from PIL import Image

    from spatialmerge.data import load_rgb

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # PIL stores uint16 as mode I;16
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    rgb = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    expected = np.round(ramp * 255.0 / 65535).astype(np.uint8)
    assert (rgb[..., 0] == expected).all() and (rgb[..., 0] < 250).mean() > 0.9


@pytest.mark.parametrize("workers", [0, 2])
def test_reading_every_image_once_stops_at_the_first_unreadable_one_naming_it(tmp_path, workers):
    from spatialmerge.data import CorruptImageError, check_readable

    for name in ("a.png", "b.png", "d.png", "e.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "c.png").write_bytes(b"not a png")  # third in sorted order
    dataset = ImageFolderUnlabeled(str(tmp_path))
    check_readable(dataset, 2, num_workers=workers)  # the first two are readable
    with pytest.raises(CorruptImageError) as err:
        check_readable(dataset, len(dataset), num_workers=workers)
    # the file's own one-line error, not a worker's traceback folded into a message
    assert err.value.path == str(tmp_path / "c.png")
    assert str(err.value).startswith(f"cannot read image {tmp_path / 'c.png'}") and "\n" not in str(err.value)
