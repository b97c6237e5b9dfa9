"""Two gloo processes started by torchrun return the numbers one process does, from disjoint
shards covering every image once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import Sam
from torch import nn
from torchvision.datasets import ImageFolder

import spatialmerge
from spatialmerge.data import CocoInstances
from spatialmerge.evaluators import MIoUEvaluator, Top1Evaluator

pytestmark = pytest.mark.slow  # subprocess runs / real weights: outside the fast tier

WORKER = Path(__file__).with_name("distributed_eval_worker.py")


def test_two_gloo_ranks_match_one_process(
    tmp_path: Path,
    tiny_imagenet: ImageFolder,
    tiny_deit: nn.Module,
    coco_root: Path,
    tiny_sam: Sam,
) -> None:
    top1 = Top1Evaluator(batch_size=2, num_workers=0, progress=False, ks=(1, 2))
    miou = MIoUEvaluator(num_workers=0, progress=False)
    jobs = {
        "top1": (top1, tiny_deit, tiny_imagenet),
        "miou": (miou, tiny_sam, CocoInstances(str(coco_root))),
    }
    torch.save(jobs, tmp_path / "jobs.pt")
    single = {name: ev.evaluate(model, data) for name, (ev, model, data) in jobs.items()}

    repo = str(Path(spatialmerge.__file__).parents[1])
    python_path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(tmp_path / "jobs.pt"),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert (report["world"], report["backend"]) == (2, "gloo")
        assert report["results"]["top1"] == single["top1"]  # counts: exact
        assert report["results"]["miou"] == pytest.approx(single["miou"])  # float sums
    # 7 images split 4 + 3 and 2 images 1 + 1: disjoint, complete, nothing padded.
    assert [r["shards"]["top1"] for r in reports] == [[0, 2, 4, 6], [1, 3, 5]]
    assert [r["shards"]["miou"] for r in reports] == [[0], [1]]
