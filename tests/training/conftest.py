"""Fixtures for the training tests: a learnable toy ImageNet written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import write_colour_folder


@pytest.fixture(scope="session")
def colour_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 train and 4 val 32x32 PNGs per class, 4 classes, each class one colour."""
    return write_colour_folder(tmp_path_factory.mktemp("colours"), {"train": 16, "val": 4})
