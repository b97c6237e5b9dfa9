"""Datasets in their standard on-disk layouts: COCO instances, ImageNet, plain image folders,
and the photographs bundled with scikit-image."""

from spatialmerge.data.coco import CocoInstances, collate_list, mask_interior_point
from spatialmerge.data.errors import DatasetLayoutError
from spatialmerge.data.folder import ImageFolderUnlabeled
from spatialmerge.data.imagenet import eval_transform, imagenet_dataset
from spatialmerge.data.photos import PHOTOS, SkimagePhotos

__all__ = [
    "CocoInstances",
    "DatasetLayoutError",
    "ImageFolderUnlabeled",
    "PHOTOS",
    "SkimagePhotos",
    "collate_list",
    "eval_transform",
    "imagenet_dataset",
    "mask_interior_point",
]
