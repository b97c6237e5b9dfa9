"""Fine-tune a classifier with token merging active, then evaluate it on the val split.

    python train.py model=deit_b merge=cubist merge.loc=1 merge.r_h=1 merge.r_w=1 \
        dataset=imagenet dataset.root=/data/imagenet trainer.epochs=1
    torchrun --nproc_per_node=8 train.py ...                 # same run on 8 GPUs
    python train.py experiment=deit_b_finetune dataset.root=... model.checkpoint=...
    python train.py ... trainer.resume=auto hydra.run.dir=logs/train/runs/<date>   # continue

The run directory gets checkpoints/, metrics.jsonl and results.json (status, resolved config,
training summary, evaluator metrics, environment); a failed run is recorded there too, and a
multirun carries on with its other jobs. Only rank 0 logs, prints and writes files.
"""

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
from spatialmerge.models import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from spatialmerge.pipeline import format_summary, record
from spatialmerge.training import (
    NonFiniteLossError,
    TrainingCheckpointError,
    TrainingInterrupted,
    run_training,
    setup_device,
    shared_run_dir,
)

# Mistakes a user can fix from the message alone: no traceback for these.
USER_ERRORS = (
    CheckpointNotFoundError,
    CheckpointMismatchError,
    CheckpointFormatError,
    DatasetLayoutError,
    TrainingCheckpointError,
    NonFiniteLossError,
    TrainingInterrupted,
    ValueError,
    TypeError,
)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    started, status, error, outcome, logger = time.time(), "failed", None, None, None
    try:
        device = setup_device(cfg.device)
        run_dir = shared_run_dir(run_dir)
        cfg.device = str(device)
        if distributed.is_main():
            logger = instantiate(cfg.logger)
            config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            group = Path(hydra_cfg.sweep.dir).name if multirun else None
            logger.start(run_dir, config, name=hydra_cfg.job.override_dirname or cfg.task_name, group=group)
        outcome = run_training(cfg, run_dir, device, logger)
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
