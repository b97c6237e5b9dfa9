"""Datasets in their standard on-disk layouts: COCO instances, ImageNet, plain image folders,
and the photographs bundled with scikit-image."""

from spatialmerge.data.coco import CocoInstances, collate_list, mask_interior_point
from spatialmerge.data.errors import DatasetLayoutError
from spatialmerge.data.folder import ImageFolderUnlabeled
from spatialmerge.data.images import CorruptImageError, check_readable, load_rgb
from spatialmerge.data.imagenet import eval_transform, imagenet_dataset
from spatialmerge.data.photos import PHOTOS, SkimagePhotos

__all__ = [
    "CocoInstances",
    "CorruptImageError",
    "DatasetLayoutError",
    "ImageFolderUnlabeled",
    "PHOTOS",
    "SkimagePhotos",
    "check_readable",
    "collate_list",
    "eval_transform",
    "imagenet_dataset",
    "load_rgb",
    "mask_interior_point",
]
