"""train.py as a user runs it: one process, two gloo processes under torchrun, kill and resume in
place through Hydra's run directory, and a diverging run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import CUBIST, QUIET, ROOT, TINY_MODEL, run_train_script

pytestmark = pytest.mark.slow  # subprocess runs / real weights: outside the fast tier

# Mixup pairs images within a process's batch, so it is off here: with it on, one process of 16
# and two of 8 would mix different pairs. Everything else in the recipe stays on.
TINY_RUN = [
    *TINY_MODEL,
    *CUBIST,
    *QUIET,
    "logger=jsonl",
    "trainer.mixup=0",
    "trainer.cutmix=0",
    "trainer.max_steps=4",
    "trainer.lr=0.064",
    "trainer.log_every=1",
    "trainer.checkpoint_every=2",
]
GLOBAL_BATCH = 16


def results(root: Path) -> list[Path]:
    return sorted(root.glob("**/results.json"))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "step_00000004.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def single_process(colour_imagenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted one-process run the others are compared with; returns its run dir."""
    root = tmp_path_factory.mktemp("single")
    done = run_train_script(
        [*TINY_RUN, f"dataset.root={colour_imagenet}", f"trainer.batch_size={GLOBAL_BATCH}"], root
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = results(root)
    return path.parent


def test_one_process_writes_results_checkpoint_and_metrics(single_process: Path):
    payload = json.loads((single_process / "results.json").read_text())
    assert payload["status"] == "ok" and payload["config"]["device"] == "cpu"
    train = payload["metrics"]["train"]
    assert train["steps"] == 4 and train["global_batch"] == GLOBAL_BATCH
    assert train["checkpoint"] == str(single_process / "checkpoints" / "step_00000004.pt")
    assert payload["metrics"]["top1"]["images"] == 16
    events = [json.loads(line) for line in (single_process / "metrics.jsonl").read_text().splitlines()]
    logged = [e for e in events if e["event"] == "log"]
    assert [e["step"] for e in logged] == [1, 2, 3, 4]
    assert {"train/loss", "train/lr", "train/img_s"} <= set(logged[0]["metrics"])
    assert events[-2]["event"] == "summary" and "top1" in events[-2]["metrics"]
    assert events[-1] == {**events[-1], "event": "finish", "status": "ok"}


def test_two_torchrun_processes_match_one(colour_imagenet: Path, tmp_path: Path, single_process: Path):
    done = run_train_script(
        [*TINY_RUN, f"dataset.root={colour_imagenet}", f"trainer.batch_size={GLOBAL_BATCH // 2}"],
        tmp_path,
        torchrun=2,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = results(tmp_path)  # only rank 0 wrote one
    assert done.stdout.count("results: ") == 1
    two = json.loads(path.read_text())["metrics"]
    one = json.loads((single_process / "results.json").read_text())["metrics"]
    assert two["train"]["global_batch"] == one["train"]["global_batch"] == GLOBAL_BATCH
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], abs=1e-4)
    assert two["top1"]["top1"] == one["top1"]["top1"] and two["top1"]["images"] == 16
    # Same images, same augmentations, gradients averaged over the same global batch.
    weights, reference = final_weights(path.parent), final_weights(single_process)
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, atol=1e-4, rtol=1e-4, msg=name)
    starts = [line for line in (path.parent / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 1


def test_a_run_killed_mid_epoch_resumes_in_place_to_the_same_weights(
    colour_imagenet: Path, tmp_path: Path, single_process: Path
):
    run_dir = tmp_path / "run"
    args = [
        *TINY_RUN,
        f"dataset.root={colour_imagenet}",
        f"trainer.batch_size={GLOBAL_BATCH}",
        f"hydra.run.dir={run_dir}",
    ]
    killed = run_train_script([*args, "trainer.stop_after_steps=3"], tmp_path)
    assert killed.returncode == 1 and "stopped after step 3" in killed.stderr
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"

    # refused attempts leave the unfinished run's files as they were, byte for byte
    files = {path: path.read_bytes() for path in [run_dir / "results.json", *(run_dir / ".hydra").iterdir()]}
    changed = run_train_script([*args, "+model.drop_path_rate=0.5", "trainer.resume=auto"], tmp_path)
    assert changed.returncode == 1 and "Traceback" not in changed.stderr
    assert "records a run with other settings (model.drop_path_rate '<unset>' -> 0.5)" in changed.stderr
    evaluation = subprocess.run(
        [sys.executable, "eval.py", f"paths.root_dir={tmp_path}", "logger=none", "+trainer.resume=auto",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
        capture_output=True, text=True, timeout=120,
    )
    assert evaluation.returncode == 1 and "already records another run" in evaluation.stderr
    assert "continue that unfinished training run with train.py" in evaluation.stderr
    assert {path: path.read_bytes() for path in files} == files

    resumed = run_train_script([*args, "trainer.resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"
    # step 3 was logged before the kill and again after resuming from step 2: it counts once
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "log"] == [1, 2, 3, 4]
    assert [e["step"] for e in events if e["event"] == "resume"] == [2]
    weights, reference = final_weights(run_dir), final_weights(single_process)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_a_diverging_run_stops_with_one_clear_message(colour_imagenet: Path, tmp_path: Path):
    done = run_train_script(
        [*TINY_RUN, f"dataset.root={colour_imagenet}", "trainer.batch_size=16", "trainer.lr=1e12"], tmp_path
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "NonFiniteLossError" in done.stderr and "Lower trainer.lr" in done.stderr
    (path,) = results(tmp_path)
    assert json.loads(path.read_text())["status"] == "failed"


def test_training_into_a_finished_run_without_resume_leaves_its_record_alone(
    single_process: Path, colour_imagenet: Path, tmp_path: Path
):
    record = single_process / "results.json"
    before = record.read_text()
    again = run_train_script(
        [*TINY_RUN, f"dataset.root={colour_imagenet}", f"hydra.run.dir={single_process}"], tmp_path
    )
    assert again.returncode == 1
    assert "already records another run" in again.stderr
    assert "trainer.resume" not in again.stderr, "a finished run is not offered a resume"
    assert record.read_text() == before, "the finished run's record was rewritten"
    resumed = run_train_script(
        [*TINY_RUN, f"dataset.root={colour_imagenet}", f"hydra.run.dir={single_process}", "trainer.resume=auto"],
        tmp_path,
    )
    assert resumed.returncode == 1 and "records a finished training run (status ok)" in resumed.stderr
    assert record.read_text() == before, "a resume rewrote the finished run's record"
