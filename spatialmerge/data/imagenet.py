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

from timm.data import create_transform, resolve_data_config
from torch import nn
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

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
    """timm's evaluation transform for `model`, resolved from the model's pretrained config.

    For DeiT this is: resize the short side to 248 (bicubic), center crop 224, to tensor,
    normalise with the ImageNet mean / std. Maps a PIL image to a (3, H, W) float tensor.
    """
    config = resolve_data_config({}, model=model)
    # A model built at another size (e.g. img_size=64 for a quick run) keeps its pretrained
    # config's 224: take the size its patch embedding actually expects.
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None and not getattr(model, "dynamic_img_size", False):
        config["input_size"] = (3, *tuple(size))
    hf_size = getattr(getattr(model, "config", None), "image_size", None)
    if isinstance(hf_size, int) and size is None:  # transformers: no pretrained_cfg, timm's defaults
        config["input_size"] = (3, hf_size, hf_size)  # (ImageNet mean / std, bicubic, crop 0.875)
    return create_transform(**config)
