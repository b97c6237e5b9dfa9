"""Glue between a composed ``train`` config and the components: device, model, data, fit, evaluate.

``train.py`` stays short by calling these; tests call them too, on composed configs.
"""

from __future__ import annotations

import json

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import spatialmerge
from spatialmerge import distributed
from spatialmerge.data.imagenet import eval_transform
from spatialmerge.loggers import RunLogger
from spatialmerge.pipeline import EvalContext, instantiate, merge_options, model_depth
from spatialmerge.training.config import TrainConfig
from spatialmerge.training.data import train_transform
from spatialmerge.training.trainer import Trainer

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
)


def run_identity(cfg: DictConfig, merge: dict[str, Any] | None) -> dict[str, Any]:
    """What a training run computes: model, weights, merge, data and every trainer setting that
    changes the result. A resume with different values would record a config the run never used."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    identity = {f"trainer.{k}": v for k, v in trainer.items() if k not in RESUMABLE_KEYS and k != "_target_"}
    identity.update({
        "model.name": cfg.model.get("name"),
        "model.checkpoint": cfg.model.get("checkpoint"),
        "merge": merge,
        "dataset.root": cfg.dataset.get("root"),
    })
    return json.loads(json.dumps(identity, default=str))


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
    merge = merge_options(cfg.merge, model_depth(model))
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
    seed_everything(settings.seed + distributed.rank())  # mixup and dropout differ per process
    result = Trainer(settings, run_dir, device, logger, identity=run_identity(cfg, merge)).fit(model, train_set)

    metrics: dict[str, Any] = {"train": result.metrics}
    candidates = {"": result.model} if result.ema is None else {"": result.model, "_ema": result.ema}
    for suffix, trained in candidates.items():
        ctx = EvalContext(trained, merge, str(device), lambda transform=None: val)
        for name, node in cfg.evaluator.items():
            if name == "throughput" and (suffix or not distributed.is_main()):
                continue  # timing is per device and weight-independent: rank 0, once
            log.info("running evaluator %s%s", name, suffix)
            start = time.perf_counter()
            metrics[name + suffix] = instantiate(node).run(ctx)
            metrics[name + suffix]["seconds"] = time.perf_counter() - start
    return {"merge": merge, "metrics": metrics, "notes": notes}
