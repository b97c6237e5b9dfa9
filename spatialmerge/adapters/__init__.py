"""Backbone adapters: how each family runs its blocks, prefix tokens and positions.

Importing this package registers every supported family with ``patch``.
"""

# each registers its families; hiera (SAM 2) and hf (transformers) without importing their
# packages: a model of theirs can only exist once its package was imported
from spatialmerge.adapters import eva, hf, hiera, sam, vit  # noqa: F401
from spatialmerge.adapters.adapter import Adapter
from spatialmerge.adapters.config import MergeConfig, Stage
from spatialmerge.adapters.registry import (
    describe_schedule,
    find_adapter,
    patch,
    patch_state,
    resolve_schedule,
    supported_types,
    unpatch,
)
from spatialmerge.adapters.runtime import GridRun, PatchState
from spatialmerge.adapters.schedule import Schedule, label

__all__ = [
    "Adapter",
    "GridRun",
    "MergeConfig",
    "PatchState",
    "Schedule",
    "Stage",
    "describe_schedule",
    "find_adapter",
    "label",
    "patch",
    "patch_state",
    "resolve_schedule",
    "supported_types",
    "unpatch",
]
