"""The training loop: DDP, AMP, gradient accumulation, EMA, checkpoints and resume.

Built from timm's well-kept pieces (optimizer and scheduler factories, mixup, losses, EMA); this
file only orders them. One *step* is one optimizer update; checkpoints, the schedule, logging and
``max_steps`` all count steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from spatialmerge import distributed
from spatialmerge.loggers import RunLogger
from spatialmerge.training.checkpoint import (
    CHECKPOINT_DIR,
    TrainingCheckpointError,
    capture_rng,
    checkpoint_name,
    load_model_state,
    newest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)
from spatialmerge.training.config import TrainConfig
from spatialmerge.training.data import (
    ResumableSampler,
    SeededSamples,
    UnreadableImages,
    mixup_and_criterion,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the weights were not updated with it."""


# How many skipped training files a record names; the count covers them all.
SKIPPED_LISTED = 100


class TrainingInterrupted(RuntimeError):
    """``trainer.stop_after_steps`` ended the run the way a kill would."""


@dataclass
class TrainResult:
    """What ``Trainer.fit`` hands back.

    Attributes:
        model: the trained model (not DDP-wrapped), merging still patched in.
        ema: the EMA copy of the model, or None when EMA is off.
        metrics: ``loss`` (mean of the last epoch trained in this process), ``lr``, ``img_s``,
            ``steps``, ``epochs``, ``global_batch``, ``peak_lr``, ``seconds``, ``checkpoint``,
            ``skipped_images`` (unreadable training files replaced, over the whole run, resumes
            included) and ``skipped_files`` (their paths, the first ``SKIPPED_LISTED``).
    """

    model: nn.Module
    ema: nn.Module | None
    metrics: dict[str, Any] = field(default_factory=dict)


# Identities of this version name every key; a key only one side has is a change too. Older
# checkpoints named only some (model.name, model.checkpoint): only the keys both have compare.
IDENTITY_VERSION_KEY = "identity.version"
IDENTITY_VERSION = 2


def identity_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key old -> new`` for every setting a resume would change. Identities that carry a
    version compare every key either side has (an option added on resume is a change); older
    ones only the keys both have."""
    unset = "<unset>"
    versioned = IDENTITY_VERSION_KEY in saved
    keys = dict.fromkeys([*saved, *current]) if versioned else [k for k in current if k in saved]
    return [
        f"{k} {saved.get(k, unset)!r} -> {current.get(k, unset)!r}"
        for k in keys
        if saved.get(k, unset) != current.get(k, unset)
    ]


class Trainer:
    """Fine-tunes a model on every process of the current (torchrun) group, or alone.

    Args:
        config: the recipe.
        run_dir: where checkpoints go (``run_dir/checkpoints``); the same on every process.
        device: this process's device.
        logger: receives loss, lr and throughput every ``config.log_every`` steps; pass it on
            rank 0 only.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        device: torch.device,
        logger: RunLogger | None = None,
        identity: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        # what the run computes (model, merge, recipe); saved in every checkpoint, and a resume
        # that would change it is refused
        self.identity = dict(identity or {})
        self.checkpoint_dir = Path(run_dir) / CHECKPOINT_DIR
        self.device = torch.device(device)
        self.logger = logger
        self.skipped: set[str] = set()  # unreadable training files this process replaced

    def fit(self, model: nn.Module, train_set: Dataset) -> TrainResult:
        """Train ``model`` on ``train_set`` (items: (image (3, H, W), label)) and return it.

        Raises:
            NonFiniteLossError: the loss became NaN / inf; the last checkpoint is still clean.
            TrainingCheckpointError: ``config.resume`` names a checkpoint that cannot be resumed.
            TrainingInterrupted: ``config.stop_after_steps`` was reached.
        """
        cfg, device = self.config, self.device
        world = distributed.world_size()
        samples = SeededSamples(UnreadableImages(train_set, skip=cfg.skip_corrupt_images), cfg.seed)
        sampler = ResumableSampler(
            samples, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=cfg.seed, drop_last=True
        )
        per_epoch = sampler.num_samples // (cfg.batch_size * cfg.accum_steps)
        global_batch = cfg.batch_size * world * cfg.accum_steps
        if per_epoch == 0:
            raise ValueError(
                f"the training split has {len(samples)} images, fewer than one update's "
                f"{global_batch} ({world} process(es) x trainer.batch_size={cfg.batch_size} x "
                f"trainer.accum_steps={cfg.accum_steps}); lower trainer.batch_size"
            )
        total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.epochs * per_epoch, cfg.max_steps)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * per_epoch)
        plan = {"global_batch": global_batch, "updates_per_epoch": per_epoch, "total_steps": total}
        loader = DataLoader(
            samples,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
            # Its own generator, so creating an epoch's iterator draws nothing from the global
            # torch stream (which a resumed run restores exactly).
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        model.to(device).train()
        peak_lr = cfg.scaled_lr(global_batch)
        parts = self._optimization(model, global_batch, total, warmup)
        optimizer, scheduler, ema = parts["optimizer"], parts["scheduler"], parts["ema"]
        num_classes = getattr(model, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise TypeError(f"{type(model).__name__} has no num_classes: train.py fine-tunes classifiers")
        mixup, criterion = mixup_and_criterion(cfg, num_classes)

        step = first = self._resume(parts, plan)
        scheduler.step_update(step)
        wrapped = model
        if world > 1:
            wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        log.info(
            "training %d steps (%d per epoch), global batch %d, peak lr %.3g, from step %d",
            total, per_epoch, global_batch, peak_lr, step,
        )

        started = time.perf_counter()
        epoch_loss: float | None = None
        saved_at = step if step > 0 else None
        while step < total:
            epoch, done = divmod(step, per_epoch)
            sampler.set_epoch(epoch)
            samples.set_epoch(epoch)
            sampler.set_start(done * cfg.accum_steps * cfg.batch_size)
            end = min(per_epoch, total - epoch * per_epoch)
            batches = iter(loader)
            bar = tqdm(
                total=end, initial=done, desc=f"epoch {epoch}", unit="step",
                disable=not (cfg.progress and distributed.is_main()), dynamic_ncols=True,
            )
            epoch_start, window_start, losses, window = time.perf_counter(), time.perf_counter(), [], []
            for _ in range(done, end):
                loss = self._update(wrapped, batches, mixup, criterion, optimizer, parts["scaler"], step)
                step += 1
                scheduler.step_update(step)
                if ema is not None:
                    ema.update(model, step=step)
                losses.append(loss)
                window.append(loss)
                lr = optimizer.param_groups[0]["lr"]
                if distributed.is_main():
                    img_s = len(window) * global_batch / (time.perf_counter() - window_start)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{img_s:.1f}", refresh=False)
                    bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    self._log(step, epoch, window, lr, global_batch, window_start)
                    window, window_start = [], time.perf_counter()
                if cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0:
                    self._save(parts, step, plan)
                    saved_at = step
                if cfg.stop_after_steps is not None and step == cfg.stop_after_steps and step < total:
                    bar.close()
                    raise TrainingInterrupted(
                        f"stopped after step {step} (trainer.stop_after_steps={step}) as a kill "
                        f"would; continue with trainer.resume=auto hydra.run.dir=<this run's directory>"
                    )
            bar.close()
            epoch_loss = sum(losses) / len(losses)
            seconds = time.perf_counter() - epoch_start
            log.info(
                "epoch %d: loss %.4f, lr %.3g, %.1f img/s, %d steps in %.1f s",
                epoch, epoch_loss, optimizer.param_groups[0]["lr"], len(losses) * global_batch / seconds,
                len(losses), seconds,
            )
        if saved_at != step:
            self._save(parts, step, plan)
        trained = time.perf_counter() - started
        newest = newest_checkpoint(self.checkpoint_dir)
        skipped = self._all_skipped()
        metrics = {
            "loss": epoch_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "img_s": (step - first) * global_batch / trained if step > first else None,
            "steps": step,
            "epochs": step / per_epoch,
            "global_batch": global_batch,
            "peak_lr": peak_lr,
            "seconds": trained,
            "checkpoint": None if newest is None else str(newest),
            "skipped_images": len(skipped),
            "skipped_files": skipped[:SKIPPED_LISTED],
        }
        return TrainResult(model=model, ema=None if ema is None else ema.module, metrics=metrics)

    def _optimization(self, model: nn.Module, global_batch: int, total: int, warmup: int) -> dict[str, Any]:
        """Optimizer, per-update schedule, grad scaler and EMA: with the model, what a
        checkpoint holds."""
        cfg = self.config
        optimizer = create_optimizer_v2(
            model, opt=cfg.opt, lr=cfg.scaled_lr(global_batch), weight_decay=cfg.weight_decay
        )
        # The schedule counts updates: one "epoch" of timm's scheduler is one step here.
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=cfg.sched,
            num_epochs=total,
            warmup_epochs=warmup,
            min_lr=cfg.scaled_lr(global_batch, cfg.min_lr),
            warmup_lr=cfg.scaled_lr(global_batch, cfg.warmup_lr),
            step_on_epochs=False,
            updates_per_epoch=1,
        )
        return {
            "model": model,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "scaler": torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16"),
            "ema": ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay is not None else None,
        }

    def _update(
        self,
        model: nn.Module,
        batches: Iterator[tuple[Tensor, Tensor]],
        mixup: Any,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        step: int,
    ) -> float:
        """One optimizer update over ``accum_steps`` batches; returns the loss averaged over
        every process, checked finite before the weights change."""
        cfg, device = self.config, self.device
        total = torch.zeros((), device=device, dtype=torch.float64)
        for i in range(cfg.accum_steps):
            images, targets, skipped = next(batches)
            self._note_skipped(skipped)
            images = images.to(device, non_blocking=True)  # (B, 3, H, W)
            targets = targets.to(device, non_blocking=True)  # (B,)
            if mixup is not None:
                images, targets = mixup(images, targets)  # targets: (B, classes) soft
            # Gradients are all-reduced only on the last batch of an accumulation.
            last = i == cfg.accum_steps - 1
            sync = nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=cfg.amp_dtype, enabled=cfg.amp_dtype is not None):
                    loss = criterion(model(images), targets)
                scaler.scale(loss / cfg.accum_steps).backward()
            total += loss.detach().double()
        mean = float(distributed.all_reduce_sum(total)) / (cfg.accum_steps * distributed.world_size())
        if not math.isfinite(mean):
            optimizer.zero_grad(set_to_none=True)
            newest = newest_checkpoint(self.checkpoint_dir)
            raise NonFiniteLossError(
                f"the training loss is {mean} at step {step + 1}: stopped without updating the "
                f"weights. Lower trainer.lr (now {cfg.lr:g} at batch 1024, "
                f"{optimizer.param_groups[0]['lr']:.3g} at this step), set trainer.clip_grad=1.0, "
                f"or use trainer.amp=bf16 instead of fp16 (now {cfg.amp}). The newest checkpoint "
                f"is {newest if newest is not None else 'none yet'}"
            )
        if cfg.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return mean

    def _note_skipped(self, skipped: list[str]) -> None:
        """Count the files replaced in a batch (``skipped``: per item, newline-joined paths)."""
        for path in (p for joined in skipped if joined for p in joined.split("\n")):
            if path not in self.skipped:
                self.skipped.add(path)
                log.warning("skipped unreadable training image %s (trainer.skip_corrupt_images=true)", path)

    def _all_skipped(self) -> list[str]:
        """Every process's skipped files, sorted; the same list on every process."""
        if not distributed.is_distributed():
            return sorted(self.skipped)
        gathered: list[Any] = [None] * distributed.world_size()
        dist.all_gather_object(gathered, sorted(self.skipped))
        return sorted({path for share in gathered for path in share})

    def _log(self, step: int, epoch: int, window: list[float], lr: float, global_batch: int, since: float) -> None:
        if self.logger is None or not window:
            return
        seconds = time.perf_counter() - since
        self.logger.log(
            {
                "train/loss": sum(window) / len(window),
                "train/lr": lr,
                "train/img_s": len(window) * global_batch / seconds,
                "train/epoch": epoch,
            },
            step=step,
        )

    def _save(self, parts: dict[str, Any], step: int, plan: dict[str, int]) -> None:
        """Every process contributes its random states; rank 0 writes the file."""
        rng = capture_rng(self.device)
        skipped = self._all_skipped()
        if distributed.is_distributed():
            gathered: list[Any] = [None] * distributed.world_size()
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        if not distributed.is_main():
            return
        ema = parts["ema"]
        payload = {
            "model": parts["model"].state_dict(),
            "optimizer": parts["optimizer"].state_dict(),
            "scheduler": parts["scheduler"].state_dict(),
            "scaler": parts["scaler"].state_dict(),
            "ema": None if ema is None else ema.state_dict(),
            "step": step,
            "epoch": step // plan["updates_per_epoch"],
            "step_in_epoch": step % plan["updates_per_epoch"],
            "plan": dict(plan),
            "identity": self.identity,
            "rng": gathered,
            "skipped_images": skipped,
        }
        save_checkpoint(self.checkpoint_dir / checkpoint_name(step), payload)
        prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints)

    def _resume(self, parts: dict[str, Any], plan: dict[str, int]) -> int:
        """Restore the checkpoint ``config.resume`` asks for; returns the step to continue from."""
        resume = self.config.resume
        newest = newest_checkpoint(self.checkpoint_dir)
        if resume is None:
            if newest is not None:
                raise ValueError(
                    f"{self.checkpoint_dir} already holds checkpoints (newest {newest.name}): "
                    "continue that run with trainer.resume=auto, or train in a new run directory"
                )
            return 0
        if resume == "auto":
            if newest is None:
                log.warning(
                    "trainer.resume=auto: no checkpoint in %s, starting at step 0 (to continue an "
                    "earlier run, pass its directory: hydra.run.dir=<run dir>)",
                    self.checkpoint_dir,
                )
                return 0
            path = newest
        else:
            path = Path(resume).expanduser()
        payload = read_checkpoint(path)
        try:
            saved_plan = payload["plan"]
            step = int(payload["step"])
            load_model_state(parts["model"], payload["model"], path)
            if saved_plan != plan:
                changed = ", ".join(
                    f"{k} {saved_plan.get(k)} -> {v}" for k, v in plan.items() if saved_plan.get(k) != v
                )
                raise TrainingCheckpointError(
                    path,
                    f"it belongs to a different schedule ({changed}); the global batch (per-process "
                    "batch x processes x accum_steps), the training split and trainer.epochs / "
                    "max_steps must stay the same to continue a run",
                )
            changed = identity_changes(payload.get("identity") or {}, self.identity)
            if changed:
                raise TrainingCheckpointError(
                    path,
                    f"it was written by a run with other settings ({'; '.join(changed)}); a resumed "
                    "run must compute what it started computing, or its record would describe a "
                    "config it never used",
                )
            parts["optimizer"].load_state_dict(payload["optimizer"])
            parts["scheduler"].load_state_dict(payload["scheduler"])
            parts["scaler"].load_state_dict(payload["scaler"])
            if (payload["ema"] is None) != (parts["ema"] is None):
                raise TrainingCheckpointError(
                    path, "trainer.ema_decay must be set (or null) as it was when the checkpoint was written"
                )
            if parts["ema"] is not None:
                parts["ema"].load_state_dict(payload["ema"])
            rng = payload["rng"]
            self.skipped.update(payload.get("skipped_images", ()))
        except TrainingCheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise TrainingCheckpointError(
                path, f"its training state does not fit this run ({type(err).__name__}: {err})"
            ) from err
        if len(rng) == distributed.world_size():
            restore_rng(rng[distributed.rank()], self.device)
        else:
            log.warning(
                "%s was written by %d process(es), this run has %d: random states are not restored, "
                "so the continuation is correct but not bit-identical to an uninterrupted run",
                path, len(rng), distributed.world_size(),
            )
        log.info("resumed from %s at step %d", path, step)
        if self.logger is not None and distributed.is_main():
            self.logger.rewind(step)
        return step
