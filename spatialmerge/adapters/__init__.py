"""Backbone adapters: how each family runs its blocks, prefix tokens and positions.

Importing this package registers every supported family with ``patch``.
"""

import importlib
import pkgutil

# Every module of this package is imported, so a family registers itself by existing: a new
# backbone family is one file here (plus its builder in spatialmerge.models and a model yaml).
# Alphabetical order is registration order (find_adapter takes the first that matches).
# hiera (SAM 2) and hf (transformers) register without importing their packages: a model of
# theirs can only exist once its package was imported.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
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
