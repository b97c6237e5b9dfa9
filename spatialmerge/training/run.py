"""Glue between a composed ``train`` config and the components: device, model, data, fit, evaluate.

``train.py`` stays short by calling these; tests call them too, on composed configs.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

import spatialmerge
from spatialmerge import distributed
from spatialmerge.data.imagenet import eval_transform
from spatialmerge.jobs import RecordGuard
from spatialmerge.loggers import RunLogger
from spatialmerge.pipeline import EvalContext, instantiate, resolve_merge, run_evaluators
from spatialmerge.results import RESULTS_FILE
from spatialmerge.training.checkpoint import TrainingCheckpointError
from spatialmerge.training.config import TrainConfig
from spatialmerge.training.data import train_transform
from spatialmerge.training.trainer import IDENTITY_VERSION, IDENTITY_VERSION_KEY, Trainer, identity_changes

log = logging.getLogger(__name__)


def setup_device(name: str) -> torch.device:
    """Resolve ``device`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``) and, when started by
    torchrun, join its process group: NCCL on CUDA (each process on GPU ``LOCAL_RANK``), gloo on
    CPU. ``auto`` is CUDA when available. Processes other than rank 0 then log warnings only."""
    device = distributed.resolve_device(name)
    joined = distributed.init_from_env("nccl" if device.type == "cuda" else "gloo")
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)
    if device.type == "cuda":
        index = int(os.environ.get("LOCAL_RANK", 0)) if joined else device.index
        device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
    return device


def shared_run_dir(run_dir: Path) -> Path:
    """Rank 0's run directory on every process: each torchrun process composes its own Hydra
    config, and a timestamped directory can differ by a second between them, but checkpoints
    must be written and found in one place."""
    if not distributed.is_distributed():
        return Path(run_dir)
    shared = [str(run_dir)]
    dist.broadcast_object_list(shared, src=0)
    return Path(shared[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Trainer keys that may change when a run is resumed: how it is run, not what it computes.
RESUMABLE_KEYS = (
    "resume", "num_workers", "checkpoint_every", "keep_checkpoints", "log_every", "progress", "stop_after_steps",
    # a run stopped by an unreadable image continues with skipping on: the steps before it met
    # no unreadable image, so they are what a skipping run would have computed
    "skip_corrupt_images",
)


def settings_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a training run computes with, from a resolved config (one just composed, or
    the one a record holds): every trainer setting that changes the result, every model option
    (an added +model.drop_path_rate changes what is trained, too) and the dataset root, keyed by
    their path, as they read back from JSON."""
    identity = {f"trainer.{k}": v for k, v in config["trainer"].items() if k not in RESUMABLE_KEYS and k != "_target_"}
    identity.update({f"model.{k}": v for k, v in config["model"].items() if k != "_target_"})
    identity["dataset.root"] = (config.get("dataset") or {}).get("root")
    return json.loads(json.dumps(identity, default=str))


def run_identity(cfg: DictConfig, merge: dict[str, Any] | None) -> dict[str, Any]:
    """What a training run computes: model, weights, merge, data and every trainer setting that
    changes the result. A resume with different values would record a config the run never used."""
    settings = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("trainer", "model", "dataset")}
    identity = {**settings_identity(settings), "merge": merge, IDENTITY_VERSION_KEY: IDENTITY_VERSION}
    return json.loads(json.dumps(identity, default=str))


class TrainingRecordGuard(RecordGuard):
    """The run-directory guard of ``train.py`` (registered by ``configs/train.yaml``): an
    unfinished training run continues with ``trainer.resume`` when the settings it records are
    the ones asked for, checked before Hydra rewrites the run's ``.hydra/`` and record. The
    checkpoint's own identity is checked again when it is loaded (it also holds the resolved
    merge and the global batch)."""

    resumes = True

    def check_resume(self, run_dir: Path, config: DictConfig) -> None:
        recorded = json.loads((run_dir / RESULTS_FILE).read_text()).get("config") or {}
        if not all(isinstance(recorded.get(key), dict) for key in ("trainer", "model")):
            return  # a record without its config: the checkpoint's identity decides
        asked = {key: OmegaConf.to_container(config[key], resolve=True)
                 for key in ("trainer", "model", "merge", "dataset") if key in config}
        changed = identity_changes(_requested(recorded), _requested(asked))
        if changed:
            raise TrainingCheckpointError(
                run_dir / RESULTS_FILE,
                f"it records a run with other settings ({'; '.join(changed)}); a resumed run must "
                "compute what it started computing: resume with the run's own settings, or train in "
                "a new run directory",
            )


def _requested(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config's settings with its merge request (not yet resolved on a model), versioned so
    that an option added on resume counts as a change."""
    merge = {f"merge.{k}": v for k, v in (config.get("merge") or {}).items()}
    return {**settings_identity(config), **json.loads(json.dumps(merge, default=str)),
            IDENTITY_VERSION_KEY: IDENTITY_VERSION}


def run_training(
    cfg: DictConfig, run_dir: Path, device: torch.device, logger: RunLogger | None = None
) -> dict[str, Any]:
    """Build the model, apply the merge, fine-tune it with merging active, then run every
    configured evaluator on the val split (sharded across processes).

    Returns ``{"merge": patch kwargs, "metrics": {"train": {...}, evaluator: {...}}, "notes": [...]}``
    in the shape ``spatialmerge.pipeline.record`` writes to results.json.
    """
    settings: TrainConfig = instantiate(cfg.trainer)
    seed_everything(settings.seed)  # the same initial weights on every process
    model = instantiate(cfg.model)
    schedule = resolve_merge(model, cfg.merge)
    merge = None if schedule is None else schedule.options
    described = None if schedule is None else schedule.describe()
    if merge is not None:
        spatialmerge.patch(model, **merge)
    notes: list[str] = []
    if cfg.model.get("checkpoint") is None:
        notes.append("trained from random initial weights (model.checkpoint=null)")
    dataset = instantiate(cfg.dataset)
    if "split" not in getattr(dataset, "keywords", {}):
        raise ValueError(
            f"dataset {cfg.dataset.get('_target_')} has no train/val splits; training needs a "
            "labelled ImageFolder dataset: dataset=imagenet dataset.root=/path/with/train/and/val"
        )
    train_set = dataset(split="train", transform=train_transform(model, settings))
    val = dataset(split="val", transform=eval_transform(model))  # a missing split fails before training
    check_before_training(model, train_set, val, cfg)
    seed_everything(settings.seed + distributed.rank())  # mixup and dropout differ per process
    result = Trainer(settings, run_dir, device, logger, identity=run_identity(cfg, merge)).fit(model, train_set)

    metrics: dict[str, Any] = {"train": result.metrics}
    if result.metrics["skipped_images"]:
        notes.append(
            f"{result.metrics['skipped_images']} unreadable training image(s) were replaced by the "
            "next readable one (trainer.skip_corrupt_images=true); see metrics.train.skipped_files"
        )
    candidates = {"": result.model} if result.ema is None else {"": result.model, "_ema": result.ema}
    try:
        for suffix, trained in candidates.items():
            ctx = EvalContext(trained, merge, str(device), lambda transform=None: val)
            # timing is weight-independent: the EMA weights are not timed again
            run_evaluators(cfg, ctx, suffix=suffix, timing=not suffix, into=metrics)
    except Exception as err:
        # the training itself succeeded: its measurements go into the record of the failure
        err.partial_outcome = {  # type: ignore[attr-defined]
            "merge": merge, "schedule": described, "metrics": metrics, "notes": notes,
        }
        raise
    return {"merge": merge, "schedule": described, "metrics": metrics, "notes": notes}


def check_before_training(model: nn.Module, train_set: Any, val: Any, cfg: DictConfig) -> None:
    """Refuse, before the first step, what would only fail (or silently mislead) after training:
    class folders that differ between the splits or from the model's classes, top-k larger than
    the number of classes, a global batch larger than the training split."""
    train_classes, val_classes = list(getattr(train_set, "classes", [])), list(getattr(val, "classes", []))
    if train_classes and val_classes and train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:3]
        only_val = sorted(set(val_classes) - set(train_classes))[:3]
        raise ValueError(
            f"the train split has {len(train_classes)} class folders and the val split "
            f"{len(val_classes)}, and they differ (train only: {only_train or '-'}, val only: "
            f"{only_val or '-'}); labels are folder indices, so both splits need the same class "
            "folders"
        )
    classes = len(train_classes)
    head = getattr(model, "num_classes", None)
    if classes and head is not None and head != classes:
        raise ValueError(
            f"the model has {head} classes but the data has {classes} class folders; set "
            f"++model.num_classes={classes} (or point dataset.root at data with {head} classes)"
        )
    for name, node in cfg.evaluator.items():
        ks = node.get("ks") if hasattr(node, "get") else None
        if ks and classes and max(ks) > classes:
            raise ValueError(
                f"evaluator.{name}.ks={list(ks)} asks for top-{max(ks)} of {classes} classes; "
                f"use ks up to {classes}, e.g. evaluator.{name}.ks=[1]"
            )
    global_batch = cfg.trainer.batch_size * distributed.world_size() * cfg.trainer.get("accum_steps", 1)
    if len(train_set) < global_batch:
        raise ValueError(
            f"the training split holds {len(train_set)} images, fewer than one global batch of "
            f"{global_batch} (trainer.batch_size={cfg.trainer.batch_size} x processes x accum_steps); "
            "lower trainer.batch_size"
        )
