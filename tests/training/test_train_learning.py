"""With CubistMerge active the whole recipe learns: loss falls and val accuracy beats chance."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import COLOURS, tiny_train_config

from spatialmerge.adapters import runtime as base
from spatialmerge.loggers import RunLogger
from spatialmerge.training import run_training


class Recorder(RunLogger):
    def __init__(self) -> None:
        self.records: list[tuple[int | None, dict[str, Any]]] = []

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))


def test_a_tiny_deit_learns_with_cubist_merging_active(colour_imagenet: Path, tmp_path: Path, monkeypatch):
    merges: list[tuple[bool, tuple[int, ...]]] = []
    reduce_grid = base.reduce_grid

    def spy(method: str, grid: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out, record = reduce_grid(method, grid, *args, **kwargs)
        merges.append((out.requires_grad, tuple(out.shape)))
        return out, record

    monkeypatch.setattr(base, "reduce_grid", spy)
    cfg = tiny_train_config(
        colour_imagenet,
        tmp_path,
        "trainer.epochs=8",  # 64 images / 16 per step: 32 steps
        "trainer.batch_size=16",
        "trainer.lr=0.064",  # 1e-3 at this global batch of 16
        "trainer.warmup_steps=3",
        "trainer.mixup=0",
        "trainer.cutmix=0",
        "trainer.auto_augment=null",
        "trainer.reprob=0",
        "trainer.log_every=4",
        "trainer.checkpoint_every=null",
    )
    recorder = Recorder()
    outcome = run_training(cfg, tmp_path / "run", torch.device("cpu"), recorder)

    steps = [step for step, _ in recorder.records]
    assert steps == list(range(4, 33, 4))
    losses = [m["train/loss"] for _, m in recorder.records]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(m["train/img_s"] > 0 and m["train/lr"] > 0 for _, m in recorder.records)
    # The whole schedule (peak, floor) scales with the global batch: it ends at min_lr x 16 / 1024.
    assert recorder.records[-1][1]["train/lr"] == pytest.approx(1e-6 * 16 / 1024)

    metrics = outcome["metrics"]
    chance = 100 / len(COLOURS)
    assert metrics["top1"]["images"] == 16
    assert metrics["top1"]["top1"] >= 2 * chance, metrics
    assert metrics["train"]["steps"] == 32 and metrics["train"]["global_batch"] == 16
    assert metrics["train"]["peak_lr"] == 0.064 * 16 / 1024
    assert Path(metrics["train"]["checkpoint"]).name == "step_00000032.pt"

    # Every training batch ran merged (4x4 -> 3x3 patch grid) with gradients through the merge.
    assert outcome["merge"]["method"] == "cubist"
    training = [shape for grad, shape in merges if grad]
    assert len(training) == 32 and set(training) == {(16, 3, 3, 32)}


def test_gradient_accumulation_equals_the_larger_batch(colour_imagenet: Path, tmp_path: Path):
    common = ("trainer.max_steps=3", "trainer.lr=0.064", "trainer.mixup=0", "trainer.cutmix=0")
    finals = []
    for name, batch, accum in (("big", 16, 1), ("accumulated", 8, 2)):
        cfg = tiny_train_config(
            colour_imagenet, tmp_path / name, *common, f"trainer.batch_size={batch}", f"trainer.accum_steps={accum}"
        )
        outcome = run_training(cfg, tmp_path / name / "run", torch.device("cpu"))
        assert outcome["metrics"]["train"]["global_batch"] == 16
        finals.append(torch.load(outcome["metrics"]["train"]["checkpoint"], weights_only=True)["model"])
    for key, value in finals[0].items():
        torch.testing.assert_close(finals[1][key], value, atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize(
    "options",
    [
        ("trainer.amp=bf16",),
        ("trainer.amp=fp16",),
        ("trainer.clip_grad=1.0", "trainer.ema_decay=0.99"),
    ],
)
def test_recipe_variants_train_and_save_their_state(colour_imagenet: Path, tmp_path: Path, options):
    cfg = tiny_train_config(colour_imagenet, tmp_path, "trainer.max_steps=2", "trainer.batch_size=16", *options)
    outcome = run_training(cfg, tmp_path / "run", torch.device("cpu"))
    assert math.isfinite(outcome["metrics"]["train"]["loss"])
    state = torch.load(outcome["metrics"]["train"]["checkpoint"], weights_only=True)
    assert bool(state["scaler"]) == ("trainer.amp=fp16" in options)  # a GradScaler only for fp16
    assert (state["ema"] is not None) == ("trainer.ema_decay=0.99" in options)
    if state["ema"] is not None:
        assert "top1_ema" in outcome["metrics"]
