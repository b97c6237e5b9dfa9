"""Every image under a folder, without labels: for throughput runs and qualitative figures."""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from spatialmerge.data.errors import DatasetLayoutError
from spatialmerge.data.images import load_rgb

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolderUnlabeled(Dataset):
    """Images found recursively under `root` (extensions in IMAGE_EXTENSIONS, any case), sorted
    by relative path so the order does not depend on the file system.

    Args:
        root: folder to search.
        transform: applied to the RGB PIL image; without it an item is a (H, W, 3) uint8 array.
    """

    def __init__(self, root: str, transform: Callable | None = None) -> None:
        if not os.path.isdir(root):
            raise DatasetLayoutError(
                f"image folder not found: {root}. Point the config at a folder of images "
                f"({', '.join(IMAGE_EXTENSIONS)}, searched recursively): "
                "dataset.root=/path/to/images"
            )
        self.root = root
        self.transform = transform
        self.paths: list[str] = sorted(
            os.path.relpath(os.path.join(folder, name), root)
            for folder, _, names in os.walk(root)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not self.paths:
            raise DatasetLayoutError(
                f"no image ({', '.join(IMAGE_EXTENSIONS)}) found under {root}. Point the config "
                "at a folder that holds images (searched recursively): dataset.root=/path/to/images"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        rgb = load_rgb(os.path.join(self.root, self.paths[index]))
        if self.transform is not None:
            return self.transform(rgb)
        return np.asarray(rgb)  # (H, W, 3) uint8
