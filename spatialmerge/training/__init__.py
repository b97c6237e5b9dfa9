"""Fine-tuning with token merging active: the DeiT recipe via timm, DDP via torchrun, resumable.

    from spatialmerge.training import TrainConfig, Trainer
    result = Trainer(TrainConfig(epochs=1), run_dir, device).fit(patched_model, train_set)

``train.py`` drives it from the Hydra configs through :func:`run_training`.
"""

from spatialmerge.training.checkpoint import (
    TrainingCheckpointError,
    newest_checkpoint,
    read_checkpoint,
)
from spatialmerge.training.config import TrainConfig
from spatialmerge.training.data import (
    ResumableSampler,
    SeededSamples,
    UnreadableImages,
    mixup_and_criterion,
    train_transform,
)
from spatialmerge.training.run import TrainingRecordGuard, run_training, setup_device, shared_run_dir
from spatialmerge.training.trainer import (
    NonFiniteLossError,
    Trainer,
    TrainingInterrupted,
    TrainResult,
)

__all__ = [
    "NonFiniteLossError",
    "ResumableSampler",
    "SeededSamples",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingCheckpointError",
    "TrainingInterrupted",
    "TrainingRecordGuard",
    "UnreadableImages",
    "mixup_and_criterion",
    "newest_checkpoint",
    "read_checkpoint",
    "run_training",
    "setup_device",
    "shared_run_dir",
    "train_transform",
]
