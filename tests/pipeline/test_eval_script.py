"""eval.py as a user runs it: subprocesses, real configs, tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_SAM = [
    "model=sam_b_random",
    "+model.image_size=128",
    "+model.depth=2",
    "+model.embed_dim=32",
    "+model.num_heads=2",
    "+model.global_attn_indexes=[1]",
    "+model.window_size=4",
    "merge.loc=1",
    "evaluator.throughput.iters=1",
    "evaluator.throughput.warmup=0",
]


def run_eval(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **env}
    return subprocess.run(
        # Hydra's flags (-m) must come before the overrides.
        [sys.executable, "eval.py", *[a for a in args if a == "-m"], f"paths.root_dir={tmp_path}"]
        + [a for a in args if a != "-m"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )


def results_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("logs/eval/**/results.json"))


def test_default_run_prints_a_table_and_writes_results(tmp_path):
    done = run_eval(TINY_SAM, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "speed-up" in done.stdout and "cubist" in done.stdout and "baseline" in done.stdout
    assert "accuracy needs a checkpoint" in done.stdout
    (path,) = results_files(tmp_path)
    payload = json.loads(path.read_text())
    assert payload["status"] == "ok" and payload["model"] == "sam_b"
    rows = payload["metrics"]["throughput"]
    assert rows["baseline"]["tokens"] == 64 and rows["cubist"]["tokens"] == 49  # 8x8 -> 7x7
    assert rows["cubist"]["flop_speedup"] > 1.0
    assert payload["config"]["merge"]["method"] == "cubist"
    assert payload["environment"]["torch"] and payload["merge"]["loc"] == 1
    assert (path.parent / "metrics.jsonl").exists(), "the default jsonl logger writes beside it"


def test_bare_run_measures_the_trained_dinov2_on_real_photos(tmp_path):
    # the default command, made quick: two photos at 224 px, one timed round
    done = run_eval(
        ["dataset.names=[astronaut,coffee]", "model.img_size=224", "merge.loc=2", "merge.ratio=0.1",
         "evaluator.throughput.iters=1", "evaluator.throughput.warmup=0"],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model: dinov2_s" in done.stdout and "feature_cosine=" in done.stdout
    assert "random weights" not in done.stdout
    (path,) = results_files(tmp_path)
    payload = json.loads(path.read_text())
    fidelity = payload["metrics"]["fidelity"]
    assert fidelity["images"] == 2 and fidelity["kind"] == "features"
    # trained weights merge gently at 10% before block 2; random ones would not get near this
    assert fidelity["feature_cosine"] > 0.98 and fidelity["cls_cosine"] > 0.98
    rows = payload["metrics"]["throughput"]
    assert rows["baseline"]["tokens"] == 16 * 16 and rows["cubist"]["tokens"] == 14 * 14


def test_multirun_writes_one_results_file_per_job(tmp_path):
    done = run_eval(["-m", "merge=none,cubist", *TINY_SAM], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    payloads = [json.loads(p.read_text()) for p in results_files(tmp_path)]
    assert sorted(p["config"]["merge"]["method"] for p in payloads) == ["cubist", "none"]
    assert all(p["status"] == "ok" for p in payloads)


def test_missing_checkpoint_is_one_clear_message_and_nonzero_exit(tmp_path):
    done = run_eval(["model=sam_b"], tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    message = done.stderr
    assert str(tmp_path / "checkpoints" / "sam_vit_b_01ec64.pth") in message
    assert "model.checkpoint=" in message and "sam_vit_b_01ec64.pth" in message
    (path,) = results_files(tmp_path)
    assert json.loads(path.read_text())["status"] == "failed"


def test_accuracy_on_random_weights_is_refused(tmp_path):
    done = run_eval(["evaluator=segmentation", *TINY_SAM[:-2]], tmp_path)
    assert done.returncode == 1
    assert "needs trained weights" in done.stderr and "model.checkpoint=" in done.stderr


@pytest.mark.parametrize("mode", ["offline"])
def test_wandb_offline_writes_a_run_directory(tmp_path, mode):
    done = run_eval(["logger=wandb", *TINY_SAM], tmp_path, WANDB_MODE=mode)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = results_files(tmp_path)
    runs = list(path.parent.glob("wandb/offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
