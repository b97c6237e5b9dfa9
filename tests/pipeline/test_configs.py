"""Every option of every config group composes and instantiates."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import spatialmerge
from spatialmerge.adapters import MergeConfig
from spatialmerge.loggers import RunLogger
from spatialmerge.adapters.config import merge_options

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


def test_every_group_has_its_expected_options():
    assert {"sam_b", "sam_l", "sam_h", "samvit_b", "deit_t", "deit_s", "deit_b", "dinov3_s", "dinov3_b"} <= set(
        options("model")
    )
    assert "dinov2_s" in options("model")
    assert set(options("merge")) >= {"none", "cubist", "tome", "expedite", "oracle", "pool"}
    assert set(options("dataset")) == {"coco", "imagenet", "folder", "photos"}
    assert {"miou", "top1", "throughput", "fidelity"} <= set(options("evaluator"))
    assert set(options("logger")) == {"wandb", "jsonl", "none"}


ADAPTER_OF_FAMILY = {
    "sam": "segment-anything SAM", "sam2": "SAM 2 Hiera", "samvit": "timm samvit", "vit": "timm ViT",
    "eva": "timm Eva (DINOv3)", "hf": "transformers", "hf sam": "transformers SAM",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", options("model"))
def test_model_options_build_the_named_backbone(name):
    cfg = compose_eval(f"model={name}")
    assert cfg.model.name in spatialmerge.models.available_models()
    # full-size architecture, no memory, no weights needed; sam2's Hiera calls .item() while
    # building, which meta tensors cannot do, so SAM 2 is built for real (random weights)
    on_meta = spatialmerge.models.model_info(cfg.model.name).family != "sam2"
    with torch.device("meta" if on_meta else "cpu"):
        model = instantiate(cfg.model, checkpoint=None)
    assert isinstance(model, torch.nn.Module)
    family = spatialmerge.models.model_info(cfg.model.name).family
    expected = ADAPTER_OF_FAMILY["hf sam" if name == "hf_sam_b" else family]
    assert spatialmerge.adapters.find_adapter(model).name == expected


@pytest.mark.parametrize(
    ("model", "evaluators", "dataset"),
    [
        ("sam_b_random", {"throughput"}, "spatialmerge.data.CocoInstances"),
        ("sam_h", {"miou", "throughput"}, "spatialmerge.data.CocoInstances"),
        ("deit_b", {"top1", "throughput"}, "spatialmerge.data.imagenet_dataset"),
        ("dinov3_b", {"fidelity", "throughput"}, "spatialmerge.data.ImageFolderUnlabeled"),
        ("dinov2_s", {"fidelity", "throughput"}, "spatialmerge.data.SkimagePhotos"),
    ],
)
def test_a_model_picks_its_natural_evaluators_and_dataset(model, evaluators, dataset):
    cfg = compose_eval(f"model={model}")
    assert set(cfg.evaluator) == evaluators
    assert cfg.dataset._target_ == dataset


def test_command_line_evaluator_beats_the_models_choice():
    cfg = compose_eval("model=sam_h", "evaluator=fidelity", "dataset=folder")
    assert set(cfg.evaluator) == {"fidelity"}


@pytest.mark.parametrize("name", options("evaluator"))
def test_evaluator_options_instantiate(name):
    # the mIoU evaluator reads its prompt type from the COCO dataset config
    cfg = compose_eval(f"evaluator={name}", "model=sam_b", "dataset=coco")
    for node in cfg.evaluator.values():
        evaluator = instantiate(node)
        assert callable(evaluator.run)


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options_instantiate_to_factories(name, tmp_path):
    cfg = compose_eval(f"dataset={name}", f"paths.data_dir={tmp_path}")
    factory = instantiate(cfg.dataset)
    assert callable(factory)
    if name == "photos":  # installed with scikit-image, wherever the data directory points
        assert len(factory()) == 12
        return
    with pytest.raises(FileNotFoundError, match="dataset.root"):
        factory()  # nothing is there: the layout error names the key to set


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(name):
    assert isinstance(instantiate(compose_eval(f"logger={name}").logger), RunLogger)


@pytest.mark.parametrize("name", options("merge"))
def test_merge_options_resolve_to_valid_patch_requests(name):
    cfg = compose_eval(f"merge={name}")
    request = merge_options(cfg.merge, default_loc=3)
    if name == "none":
        assert request is None
        return
    config = MergeConfig.create(**request)
    assert config.method == cfg.merge.method
    if name in MERGE_PRESETS:  # a measured schedule: it runs exactly what its file says
        assert config.stages[0].loc == cfg.merge.loc and request["ratio"] == cfg.merge.ratio
        return
    assert name.startswith(config.method)
    assert config.stages[0].loc == 3, "loc null means a quarter of the depth"
    # prop_attn: null resolves to the method's own default, recorded as a bool
    assert request["prop_attn"] is (config.method == "tome" and config.per_layer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["merge.ratio=0.1"], r"merge=none runs the unmerged model, which does not use merge.ratio=0.1; drop it "
                              r"\(merge.ratio=null\) or choose a method, e.g. merge=cubist"),
        (["merge.loc=1", "merge.recover=true"], r"does not use merge.loc=1, merge.recover=True; drop them "
                                                r"\(merge.loc=null merge.recover=false\)"),
        (["+merge.k=3"], r"does not use merge.k=3"),
    ],
)
def test_an_option_the_unmerged_model_does_not_use_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        merge_options(compose_eval("merge=none", *overrides).merge)


def test_the_suggested_reset_of_a_none_job_composes_and_runs_unmerged():
    cfg = compose_eval("merge=none", "merge.loc=null", "merge.ratio=null", "merge.reduce=maxmag")
    assert merge_options(cfg.merge) is None


# merge configs that fix a measured schedule for one model rather than a method's defaults
MERGE_PRESETS = {"dinov2_s_1.5x"}


def test_prop_attn_is_one_override_away_and_resolved_in_the_request():
    cfg = compose_eval("merge=cubist", "merge.prop_attn=true")
    assert merge_options(cfg.merge, 3)["prop_attn"] is True
    cfg = compose_eval("merge=tome", "merge.r=8", "merge.prop_attn=false")
    assert merge_options(cfg.merge, 3)["prop_attn"] is False
    assert merge_options(compose_eval("merge=tome", "merge.r=8").merge, 3)["prop_attn"] is True


def test_merge_schedule_precedence():
    cfg = compose_eval("model=deit_b", "merge=cubist", "merge.loc=1", "merge.r_h=1", "merge.r_w=1")
    assert merge_options(cfg.merge, 3) == {
        **merge_options(cfg.merge, 3),
        "loc": 1,
        "r_h": 1,
        "r_w": 1,
    }
    assert "ratio" not in merge_options(cfg.merge, 3)
    cfg = compose_eval("merge=tome", "merge.r=8")
    assert MergeConfig.create(**merge_options(cfg.merge, 3)).per_layer
    cfg = compose_eval("merge=cubist", "merge.stages=[[1,2,2],[4,1,1]]")
    assert len(MergeConfig.create(**merge_options(cfg.merge, 3)).stages) == 2


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_compose(name):
    cfg = compose_eval(f"experiment={name}")
    assert OmegaConf.select(cfg, "model.name")


def test_per_layer_r_beside_a_grid_schedule_is_a_config_error():
    cfg = compose_eval("model=deit_b", "merge=tome", "merge.r=8", "merge.loc=1")
    with pytest.raises(ValueError, match=r"merge.r=8 is per-layer ToMe.*merge.loc=1 is set too.*merge.loc=null"):
        merge_options(cfg.merge, 3)
    cfg = compose_eval("experiment=deit_b_tome")
    assert merge_options(cfg.merge, 3)["r"] == 6, "the experiment runs as written"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["merge.ratio=0"], r"merge.ratio=0 merges nothing: the run would be the unmerged model recorded as cubist"),
        (["merge.r_h=0", "merge.r_w=0"], r"merge.r_h=0 merge.r_w=0 merges nothing"),
        (["merge.loc=1.5"], r"loc=1.5 must be a block index"),
        (["merge.loc=true"], r"loc=True must be a block index"),
        (["merge.recover=maybe"], r"recover='maybe' must be true or false"),
        (["merge.stages=[[2,1,1]]", "merge.loc=3"], r"merge.loc=3 would be ignored; drop it \(merge.loc=null\)"),
    ],
)
def test_a_merge_request_that_would_run_other_than_written_is_refused(overrides, message):
    cfg = compose_eval("merge=cubist", *overrides)
    with pytest.raises(ValueError, match=message):
        MergeConfig.create(**merge_options(cfg.merge, default_loc=3))
