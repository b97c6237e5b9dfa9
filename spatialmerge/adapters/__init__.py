"""Backbone adapters: how each family runs its blocks, prefix tokens and positions.

Importing this package registers every supported family with ``patch``.
"""

# each registers its families; hiera (SAM 2) without importing sam2, see hiera.loaded_sam2_types
from spatialmerge.adapters import eva, hiera, sam, vit  # noqa: F401
from spatialmerge.adapters.base import (
    Adapter,
    GridRun,
    describe_schedule,
    PatchState,
    find_adapter,
    patch,
    patch_state,
    supported_types,
    unpatch,
)
from spatialmerge.adapters.config import MergeConfig, Stage

__all__ = [
    "Adapter",
    "GridRun",
    "MergeConfig",
    "PatchState",
    "Stage",
    "describe_schedule",
    "find_adapter",
    "patch",
    "patch_state",
    "supported_types",
    "unpatch",
]
