"""imagenet_dataset layout checks and timm's evaluation transform."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms

from spatialmerge.data import DatasetLayoutError, eval_transform, imagenet_dataset
from tests.synthetic import write_synthetic_imagefolder


def test_reads_one_class_per_folder(tmp_path: Path) -> None:
    root = write_synthetic_imagefolder(str(tmp_path), counts=(3, 2, 2))
    dataset = imagenet_dataset(root, "val", transform=transforms.ToTensor())
    assert len(dataset) == 7
    assert dataset.classes == ["class_0", "class_1", "class_2"]
    assert dataset.targets == [0, 0, 0, 1, 1, 2, 2]
    image, label = dataset[3]
    assert image.shape == (3, 36, 40) and label == 1


def test_missing_split_names_the_path_and_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError) as info:
        imagenet_dataset(str(tmp_path), "val")
    assert str(tmp_path / "val") in str(info.value)
    assert "dataset.root=" in str(info.value)


def test_unsorted_val_images_point_to_the_valprep_fix(tmp_path: Path) -> None:
    os.makedirs(tmp_path / "val")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetLayoutError, match="valprep") as info:
        imagenet_dataset(str(tmp_path), "val")
    assert "ILSVRC2012_val_00000001.JPEG" in str(info.value)


def test_split_without_class_folders_raises(tmp_path: Path) -> None:
    os.makedirs(tmp_path / "val")
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        imagenet_dataset(str(tmp_path), "val")


def test_class_folders_without_images_raise(tmp_path: Path) -> None:
    root = write_synthetic_imagefolder(str(tmp_path), counts=(1,))
    shutil.rmtree(tmp_path / "val" / "class_0")
    os.makedirs(tmp_path / "val" / "class_0")
    with pytest.raises(DatasetLayoutError, match="dataset.root="):
        imagenet_dataset(root, "val")


def test_unknown_split_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset.split"):
        imagenet_dataset(str(tmp_path), "test")  # type: ignore[arg-type]


def test_eval_transform_is_deits_resize_248_bicubic_crop_224() -> None:
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    transform = eval_transform(model)
    resize = next(t for t in transform.transforms if isinstance(t, transforms.Resize))
    crop = next(t for t in transform.transforms if isinstance(t, transforms.CenterCrop))
    assert resize.size == 248
    assert resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert tuple(crop.size) == (224, 224)
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    out = transform(Image.fromarray(pixels))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def test_eval_transform_follows_a_model_built_at_another_size():
    import timm
    import torch
    from PIL import Image

    from spatialmerge.data import eval_transform

    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=1)
    out = eval_transform(model)(Image.new("RGB", (100, 80)))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
