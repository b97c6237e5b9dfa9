"""Shared by the training tests: a learnable toy ImageNet, a tiny DeiT, config and script runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

# Each class is one colour: a tiny model separates them within a few dozen steps.
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40))
SIDE = 32

TINY_MODEL = [
    "model=deit_t",
    "model.checkpoint=null",
    f"+model.image_size={SIDE}",
    "+model.patch_size=8",  # a 4x4 grid
    "+model.depth=2",
    f"+model.num_classes={len(COLOURS)}",
    "+model.embed_dim=32",
    "+model.num_heads=2",
]
# CubistMerge before block 1 removing one row and one column: 4x4 -> 3x3 patch tokens.
CUBIST = ["merge=cubist", "merge.loc=1", "merge.r_h=1", "merge.r_w=1"]
QUIET = [
    "evaluator=top1",
    "evaluator.top1.num_workers=0",
    "evaluator.top1.batch_size=16",
    "evaluator.top1.ks=[1,2]",
    "+evaluator.top1.progress=false",
    "trainer.num_workers=0",
    "trainer.progress=false",
    "logger=none",
    "device=cpu",
]


def write_colour_folder(root: Path, per_class: dict[str, int]) -> Path:
    """``root/<split>/class_<k>/<i>.png``: 32x32 images of class colour k with mild noise, so
    no two images are identical but the colour decides the class."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label, colour in enumerate(COLOURS):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.integers(-25, 26, (SIDE, SIDE, 3))
                pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def compose_train(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def tiny_train_config(data: Path, root: Path, *overrides: str) -> DictConfig:
    """The real train config with the tiny model on the colour data, quiet, on the CPU."""
    return compose_train(
        *TINY_MODEL, *CUBIST, *QUIET, f"dataset.root={data}", f"paths.root_dir={root}", *overrides
    )


def run_train_script(args: list[str], root: Path, torchrun: int = 0, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python train.py`` (or ``torchrun --nproc_per_node=<torchrun> train.py``) from the repo."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    return subprocess.run(
        [*launcher, "train.py", f"paths.root_dir={root}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
