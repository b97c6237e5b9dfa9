"""Datasets in their standard on-disk layouts: COCO instances, ImageNet, plain image folders."""

from spatialmerge.data.coco import CocoInstances, collate_list, mask_interior_point
from spatialmerge.data.errors import DatasetLayoutError
from spatialmerge.data.folder import ImageFolderUnlabeled
from spatialmerge.data.imagenet import eval_transform, imagenet_dataset

__all__ = [
    "CocoInstances",
    "DatasetLayoutError",
    "ImageFolderUnlabeled",
    "collate_list",
    "eval_transform",
    "imagenet_dataset",
    "mask_interior_point",
]
