"""Send a finished report to W&B, next to the sweep's own runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from spatialmerge.loggers import WandbLogger
from spatialmerge.loggers import sweep_group as name_sweep_group
from spatialmerge.reporting.table import COLUMN_KEYS

WANDB_TARGET = "spatialmerge.loggers.WandbLogger"


def wandb_config(results: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The ``logger`` config of the first job that logged to W&B, or None if none did."""
    for result in results:
        logger = (result.get("config") or {}).get("logger") or {}
        if logger.get("_target_") == WANDB_TARGET:
            return dict(logger)
    return None


def sweep_group(results: Sequence[Mapping[str, Any]], roots: Sequence[Path]) -> str | None:
    """The W&B group eval.py gave the sweep's jobs: ``logger.group`` if set, else the name
    :func:`spatialmerge.loggers.sweep_group` made from the sweep's ``multirun.yaml`` (the
    command line and sweep config Hydra saved beside the jobs)."""
    logger = wandb_config(results) or {}
    if logger.get("group"):
        return str(logger["group"])
    for root in roots:
        for saved in sorted(Path(root).rglob("multirun.yaml")):
            hydra_cfg = OmegaConf.load(saved).hydra
            return name_sweep_group(hydra_cfg, list(hydra_cfg.overrides.task), saved.parent)
    return None


def log_report(
    rows: Sequence[Mapping[str, Any]],
    logger_config: Mapping[str, Any],
    group: str | None,
    out_dir: Path,
    plot: Path | None,
) -> None:
    """Log the table (and the plot) as a W&B run named ``report`` in ``group``. The mode comes
    from the sweep's logger config, so an offline sweep gets an offline report."""
    options = {k: v for k, v in logger_config.items() if k != "_target_"}
    logger = WandbLogger(**options)
    logger.start(Path(out_dir), {"rows": len(rows)}, name="report", group=group)
    status = "failed"
    try:
        table = [[row.get(key) for key in COLUMN_KEYS] for row in rows]
        logger.log_table("report", list(COLUMN_KEYS), table)
        if plot is not None:
            logger.log_image("pareto", plot)
        status = "ok"
    finally:
        logger.finish(status)
