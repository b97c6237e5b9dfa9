"""Worker of the multi-process evaluation test: run evaluators under torchrun, write the results.

    torchrun --standalone --nproc_per_node=2 distributed_eval_worker.py JOBS.pt OUT_DIR

JOBS.pt (torch.save) maps a name to an (evaluator, model, dataset) triple. Each rank writes
OUT_DIR/rank<r>.json with its world size, backend, shard and every job's returned result.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from spatialmerge import distributed


def main(jobs_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks share two cores
    distributed.init_from_env()
    try:
        jobs = torch.load(jobs_path, weights_only=False)
        results = {
            name: evaluator.evaluate(model, dataset)
            for name, (evaluator, model, dataset) in jobs.items()
        }
        report = {
            "world": distributed.world_size(),
            "backend": str(dist.get_backend()),
            "shards": {
                name: distributed.shard_indices(len(dataset))
                for name, (_, _, dataset) in jobs.items()
            },
            "results": results,
        }
        path = os.path.join(out_dir, f"rank{distributed.rank()}.json")
        with open(path, "w") as f:
            json.dump(report, f)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
