"""Reading one image file as RGB, with a clear error naming a file that cannot be read."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

# PIL modes of 16- and 32-bit single-channel integer images: convert("RGB") clips them to 255
# (a 16-bit PNG turns almost white), so they are scaled down to 8 bits first.
_WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}


class CorruptImageError(ValueError):
    """An image file cannot be decoded (truncated, not an image, unsupported).

    Attributes:
        path: the file, so that a caller can name it or skip it; None once a DataLoader worker
            has re-raised the error in the main process (torch rebuilds it from its message).
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image, fully decoded.

    16-bit greyscale is scaled to 8 bits (value * 255 / 65535) rather than clipped.

    Raises:
        CorruptImageError: the file is truncated, not an image or cannot be decoded; the message
            names the file.
    """
    try:
        with Image.open(path) as pil:
            pil.load()
            if pil.mode in _WIDE_MODES:
                values = np.asarray(pil, dtype=np.float64)
                scaled = np.clip(values * 255.0 / _WIDE_MODES[pil.mode], 0, 255).round().astype(np.uint8)
                return Image.fromarray(scaled, mode="L").convert("RGB")
            return pil.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"cannot read image {path}: {err}; replace or remove the file", path) from None


def check_readable(dataset: Dataset, count: int, num_workers: int = 0, progress: bool = False) -> None:
    """Read items ``0 .. count - 1`` of ``dataset`` once, in order (``num_workers`` DataLoader
    processes decoding), so that a file no item can be made from stops a caller before it spends
    time on models.

    Raises:
        the first failing item's own error: :class:`CorruptImageError` naming the file, or the
        dataset's (e.g. a COCO image whose size disagrees with its annotation).
    """
    read = 0
    if num_workers > 0:
        loader = DataLoader(Subset(dataset, range(count)), batch_size=None, num_workers=num_workers,
                            collate_fn=_discard)
        try:
            for _ in tqdm(loader, total=count, desc="reading images", unit="img", disable=not progress):
                read += 1
            return
        except Exception:  # a worker's error arrives with its traceback folded into the message
            pass  # the loader delivers in order: item ``read`` failed; read it here for its own error
    for index in tqdm(range(read, count), desc="reading images", unit="img", disable=not progress):
        dataset[index]


def _discard(item: Any) -> None:
    """The loader's collate function: the item was read, nothing is kept (module level, so
    spawn-started workers can pickle it)."""
    return None
