"""Weights & Biases: one W&B run per job, config as ``config``, metrics as summary."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from spatialmerge.loggers.base import RunLogger, flatten

log = logging.getLogger(__name__)


def _resolve_mode(mode: str | None) -> str:
    """The W&B mode to use. With nothing configured and no credentials, online mode would fail
    (or prompt) at init; offline keeps the run and can be synced later with ``wandb sync``."""
    if mode is not None:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists():
        return "online"
    log.warning("W&B: no API key and no WANDB_MODE set; logging offline (sync later with `wandb sync`)")
    return "offline"


class WandbLogger(RunLogger):
    """Args:
    project: W&B project.
    entity: W&B entity (team or user); None uses the default.
    group: run group; None groups a sweep's jobs by their sweep directory.
    mode: online | offline | disabled; None: WANDB_MODE, else online with credentials, else
        offline with one warning.
    tags: run tags.
    """

    def __init__(
        self,
        project: str = "spatialmerge",
        entity: str | None = None,
        group: str | None = None,
        mode: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        self.project = project
        self.entity = entity
        self.group = group
        self.mode = mode
        self.tags = list(tags or [])
        self.run: Any = None

    def start(self, run_dir: Path, config: Mapping[str, Any], name: str, group: str | None) -> None:
        import wandb

        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group or group,
            name=name,
            mode=_resolve_mode(self.mode),
            dir=str(run_dir),
            config=dict(config),
            tags=self.tags,
            reinit="finish_previous",
        )

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(flatten(metrics), step=step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(flatten(metrics))

    def update_config(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.config.update(dict(values), allow_val_change=True)

    def rename(self, name: str) -> None:
        if self.run is not None:
            self.run.name = name

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def log_image(self, name: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path))})

    def finish(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "ok" else 1)
            self.run = None
