"""Backbones the project supports (SAM, SAM 2, samvit, DeiT, DINOv2, DINOv3, transformers) and
safe checkpoint loading.

Every module of this package is imported, so a builder module that calls
:func:`~spatialmerge.models.registry.register_model` adds its backbones by existing.
"""

import importlib
import pkgutil

from spatialmerge.models.checkpoints import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    load_checkpoint,
    missing_checkpoint_message,
    read_state_dict,
)
from spatialmerge.models.info import ModelInfo, model_info
from spatialmerge.models.registry import available_models, build_model, register_model
from spatialmerge.models.sam import build_sam_b, build_sam_h, build_sam_l
from spatialmerge.models.timm_models import build_timm_model

__all__ = [
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ModelInfo",
    "available_models",
    "build_model",
    "build_sam_b",
    "build_sam_h",
    "build_sam_l",
    "build_timm_model",
    "load_checkpoint",
    "missing_checkpoint_message",
    "model_info",
    "read_state_dict",
    "register_model",
]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
