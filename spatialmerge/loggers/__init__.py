"""Where run metrics go besides results.json: a JSON-lines file, W&B, or nowhere."""

from spatialmerge.loggers.base import NullLogger, RunLogger, sweep_group
from spatialmerge.loggers.jsonl import JsonlLogger
from spatialmerge.loggers.wandb import WandbLogger

__all__ = ["JsonlLogger", "NullLogger", "RunLogger", "WandbLogger", "sweep_group"]
