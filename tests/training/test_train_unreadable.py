"""Unreadable training images: by default the run stops naming the file and both fixes; with
``trainer.skip_corrupt_images=true`` each one is replaced by the next readable image, counted
and named in the record, and a killed run resumes to the same weights and the same count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import CUBIST, QUIET, TINY_MODEL, run_train_script, tiny_train_config, write_colour_folder

from spatialmerge.data import CorruptImageError
from spatialmerge.training import TrainingInterrupted, UnreadableImages, run_training

CPU = torch.device("cpu")
# 16 images, a batch of 4 and 2 epochs: every image (the broken one too) is drawn in each epoch.
SHORT = ("trainer.epochs=2", "trainer.batch_size=4", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=8")


@pytest.fixture
def broken_data(tmp_path: Path) -> tuple[Path, Path]:
    """4 train images per class, one of them a truncated PNG; returns (root, broken file)."""
    root = write_colour_folder(tmp_path / "data", {"train": 4, "val": 1})
    broken = root / "train" / "class_2" / "1.png"
    broken.write_bytes(broken.read_bytes()[:60])
    return root, broken


def train(data: Path, run: Path, *overrides: str) -> dict:
    cfg = tiny_train_config(data, run.parent, *SHORT, *overrides)
    return run_training(cfg, run, CPU)


@pytest.mark.parametrize("workers", [0, 2])
def test_by_default_an_unreadable_image_stops_the_run_naming_it_and_both_fixes(broken_data, tmp_path, workers):
    data, broken = broken_data
    with pytest.raises(CorruptImageError) as err:
        train(data, tmp_path / "run", f"trainer.num_workers={workers}")
    message = str(err.value)
    assert f"cannot read image {broken}" in message
    assert "replace or remove the file" in message and "trainer.skip_corrupt_images=true" in message


@pytest.mark.slow
def test_train_py_prints_the_unreadable_file_in_one_line(broken_data, tmp_path):
    data, broken = broken_data
    args = [*TINY_MODEL, *CUBIST, *QUIET, *SHORT, f"dataset.root={data}", "trainer.num_workers=2"]
    done = run_train_script(args, tmp_path)
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert str(broken) in line and "trainer.skip_corrupt_images=true" in line
    assert "Traceback" not in done.stderr


def test_skipping_replaces_counts_and_names_each_unreadable_file(broken_data, tmp_path):
    data, broken = broken_data
    outcome = train(data, tmp_path / "run", "trainer.skip_corrupt_images=true")
    summary = outcome["metrics"]["train"]
    # drawn once per epoch, counted once
    assert summary["skipped_images"] == 1 and summary["skipped_files"] == [str(broken)]
    assert summary["steps"] == 8  # 2 epochs of 16 / 4: every batch kept its size
    (note,) = [n for n in outcome["notes"] if "unreadable" in n]
    assert note.startswith("1 unreadable training image(s)") and "skip_corrupt_images=true" in note


def test_a_clean_run_reports_no_skipped_file(tmp_path):
    data = write_colour_folder(tmp_path / "data", {"train": 4, "val": 1})
    summary = train(data, tmp_path / "run", "trainer.skip_corrupt_images=true")["metrics"]["train"]
    assert summary["skipped_images"] == 0 and summary["skipped_files"] == []


def test_a_run_stopped_by_an_unreadable_image_resumes_with_skipping_to_the_same_weights(broken_data, tmp_path):
    data, broken = broken_data
    whole = train(data, tmp_path / "whole", "trainer.skip_corrupt_images=true")
    with pytest.raises(TrainingInterrupted):
        train(data, tmp_path / "killed", "trainer.skip_corrupt_images=true", "trainer.stop_after_steps=5")
    resumed = train(data, tmp_path / "killed", "trainer.skip_corrupt_images=true", "trainer.resume=auto")
    final = {
        name: torch.load(tmp_path / name / "checkpoints" / "step_00000008.pt", weights_only=True)
        for name in ("whole", "killed")
    }
    for key, value in final["whole"]["model"].items():
        assert torch.equal(value, final["killed"]["model"][key]), key
    assert final["killed"]["skipped_images"] == [str(broken)]
    assert resumed["metrics"]["train"]["skipped_images"] == whole["metrics"]["train"]["skipped_images"] == 1


def test_the_replacement_is_the_next_readable_image_and_all_unreadable_is_refused(tmp_path):
    class Items:
        def __init__(self, broken: set[int]) -> None:
            self.broken = broken

        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> tuple[str, int]:
            if index in self.broken:
                raise CorruptImageError(f"cannot read image {index}.png", f"{index}.png")
            return f"image {index}", index

    skipping = UnreadableImages(Items({1, 2}), skip=True)
    assert skipping[0] == ("image 0", 0, "")
    assert skipping[1] == ("image 3", 3, "1.png\n2.png")
    assert skipping[3] == ("image 3", 3, "")
    with pytest.raises(CorruptImageError, match="none of the 4 training images can be read"):
        UnreadableImages(Items({0, 1, 2, 3}), skip=True)[2]
    with pytest.raises(CorruptImageError, match="skip_corrupt_images=true"):
        UnreadableImages(Items({1}))[1]


@pytest.mark.parametrize("value", ["maybe", "1"])
def test_the_skip_option_takes_only_true_or_false(tmp_path, value):
    data = write_colour_folder(tmp_path / "data", {"train": 4, "val": 1})
    with pytest.raises(ValueError, match=f"trainer.skip_corrupt_images={value!r} must be true or false"):
        train(data, tmp_path / "run", f"trainer.skip_corrupt_images='{value}'")
