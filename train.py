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

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from spatialmerge.jobs import USER_ERRORS, run_job
from spatialmerge.training import (
    NonFiniteLossError,
    TrainingCheckpointError,
    TrainingInterrupted,
    run_training,
    setup_device,
    shared_run_dir,
)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    device: torch.device | None = None

    def prepare(run_dir: Path) -> Path:
        nonlocal device
        device = setup_device(cfg.device)  # joins torchrun when launched by it
        cfg.device = str(device)
        return shared_run_dir(run_dir)  # every rank writes into rank 0's directory

    run_job(
        cfg,
        lambda run_dir, logger: run_training(cfg, run_dir, device, logger),
        prepare=prepare,
        user_errors=USER_ERRORS + (TrainingCheckpointError, NonFiniteLossError, TrainingInterrupted),
        continues_run=lambda cfg: cfg.trainer.get("resume") is not None,
    )


if __name__ == "__main__":
    main()
