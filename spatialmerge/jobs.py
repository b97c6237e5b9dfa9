"""What every entry point does around its work: the logger, results.json, one-line errors for
user mistakes, and exit codes that keep multiruns going."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from spatialmerge import distributed
from spatialmerge.data import DatasetLayoutError
from spatialmerge.loggers import RunLogger
from spatialmerge.models import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from spatialmerge.pipeline import format_summary, instantiate, record

# Mistakes a user can fix from the message alone: no traceback for these.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointNotFoundError,
    CheckpointMismatchError,
    CheckpointFormatError,
    DatasetLayoutError,
    ValueError,
    TypeError,
)

Work = Callable[[Path, "RunLogger | None"], dict[str, Any]]


def run_job(
    cfg: DictConfig,
    work: Work,
    prepare: Callable[[Path], Path] | None = None,
    user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
) -> None:
    """Run ``work(run_dir, logger)`` as one Hydra job.

    ``prepare(run_dir)`` runs first (e.g. joining torchrun) and may return the directory to use.
    Whatever happens, rank 0 writes results.json and finishes the logger (a W&B run left open
    would hang a multirun). A user mistake prints one ``error:`` line (the traceback with
    SPATIALMERGE_DEBUG=1) and exits 1 in a single run; a multirun records it and goes on.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    started, status, error, outcome = time.time(), "failed", None, None
    logger: RunLogger | None = None
    try:
        if prepare is not None:
            run_dir = prepare(run_dir)
        if distributed.is_main():
            logger = instantiate(cfg.logger)
            config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            group = Path(hydra_cfg.sweep.dir).name if multirun else None
            logger.start(run_dir, config, name=hydra_cfg.job.override_dirname or cfg.task_name, group=group)
        outcome = work(run_dir, logger)
        status = "ok"
    except user_errors as err:
        if os.environ.get("SPATIALMERGE_DEBUG"):
            raise
        error = f"{type(err).__name__}: {err}"
    except Exception as err:  # recorded, then re-raised: a bug deserves its traceback
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        if distributed.is_main():
            payload = record(run_dir, cfg, outcome, status, error, started)
            if logger is not None:
                logger.summary({"status": status, **payload["metrics"]})
                logger.finish(status)
            if status == "ok":
                print(format_summary(payload))
            print(f"results: {run_dir / 'results.json'}")
        distributed.cleanup()
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        if not multirun:
            sys.exit(1)
