"""The train config, every trainer option and the fine-tune experiment compose and instantiate."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from train_helpers import CONFIGS, compose_train

from spatialmerge.adapters.config import merge_options
from spatialmerge.training import TrainConfig


def trainer_options() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml"))


def test_the_default_train_config_is_the_deit_recipe():
    cfg = compose_train()
    assert cfg.task_name == "train"
    assert cfg.model.name == "deit_b" and cfg.merge.method == "cubist"
    assert cfg.dataset._target_ == "spatialmerge.data.imagenet_dataset"
    assert cfg.logger._target_ == "spatialmerge.loggers.JsonlLogger"
    assert set(cfg.evaluator) == {"top1", "throughput"}  # deit_b's own choice
    recipe = instantiate(cfg.trainer)
    assert isinstance(recipe, TrainConfig)
    assert (recipe.opt, recipe.sched, recipe.weight_decay) == ("adamw", "cosine", 0.05)
    assert (recipe.mixup, recipe.cutmix, recipe.smoothing, recipe.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert recipe.auto_augment == "rand-m9-mstd0.5-inc1"
    assert recipe.ema_decay is None and recipe.resume is None


@pytest.mark.parametrize("name", trainer_options())
def test_every_trainer_option_composes_and_instantiates(name):
    cfg = compose_train(f"trainer={name}")
    recipe = instantiate(cfg.trainer)
    assert isinstance(recipe, TrainConfig)
    assert recipe.amp_dtype is None or recipe.amp in ("fp16", "bf16")


def test_the_trainer_options_include_a_smoke_run():
    assert {"default", "smoke"} <= set(trainer_options())
    assert instantiate(compose_train("trainer=smoke").trainer).max_steps == 10


@pytest.mark.parametrize("amp", ["none", "fp16", "bf16"])
def test_every_amp_choice_instantiates(amp):
    assert instantiate(compose_train(f"trainer.amp={amp}").trainer).amp == amp


def test_the_finetune_experiment_is_the_papers_deit_b_setting():
    cfg = compose_train("experiment=deit_b_finetune")
    assert cfg.task_name == "deit_b_finetune"
    assert cfg.model.name == "deit_b" and cfg.model.checkpoint.endswith("deit_base_patch16_224-b5f2ef4d.pth")
    assert merge_options(cfg.merge, default_loc=3) == {
        **merge_options(cfg.merge, default_loc=3),
        "method": "cubist",
        "loc": 1,
        "r_h": 1,
        "r_w": 1,
    }
    recipe = instantiate(cfg.trainer)
    assert recipe.epochs == 1 and 1e-5 <= recipe.lr <= 5e-5 and recipe.amp == "bf16"
    # 8 processes x 128 is the batch the lr is quoted for.
    assert recipe.scaled_lr(8 * recipe.batch_size * recipe.accum_steps) == pytest.approx(recipe.lr)
    header = (CONFIGS / "experiment" / "deit_b_finetune.yaml").read_text().splitlines()[0]
    assert header == "# @package _global_"


def test_the_lr_scales_linearly_with_the_global_batch():
    recipe = TrainConfig(lr=4e-5)
    assert recipe.scaled_lr(1024) == pytest.approx(4e-5)
    assert recipe.scaled_lr(256) == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"amp": "fp8"}, "trainer.amp='fp8'"),
        ({"batch_size": 0}, "trainer.batch_size=0"),
        ({"batch_size": 7}, "must be even while mixup"),
        ({"reprob": 1.5}, "trainer.reprob=1.5"),
        ({"ema_decay": 1.0}, "trainer.ema_decay=1.0"),
        ({"checkpoint_every": 0}, "trainer.checkpoint_every=0"),
    ],
)
def test_bad_trainer_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        TrainConfig(**override)
