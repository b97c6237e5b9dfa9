"""ImageNet in the standard ImageFolder layout, with timm's own evaluation transform.

Layout (what timm's and DeiT's training scripts read):

    root/train/<wnid>/*.JPEG
    root/val/<wnid>/*.JPEG      one folder per class, 50 images each

The official val tarball unpacks flat (all 50,000 images in one folder); it has to be sorted into
class folders first, which is the most common way to get this layout wrong.
"""

from __future__ import annotations

import os
from typing import Callable, Literal

from torch import nn
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from spatialmerge.adapters import find_adapter
from spatialmerge.data.errors import DatasetLayoutError
from spatialmerge.data.images import load_rgb

SPLITS: tuple[str, ...] = ("val", "train")

_FIX = (
    "Get ILSVRC2012 from https://image-net.org, unpack it so that each split holds one folder per "
    "class (sort the flat val images into class folders, e.g. with the widely used valprep.sh "
    "script), and point the config at the folder holding train/ and val/: "
    "dataset.root=/path/to/imagenet"
)


def _layout_error(problem: str, root: str, split: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"{problem}. Expected the ImageFolder layout {root}/{split}/<class>/*.JPEG. {_FIX}"
    )


def imagenet_dataset(
    root: str,
    split: Literal["val", "train"] = "val",
    transform: Callable | None = None,
) -> ImageFolder:
    """`torchvision.datasets.ImageFolder` over `root/split`, labels = sorted class folder index.

    Raises DatasetLayoutError when the split folder is missing, holds no class folders, holds
    images directly (an unsorted val split) or holds no images.
    """
    if split not in SPLITS:
        raise ValueError(f"dataset.split={split!r} is not one of {SPLITS}; set dataset.split=val")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise _layout_error(f"ImageNet split folder not found: {split_dir}", root, split)
    entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    if loose:
        raise _layout_error(
            f"{split_dir} holds {len(loose)} images directly (e.g. {loose[0]}) instead of one "
            "folder per class: the split has not been sorted into class folders",
            root,
            split,
        )
    if not any(e.is_dir() for e in entries):
        raise _layout_error(f"{split_dir} has no class folders", root, split)
    try:
        return ImageFolder(split_dir, transform=transform, loader=load_rgb)
    except FileNotFoundError as err:  # class folders present but with no image in them
        raise _layout_error(f"{split_dir}: {err}", root, split) from err


def eval_transform(model: nn.Module) -> Callable:
    """The evaluation transform of `model`, as its backbone family defines it (timm's, resolved
    from the model's pretrained config; transformers models: timm's defaults at their
    ``config.image_size``).

    For DeiT this is: resize the short side to 248 (bicubic), center crop 224, to tensor,
    normalise with the ImageNet mean / std. Maps a PIL image to a (3, H, W) float tensor.
    """
    return find_adapter(model).eval_transform(model)
