"""One merge request from end to end: resolved once on the model, run by the forward, described
in the record and named by one label."""

import io

import pytest
import timm
import torch

import spatialmerge
from spatialmerge.adapters import patch_state
from spatialmerge.adapters.config import merge_options
from spatialmerge.adapters.schedule import label, method_label, variant_parts
from spatialmerge.reporting import build_rows


def tiny_vit() -> torch.nn.Module:
    # 8 blocks: the default loc is a quarter of the depth, 2
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=8).eval()


def test_the_patch_holds_the_schedule_the_record_describes_and_the_forward_ran():
    model = tiny_vit()
    spatialmerge.patch(model, "cubist", ratio=0.25, prop_attn=True)
    schedule = patch_state(model).schedule
    assert schedule.describe() == spatialmerge.describe_schedule(model, "cubist", ratio=0.25, prop_attn=True)
    assert schedule.options == {"method": "cubist", "ratio": 0.25, "prop_attn": True, "loc": 2}
    assert [s.describe() for s in schedule.stages] == [
        {"loc": 2, "r_h": 1, "r_w": 1, "grid_in": [4, 4], "grid_out": [3, 3]}
    ]
    seen = []
    model.blocks[2].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen == [1 + schedule.tokens_out]  # CLS + the 3x3 grid


def test_expedite_records_the_backbone_settings_it_ran_with():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=128, depth=4)  # 8x8 -> 6x6
    schedule = spatialmerge.adapters.registry.resolve_schedule(model, "expedite", loc=1, ratio=0.25)
    assert schedule.options["temperature"] == 0.01 and schedule.options["k"] == 20
    assert schedule.describe()["expedite"]["n_iters"] == 5


def test_a_ratio_that_merges_nothing_is_refused_when_patching_not_at_the_first_forward():
    with pytest.raises(ValueError, match="rounds to r_h=r_w=0"):
        spatialmerge.patch(tiny_vit(), "cubist", loc=1, ratio=0.1)


def test_a_config_keeps_loc_null_until_the_backbone_resolves_it():
    request = merge_options({"method": "cubist", "loc": None, "ratio": 0.25, "r_h": None, "r_w": None,
                             "stages": None, "r": None, "prop_attn": None})
    assert request == {"method": "cubist", "loc": None, "ratio": 0.25, "prop_attn": False}
    assert merge_options({"method": "cubist", "loc": None, "ratio": 0.25}, default_loc=3)["loc"] == 3


def test_one_label_names_every_variant_that_changes_what_ran():
    merge = {"method": "cubist", "loc": 3, "ratio": 0.25, "reduce": "mean", "metric": "normed",
             "collisions": "reference", "positions": "centroid", "prop_attn": True, "align": "none"}
    assert variant_parts(merge) == ["reduce=mean", "metric=normed", "collisions=reference",
                                    "positions=centroid", "prop_attn"]
    assert label(merge) == "cubist (reduce=mean, metric=normed, collisions=reference, positions=centroid, prop_attn) loc=3 ratio=0.25"
    paper = {"method": "cubist", "loc": 3, "ratio": 0.25, "reduce": "maxmag", "metric": "tokens", "prop_attn": False}
    assert label(paper) == "cubist loc=3 ratio=0.25"
    assert label({**paper, "align": "window"}) == "cubist loc=3 ratio=0.25 window"
    assert label(None) == "none" and method_label({"method": "none"}) == "none"


def test_reports_keep_two_reduce_variants_apart():
    def record(reduce):
        merge = {"method": "cubist", "loc": 3, "ratio": 0.25, "reduce": reduce}
        return {"status": "ok", "model": "m", "merge": merge, "metrics": {}, "config": {"merge": merge}}

    methods = sorted(row["method"] for row in build_rows([record("maxmag"), record("mean")]))
    assert methods == ["cubist", "cubist (reduce=mean)"]


@torch.no_grad()
def test_a_re_patch_that_is_refused_leaves_the_previous_patch_running():
    model = tiny_vit()
    x = torch.randn(1, 3, *model.patch_embed.img_size)
    spatialmerge.patch(model, "cubist", loc=1, r_h=1, r_w=1)
    before = model(x)
    with pytest.raises(ValueError, match="loc=99"):
        spatialmerge.patch(model, "cubist", loc=99, r_h=1, r_w=1)
    state = patch_state(model)
    assert state is not None and state.schedule.options["loc"] == 1, "still the previous schedule"
    assert torch.equal(model(x), before)
    spatialmerge.unpatch(model)
    with pytest.raises(ValueError, match="loc=99"):
        spatialmerge.patch(model, "cubist", loc=99, r_h=1, r_w=1)
    assert patch_state(model) is None, "an unpatched model stays unpatched"


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("cubist", {"loc": 1, "r_h": 3, "r_w": 1}, r"r_h=3 is out of range for a side of 4 tokens: one pass removes"),
        ("pool", {"loc": 1, "r_h": 1, "r_w": 4}, r"r_w=4 is out of range for a side of 4 tokens before block 1: "
                                                 r"pool keeps at least one"),
        ("expedite", {"loc": 1, "ratio": 0.25, "n_iters": 0}, r"n_iters=0 must be an int >= 1"),
        ("expedite", {"loc": 1, "ratio": 0.25, "temperature": "hot"}, r"temperature='hot' must be a finite number"),
        ("expedite", {"loc": 1, "ratio": 0.25}, r"k=20 exceeds the 9 centroids of the merged grid"),
    ],
)
def test_a_schedule_the_grid_cannot_run_is_refused_when_described_and_patched(method, options, message):
    model = tiny_vit()  # a 4x4 patch grid
    with pytest.raises(ValueError, match=message):
        spatialmerge.describe_schedule(model, method, **options)
    with pytest.raises(ValueError, match=message):
        spatialmerge.patch(model, method, **options)
    assert patch_state(model) is None


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripting_a_patched_model_is_refused_in_one_line_naming_what_works():
    model = spatialmerge.patch(tiny_vit(), "cubist", loc=1, r_h=1, r_w=1)
    for wrapped in (model, torch.nn.Sequential(model)):  # the patched module may sit inside another
        with pytest.raises(TypeError, match=r"patched by spatialmerge, which TorchScript cannot compile; "
                                            r"export it with torch.export or torch.compile"):
            torch.jit.script(wrapped)
    assert patch_state(model) is not None, "the refusal leaves the patch alone"


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:You are using the legacy TorchScript")
def test_tracing_a_patched_model_is_refused_in_one_line_and_torch_export_still_runs():
    model = spatialmerge.patch(tiny_vit(), "cubist", loc=1, r_h=1, r_w=1)
    images = torch.randn(1, 3, 64, 64)
    refusal = r"patched by spatialmerge, which torch.jit.trace cannot record.*torch.onnx.export\(\.\.\., dynamo=True\)"
    with pytest.raises(TypeError, match=refusal):
        torch.jit.trace(model, images)
    with pytest.raises(TypeError, match=refusal):  # the TorchScript ONNX exporter traces too
        torch.onnx.export(model, (images,), io.BytesIO(), dynamo=False)
    exported = torch.export.export(model, (images,)).module()
    torch.testing.assert_close(exported(images), model(images))
    traced = torch.jit.trace(spatialmerge.unpatch(model), images)  # the unmerged model traces as before
    torch.testing.assert_close(traced(images), model(images))
