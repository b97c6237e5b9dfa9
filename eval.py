"""Evaluate a backbone with and without token merging.

    python eval.py                                 # SAM-B random weights: throughput + FLOPs
    python eval.py model=sam_h merge.ratio=0.3     # SAM-H, COCO mIoU + throughput
    python eval.py -m merge=none,cubist,tome,expedite merge.ratio=0.1,0.2,0.3
    torchrun --nproc_per_node=8 eval.py model=deit_b merge.loc=1 merge.r_h=1 merge.r_w=1

Every run writes results.json (status, resolved config, metrics, environment) to its run
directory. A failed job is recorded there too; a multirun carries on with its other jobs.
"""

import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from spatialmerge import distributed
from spatialmerge.data import DatasetLayoutError
from spatialmerge.models import CheckpointFormatError, CheckpointMismatchError, CheckpointNotFoundError
from spatialmerge.pipeline import format_summary, record, run_evaluation

log = logging.getLogger("eval")

# Mistakes a user can fix from the message alone: no traceback for these.
USER_ERRORS = (
    CheckpointNotFoundError,
    CheckpointMismatchError,
    CheckpointFormatError,
    DatasetLayoutError,
    ValueError,
    TypeError,
)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    distributed.init_from_env()
    logger = instantiate(cfg.logger) if distributed.is_main() else None
    started, status, error, outcome = time.time(), "failed", None, None
    try:
        if logger is not None:
            group = Path(hydra_cfg.sweep.dir).name if multirun else None
            config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            logger.start(run_dir, config, name=hydra_cfg.job.override_dirname or cfg.task_name, group=group)
        outcome = run_evaluation(cfg)
        status = "ok"
    except USER_ERRORS as err:
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


if __name__ == "__main__":
    main()
