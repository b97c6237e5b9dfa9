"""Evaluate a backbone with and without token merging.

    python eval.py                                 # trained DINOv2 ViT-S/14 on 12 real photos
    python eval.py model=sam_b_random              # SAM-B random weights: throughput + FLOPs
    python eval.py experiment=sam_h_coco           # SAM-H, COCO mIoU merged and unmerged + throughput
    python eval.py -m merge=cubist,tome,expedite merge.ratio=0.1,0.2,0.3  # each job beside its unmerged model
    torchrun --nproc_per_node=8 eval.py model=deit_b merge.loc=1 merge.r_h=1 merge.r_w=1

Every run writes results.json (status, resolved config, metrics, environment) to its run
directory. A failed job is recorded there too; a multirun carries on with its other jobs.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from spatialmerge import distributed
from spatialmerge.jobs import run_job
from spatialmerge.pipeline import run_evaluation


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    def prepare(run_dir: Path) -> Path:
        distributed.init_from_env()  # a torchrun launch shards the datasets
        return run_dir

    run_job(cfg, lambda run_dir, logger: run_evaluation(cfg), prepare=prepare)


if __name__ == "__main__":
    main()
