"""Backbones the project supports (SAM, samvit, DeiT, DINOv3) and safe checkpoint loading."""

from spatialmerge.models.checkpoints import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    load_checkpoint,
    missing_checkpoint_message,
    read_state_dict,
)
from spatialmerge.models.info import ModelInfo, model_info
from spatialmerge.models.registry import available_models, build_model
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
]
