"""Faults: a killed and resumed run reaches the uninterrupted run's exact state; bad checkpoints
and a diverging loss stop with a message naming the problem."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from train_helpers import CUBIST, QUIET, TINY_MODEL, compose_train, tiny_train_config, write_colour_folder

from spatialmerge.training import (
    NonFiniteLossError,
    TrainingCheckpointError,
    TrainingInterrupted,
    TrainingRecordGuard,
    newest_checkpoint,
    run_training,
)
from spatialmerge.training import trainer as trainer_module

CPU = torch.device("cpu")
# The full recipe (RandAugment, random erasing, mixup / cutmix, label smoothing, EMA), so every
# random stream has to come back; 4 steps per epoch, so the kill lands mid-epoch and the resumed
# run crosses an epoch boundary.
RECIPE = (
    "trainer.epochs=2",
    "trainer.max_steps=6",
    "trainer.batch_size=16",
    "trainer.lr=0.064",
    "trainer.warmup_steps=2",
    "trainer.checkpoint_every=2",
    "trainer.keep_checkpoints=5",
    "trainer.ema_decay=0.9",
    "evaluator=top1",
)


def train(data: Path, root: Path, *overrides: str) -> dict:
    cfg = tiny_train_config(data, root, *RECIPE, *overrides)
    return run_training(cfg, root / "run", CPU)


def checkpoint(root: Path, step: int) -> dict:
    return torch.load(root / "run" / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)


def assert_same_tensors(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize("workers", [0, 2])
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(colour_imagenet, tmp_path, workers):
    loader = f"trainer.num_workers={workers}"
    whole = train(colour_imagenet, tmp_path / "whole", loader)

    with pytest.raises(TrainingInterrupted, match="trainer.resume=auto"):
        train(colour_imagenet, tmp_path / "killed", loader, "trainer.stop_after_steps=3")
    # Killed after step 3: only the step-2 checkpoint exists, mid-epoch 0.
    assert newest_checkpoint(tmp_path / "killed" / "run" / "checkpoints").name == "step_00000002.pt"
    resumed = train(colour_imagenet, tmp_path / "killed", loader, "trainer.resume=auto")

    final_whole, final_resumed = checkpoint(tmp_path / "whole", 6), checkpoint(tmp_path / "killed", 6)
    for part in ("model", "optimizer", "scheduler", "scaler", "ema", "rng", "step", "plan"):
        assert_same_tensors(final_whole[part], final_resumed[part], part)
    assert resumed["metrics"]["top1"]["top1"] == whole["metrics"]["top1"]["top1"]
    assert resumed["metrics"]["train"]["loss"] == whole["metrics"]["train"]["loss"]


def test_checkpoints_hold_every_state_and_load_with_weights_only(colour_imagenet, tmp_path):
    train(colour_imagenet, tmp_path, "trainer.max_steps=2", "trainer.keep_checkpoints=1")
    (only,) = (tmp_path / "run" / "checkpoints").glob("*.pt")
    state = torch.load(only, weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "step", "epoch", "rng"} <= set(state)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (2, 0, 2)
    (rng,) = state["rng"]  # one entry per process
    assert {"torch", "numpy", "python"} <= set(rng)
    assert not list((tmp_path / "run" / "checkpoints").glob(".*")), "no temporary file is left"


def test_a_corrupt_checkpoint_is_named_in_a_clear_error(colour_imagenet, tmp_path):
    train(colour_imagenet, tmp_path, "trainer.max_steps=2")
    newest = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a truncated file
    with pytest.raises(TrainingCheckpointError, match="corrupt") as err:
        train(colour_imagenet, tmp_path, "trainer.max_steps=4", "trainer.resume=auto")
    assert str(newest) in str(err.value)


def test_a_checkpoint_for_another_model_is_named_in_a_clear_error(colour_imagenet, tmp_path):
    train(colour_imagenet, tmp_path / "small", "trainer.max_steps=2")
    other = tmp_path / "small" / "run" / "checkpoints" / "step_00000002.pt"
    with pytest.raises(TrainingCheckpointError, match="do not fit this model") as err:
        train(colour_imagenet, tmp_path / "wide", "model.embed_dim=64", f"trainer.resume={other}")
    assert str(other) in str(err.value) and "shape mismatch" in str(err.value)


def test_resuming_with_another_global_batch_is_refused(colour_imagenet, tmp_path):
    train(colour_imagenet, tmp_path, "trainer.max_steps=2")
    with pytest.raises(TrainingCheckpointError, match="global_batch 16 -> 8"):
        train(colour_imagenet, tmp_path, "trainer.batch_size=8", "trainer.resume=auto")


def test_resuming_with_another_merge_lr_or_seed_is_refused(colour_imagenet, tmp_path):
    train(colour_imagenet, tmp_path, "trainer.max_steps=2")
    with pytest.raises(TrainingCheckpointError, match=r"trainer.lr 0.064 -> 0.1") as err:
        train(colour_imagenet, tmp_path, "trainer.max_steps=2", "trainer.lr=0.1", "trainer.resume=auto")
    assert "other settings" in str(err.value)
    with pytest.raises(TrainingCheckpointError, match=r"trainer.seed 0 -> 7"):
        train(colour_imagenet, tmp_path, "trainer.max_steps=2", "trainer.seed=7", "trainer.resume=auto")
    with pytest.raises(TrainingCheckpointError, match=r"merge \{.*'reduce': 'maxmag'.* -> \{.*'reduce': 'mean'"):
        train(colour_imagenet, tmp_path, "trainer.max_steps=2", "merge.reduce=mean", "trainer.resume=auto")
    # a model option added on resume changes what is trained too
    with pytest.raises(TrainingCheckpointError, match=r"model.drop_path_rate '<unset>' -> 0.5"):
        train(colour_imagenet, tmp_path, "trainer.max_steps=2", "+model.drop_path_rate=0.5", "trainer.resume=auto")


@pytest.mark.parametrize(
    ("override", "change"),
    [
        ("trainer.lr=0.1", "trainer.lr 0.064 -> 0.1"),
        ("merge.reduce=mean", "merge.reduce 'maxmag' -> 'mean'"),
        ("+model.drop_path_rate=0.5", "model.drop_path_rate '<unset>' -> 0.5"),
        ("dataset.root=/elsewhere", "dataset.root"),
    ],
)
def test_train_py_refuses_a_resume_with_other_settings_before_writing(tmp_path, override, change):
    """The training guard compares the recorded config with the asked one before Hydra writes."""
    asked = tiny_train_config(tmp_path / "data", tmp_path, *RECIPE, "trainer.resume=auto")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"status": "interrupted", "config": OmegaConf.to_container(asked, resolve=True)}
    (run_dir / "results.json").write_text(json.dumps(record))
    TrainingRecordGuard().check_resume(run_dir, asked)  # the same settings continue
    TrainingRecordGuard().check_resume(run_dir, tiny_train_config(
        tmp_path / "data", tmp_path, *RECIPE, "trainer.resume=auto", "trainer.num_workers=3", "trainer.progress=true"
    ))  # how it runs may change
    other = tiny_train_config(tmp_path / "data", tmp_path, *RECIPE, "trainer.resume=auto", override)
    with pytest.raises(TrainingCheckpointError, match=rf"records a run with other settings \({re.escape(change)}"):
        TrainingRecordGuard().check_resume(run_dir, other)


def test_identities_compare_every_key_and_older_ones_the_keys_both_have():
    from spatialmerge.training.trainer import IDENTITY_VERSION_KEY, identity_changes

    saved = {IDENTITY_VERSION_KEY: 2, "model.name": "deit_t", "model.depth": 2}
    assert identity_changes(saved, {**saved}) == []
    assert identity_changes(saved, {**saved, "model.drop_path_rate": 0.5}) == ["model.drop_path_rate '<unset>' -> 0.5"]
    assert identity_changes(saved, {IDENTITY_VERSION_KEY: 2, "model.name": "deit_t"}) == ["model.depth 2 -> '<unset>'"]
    older = {"model.name": "deit_t", "trainer.lr": 0.1}  # written before identities named every key
    assert identity_changes(older, {**older, "model.depth": 2, IDENTITY_VERSION_KEY: 2}) == []
    assert identity_changes(older, {**older, "trainer.lr": 0.2}) == ["trainer.lr 0.1 -> 0.2"]


def test_a_fresh_run_refuses_to_mix_with_old_checkpoints(colour_imagenet, tmp_path):
    train(colour_imagenet, tmp_path, "trainer.max_steps=2")
    with pytest.raises(ValueError, match="trainer.resume=auto"):
        train(colour_imagenet, tmp_path, "trainer.max_steps=2")


def test_a_nan_loss_stops_before_the_weights_change(colour_imagenet, tmp_path, monkeypatch):
    build = trainer_module.mixup_and_criterion

    class NanAtStep3(nn.Module):
        def __init__(self, criterion: nn.Module) -> None:
            super().__init__()
            self.criterion, self.calls = criterion, 0

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            loss = self.criterion(logits, target)
            return loss * float("nan") if self.calls == 3 else loss

    def with_nan(config, num_classes):
        mixup, criterion = build(config, num_classes)
        return mixup, NanAtStep3(criterion)

    trained: list[nn.Module] = []
    fit = trainer_module.Trainer.fit

    def keep_model(self, model, data):
        trained.append(model)
        return fit(self, model, data)

    monkeypatch.setattr(trainer_module, "mixup_and_criterion", with_nan)
    monkeypatch.setattr(trainer_module.Trainer, "fit", keep_model)
    with pytest.raises(NonFiniteLossError) as err:
        train(colour_imagenet, tmp_path, "trainer.max_steps=6")
    message = str(err.value)
    assert "nan at step 3" in message and "trainer.lr" in message and "bf16" in message
    assert "step_00000002.pt" in message  # where to go back to
    assert newest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000002.pt"
    # The weights are still those of step 2: the NaN step changed nothing.
    assert_same_tensors(trained[0].state_dict(), checkpoint(tmp_path, 2)["model"])


def test_a_missing_val_split_fails_before_any_training(tmp_path):
    data = write_colour_folder(tmp_path / "data", {"train": 4})
    with pytest.raises(FileNotFoundError, match="val"):
        train(data, tmp_path)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_classes=5"], r"the model has 5 classes but the data has 4 class folders; set \+\+model.num_classes=4"),
        (["model.num_classes=3"], r"the model has 3 classes but the data has 4"),
        (["evaluator.top1.ks=[1,5]"], r"evaluator.top1.ks=\[1, 5\] asks for top-5 of 4 classes"),
        (["trainer.batch_size=128"], r"holds 64 images, fewer than one global batch of 128"),
        # the tiny model's 8-px patches, not deit_t's 16
        (["model.image_size=36"], r"model.image_size=36 for 'deit_t' is not a multiple of its 8-px patches; the nearest valid sizes are 32 and 40"),
        (["merge.r_h=3"], r"r_h=3 is out of range for a side of 4 tokens"),
    ],
)
def test_mismatched_classes_ks_batch_size_or_schedule_fail_before_the_first_step(colour_imagenet, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(colour_imagenet, tmp_path, *overrides)
    assert not (tmp_path / "run" / "checkpoints").exists(), "no step was taken"


def test_the_default_top5_is_checked_against_the_classes_before_the_first_step(colour_imagenet, tmp_path):
    """top1.yaml's own ks=[1, 5] (no ks override) on 4 classes, refused with a fix Hydra takes."""
    quiet = [o for o in QUIET if not o.startswith("evaluator.top1.ks=")]
    overrides = [*TINY_MODEL, *CUBIST, *quiet, f"dataset.root={colour_imagenet}", f"paths.root_dir={tmp_path}"]
    defaults = compose_train(*overrides)
    assert list(defaults.evaluator.top1.ks) == [1, 5]
    with pytest.raises(ValueError, match=r"evaluator.top1.ks=\[1, 5\] asks for top-5 of 4 classes; use ks up "
                                         r"to 4, e.g. evaluator.top1.ks=\[1\]"):
        run_training(defaults, tmp_path / "run", CPU)
    assert not (tmp_path / "run" / "checkpoints").exists(), "no step was taken"
    fixed = compose_train(*overrides, "evaluator.top1.ks=[1]")  # the suggested override composes
    assert list(fixed.evaluator.top1.ks) == [1]


def test_train_and_val_class_folders_must_match(tmp_path):
    data = write_colour_folder(tmp_path / "data", {"train": 4, "val": 1})
    (data / "val" / "class_3").rename(data / "val" / "class_9")
    with pytest.raises(ValueError, match=r"train only: \['class_3'\], val only: \['class_9'\]"):
        train(data, tmp_path)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_failing_evaluation_keeps_the_training_metrics(colour_imagenet, tmp_path, monkeypatch):
    from spatialmerge.evaluators import Top1Evaluator

    def broken(self, ctx):
        raise ValueError("the val split could not be read")

    monkeypatch.setattr(Top1Evaluator, "run", broken)
    with pytest.raises(ValueError, match="could not be read") as err:
        train(colour_imagenet, tmp_path, "trainer.max_steps=2")
    kept = err.value.partial_outcome["metrics"]["train"]
    assert kept["steps"] == 2 and "loss" in kept
