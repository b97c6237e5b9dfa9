"""A small labelled ImageFolder made offline from scikit-image's photographs, for trying train.py.

Each class is one bundled photograph; its images are random crops of it (seeded), so a model
learns the classes in a few dozen steps and the whole fine-tune path (data, merge, checkpoints,
evaluation) runs on any machine without a download:

    python -m spatialmerge.data.toy data/toy               # data/toy/{train,val}/<photo>/<i>.png

It is a check of the machinery, not a benchmark: the numbers say nothing about ImageNet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from spatialmerge.data.photos import PHOTOS, skimage_data_dir

DEFAULT_CLASSES = ("astronaut", "coffee", "chelsea")


def write_photo_classes(
    root: Path,
    classes: Sequence[str] = DEFAULT_CLASSES,
    train_per_class: int = 32,
    val_per_class: int = 4,
    side: int = 64,
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/<photo>/<i>.png``: random square crops of each photo in
    ``classes`` (names of ``PHOTOS``), resized to ``side`` pixels. Refuses a ``root`` that
    exists and is not empty: it never writes over files."""
    root = Path(root)
    unknown = [name for name in classes if name not in PHOTOS]
    if unknown or len(classes) < 2:
        raise ValueError(
            f"classes {list(classes)}: need at least 2 of the bundled photos {', '.join(PHOTOS)}"
            + (f" ({', '.join(unknown)} is not one)" if unknown else "")
        )
    if min(train_per_class, val_per_class, side) < 1:
        raise ValueError(
            f"train_per_class={train_per_class}, val_per_class={val_per_class} and side={side} must be >= 1"
        )
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty; choose a new directory for the toy dataset")
    rng = np.random.default_rng(seed)
    photos = skimage_data_dir()
    for name in classes:
        with Image.open(photos / PHOTOS[name]) as opened:
            photo = opened.convert("RGB")
        short = min(photo.size)
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                crop = int(rng.integers(short // 2, short + 1))
                left = int(rng.integers(0, photo.size[0] - crop + 1))
                top = int(rng.integers(0, photo.size[1] - crop + 1))
                image = photo.crop((left, top, left + crop, top + crop)).resize((side, side), Image.BICUBIC)
                image.save(folder / f"{i}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="new directory to write, e.g. data/toy")
    parser.add_argument("--classes", default=",".join(DEFAULT_CLASSES), help=f"comma-separated, of {', '.join(PHOTOS)}")
    parser.add_argument("--train-per-class", type=int, default=32)
    parser.add_argument("--val-per-class", type=int, default=4)
    parser.add_argument("--side", type=int, default=64, help="image side in pixels")
    args = parser.parse_args(argv)
    classes = [name.strip() for name in args.classes.split(",") if name.strip()]
    try:
        write_photo_classes(args.root, classes, args.train_per_class, args.val_per_class, args.side)
    except (ValueError, OSError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    total = len(classes) * (args.train_per_class + args.val_per_class)
    print(f"wrote {total} images of {len(classes)} classes to {args.root} (train/, val/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
