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
