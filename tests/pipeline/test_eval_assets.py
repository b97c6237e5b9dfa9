"""eval.py end to end with real assets: a checkpoint file and a dataset on disk (all synthetic),
in one process and under a 2-process torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.synthetic import write_synthetic_coco, write_synthetic_imagefolder
from spatialmerge.models import build_model

pytestmark = pytest.mark.slow  # subprocess runs / real weights: outside the fast tier

ROOT = Path(__file__).resolve().parents[2]
TINY_SAM = {"image_size": 128, "depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": [1], "window_size": 4}
TINY_DEIT = {"image_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 3}


def overrides(arch: dict) -> list[str]:
    return [f"+model.{k}={json.dumps(v).replace(' ', '')}" for k, v in arch.items()]


def run(args: list[str], tmp_path: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*launcher, "eval.py", f"paths.root_dir={tmp_path}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def only_results(tmp_path: Path) -> dict:
    (path,) = tmp_path.glob("logs/eval/**/results.json")
    return json.loads(path.read_text())


def test_sam_coco_miou_and_throughput_with_a_checkpoint(tmp_path):
    checkpoint = tmp_path / "sam.pth"
    torch.save(build_model("sam_b", **TINY_SAM).state_dict(), checkpoint)
    coco = write_synthetic_coco(str(tmp_path / "coco"))
    done = run(
        ["model=sam_b", f"model.checkpoint={checkpoint}", f"dataset.root={coco}", "merge.loc=1",
         "merge.ratio=0.25", "evaluator.throughput.iters=1", "evaluator.miou.num_workers=0",
         *overrides(TINY_SAM)],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = only_results(tmp_path)["metrics"]
    assert metrics["miou"]["instances"] == 4 and metrics["miou"]["images"] == 2
    assert 0 <= metrics["miou"]["miou"] <= 100
    assert metrics["throughput"]["cubist"]["tokens"] == 36  # 8x8 -> 6x6
    assert "miou" in done.stdout


def test_missing_dataset_is_one_clear_message(tmp_path):
    checkpoint = tmp_path / "sam.pth"
    torch.save(build_model("sam_b", **TINY_SAM).state_dict(), checkpoint)
    done = run(["model=sam_b", f"model.checkpoint={checkpoint}", *overrides(TINY_SAM)], tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert str(tmp_path / "data" / "coco") in done.stderr and "dataset.root=" in done.stderr


def test_imagenet_top1_under_torchrun_equals_one_process(tmp_path):
    checkpoint = tmp_path / "deit.pth"
    torch.manual_seed(0)
    torch.save(build_model("deit_t", **TINY_DEIT).state_dict(), checkpoint)
    imagenet = write_synthetic_imagefolder(str(tmp_path / "imagenet"), counts=(3, 2, 2), size=(36, 40))
    args = ["model=deit_t", f"model.checkpoint={checkpoint}", f"dataset.root={imagenet}", "merge.loc=1",
            "merge.r_h=1", "merge.r_w=1", "evaluator=top1", "evaluator.top1.num_workers=0",
            "evaluator.top1.batch_size=2", "evaluator.top1.ks=[1,2]", *overrides(TINY_DEIT)]
    one = run([*args, "hydra.run.dir=" + str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([*args, "hydra.run.dir=" + str(tmp_path / "two")], tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    single = json.loads((tmp_path / "one" / "results.json").read_text())["metrics"]["top1"]
    double = json.loads((tmp_path / "two" / "results.json").read_text())["metrics"]["top1"]
    assert single["images"] == double["images"] == 7
    assert single["top1"] == double["top1"] and single["top2"] == double["top2"]
