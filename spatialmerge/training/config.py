"""The fine-tune recipe as one validated record: what ``configs/trainer/*.yaml`` instantiates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# The learning rate is given for this global batch and scaled linearly from it (DeiT's rule).
REFERENCE_BATCH = 1024


@dataclass
class TrainConfig:
    """Every knob of a training run; defaults are the DeiT fine-tune recipe.

    Attributes:
        epochs: passes over the training split.
        max_steps: stop after this many optimizer updates in total (smoke runs); None: no limit.
        batch_size: images per forward pass, per process.
        accum_steps: forward/backward passes per optimizer update (gradient accumulation).
        lr: peak learning rate for a global batch of 1024, scaled linearly by the real global
            batch ``batch_size * processes * accum_steps``.
        min_lr: floor of the cosine decay, at a global batch of 1024 and scaled like ``lr``, so
            the schedule keeps its shape at any batch size.
        warmup_lr: learning rate the warm-up starts from, scaled like ``lr``.
        warmup_epochs: linear warm-up length in epochs (may be fractional).
        warmup_steps: warm-up length in updates; wins over ``warmup_epochs`` when set.
        opt: timm optimizer name (``timm.optim.create_optimizer_v2``).
        sched: timm scheduler name (``timm.scheduler.create_scheduler_v2``), stepped per update.
        weight_decay: decoupled weight decay; biases, norms and position embeddings get none.
        clip_grad: clip the global gradient norm to this value; None: no clipping.
        amp: autocast dtype: ``none``, ``fp16`` (with a GradScaler) or ``bf16``.
        ema_decay: keep an exponential moving average of the weights with this decay (timm
            ``ModelEmaV3``), saved in checkpoints and evaluated too; None: off.
        auto_augment: timm auto-augment policy string (RandAugment), None: off.
        color_jitter: colour jitter strength; timm ignores it while RandAugment is on.
        reprob: random erasing probability.
        mixup: mixup alpha (0: off).
        cutmix: cutmix alpha (0: off).
        mixup_prob: probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        smoothing: label smoothing.
        num_workers: DataLoader worker processes per training process.
        checkpoint_every: save a resumable checkpoint every this many updates; None: only at the
            end.
        keep_checkpoints: how many of the newest checkpoints to keep in the run directory.
        resume: None (start fresh), ``auto`` (newest checkpoint in this run's directory, else
            fresh) or a checkpoint path.
        seed: seeds model initialisation, data order, augmentation and mixup.
        log_every: send loss, lr and throughput to the logger every this many updates.
        progress: show a tqdm bar per epoch (rank 0 only).
        stop_after_steps: fault drills and tests: stop right after this update as a kill would
            (no final checkpoint, no evaluation); None: off.
        skip_corrupt_images: an unreadable training image is replaced by the next readable one
            and counted (``skipped_images`` in results.json) instead of stopping the run. Off by
            default: a broken dataset should be seen, not trained around.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 128
    accum_steps: int = 1
    lr: float = 2.0e-5
    min_lr: float = 1.0e-6
    warmup_lr: float = 1.0e-6
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    opt: str = "adamw"
    sched: str = "cosine"
    weight_decay: float = 0.05
    clip_grad: float | None = None
    amp: Literal["none", "fp16", "bf16"] = "none"
    ema_decay: float | None = None
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    num_workers: int = 8
    checkpoint_every: int | None = 500
    keep_checkpoints: int = 2
    resume: str | None = None
    seed: int = 0
    log_every: int = 20
    progress: bool = True
    stop_after_steps: int | None = None
    skip_corrupt_images: bool = False

    def __post_init__(self) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "accum_steps": self.accum_steps,
            "keep_checkpoints": self.keep_checkpoints,
            "log_every": self.log_every,
            "max_steps": self.max_steps,
            "checkpoint_every": self.checkpoint_every,
            "stop_after_steps": self.stop_after_steps,
        }
        for key, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"trainer.{key}={value} must be >= 1")
        for key in ("lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "mixup", "cutmix", "color_jitter"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key}={getattr(self, key)} must be >= 0")
        for key in ("reprob", "smoothing", "mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"trainer.{key}={getattr(self, key)} must be in [0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"trainer.warmup_steps={self.warmup_steps} must be >= 0 (or null)")
        if self.num_workers < 0:
            raise ValueError(f"trainer.num_workers={self.num_workers} must be >= 0")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"trainer.clip_grad={self.clip_grad} must be > 0 (or null: no clipping)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"trainer.ema_decay={self.ema_decay} must be in (0, 1), e.g. 0.9998 (or null: off)")
        if not isinstance(self.skip_corrupt_images, bool):
            raise ValueError(f"trainer.skip_corrupt_images={self.skip_corrupt_images!r} must be true or false")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"trainer.amp={self.amp!r} must be one of {', '.join(AMP_DTYPES)}")
        if self.uses_mixup and self.batch_size % 2:
            raise ValueError(
                f"trainer.batch_size={self.batch_size} must be even while mixup/cutmix is on "
                "(timm mixes each batch with its reverse); use an even batch or trainer.mixup=0 "
                "trainer.cutmix=0"
            )

    @property
    def uses_mixup(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp]

    def scaled_lr(self, global_batch: int, lr: float | None = None) -> float:
        """The learning rate ``lr`` (default: the peak ``self.lr``), given for a global batch of
        1024, for ``global_batch`` images per update."""
        return (self.lr if lr is None else lr) * global_batch / REFERENCE_BATCH
