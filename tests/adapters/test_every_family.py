"""What every backbone family runs, observed on the tensors of a patched forward:
``describe_schedule`` (what results.json and the ``ran:`` line say) against the grid each
scheduled block received and returned, for every method; and the ``keys`` / ``normed`` matching
metrics against their formula on the merged block's own weights; then ``describe_schedule`` on
the cases the family-wide test does not reach (non-square grids, defaults, none, Expedite's
settings, window alignment, SAM 2's own image size)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import spatialmerge
from spatialmerge.adapters.runtime import GridRun
from spatialmerge.merging import GRID_METHODS

sys.path.insert(0, str(Path(__file__).parent))
from test_hiera import STAGE3, sam2  # noqa: E402,F401  (the tiny SAM 2 fixture)
from test_prop_attn import FAMILY_NAMES, _families  # noqa: E402
from test_vit import tiny_deit, tiny_distilled  # noqa: E402

WINDOWED = {"segment-anything", "timm samvit", "hiera", "transformers sam eager", "transformers sam sdpa"}


@pytest.fixture
def observed(monkeypatch):
    """Every scheduled reduction of the next forwards as {loc, grid_in, grid_out} from the
    tensors ``before_block`` received and returned."""
    seen: list[dict] = []
    before_block = GridRun.before_block

    def spy(self, i, grid, block):
        out = before_block(self, i, grid, block)
        if self.merges_at(i):
            seen.append({"loc": i, "grid_in": list(grid.shape[1:3]), "grid_out": list(out.shape[1:3])})
        return out

    monkeypatch.setattr(GridRun, "before_block", spy)
    return seen


def schedules(family: str, method: str) -> list[dict]:
    """A ratio, explicit unequal removals, a ratio aligned to the windows and (cubist) two stages."""
    loc = STAGE3 if family == "hiera" else 1
    extra = {"k": 1} if method == "expedite" else {}  # the tiny grids have few centroids
    # Expedite reduces each SAM window on its own there, to whole windows of equal sides: with
    # windows of 3 on the 8x8 grid, removing 1 per axis keeps 2x2 of each window, a 6x6 grid
    per_window = method == "expedite" and family in WINDOWED and family != "hiera"
    side = 2 if family == "segment-anything" else 1  # its windows of 4 need 2 to merge at all
    cases = [{"loc": loc, "ratio": 0.25}, {"loc": loc, "r_h": side, "r_w": side} if per_window else
             {"loc": loc, "r_h": 0, "r_w": 1}]
    if family == "hiera":  # the tiny SAMs' windows are too large for the grid to align to
        cases.append({"loc": loc, "ratio": 0.125, "align": "window"})
    if method == "cubist":  # the other methods merge once
        # Hiera: a stage-1 merge, recovered before the q-pools, then a stage-3 one
        cases.append({"stages": [[0, 16, 16], [STAGE3, 4, 4]]} if family == "hiera" else
                     {"stages": [[0, 1, 1], [1, 1, 0]]})
    return [{**case, **extra} for case in cases]


@pytest.mark.parametrize("method", GRID_METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_the_described_grid_schedule_is_what_the_forward_ran(family, method, sam2, observed):
    model, x, forward = _families(sam2)[family]
    for options in schedules(family, method):
        described = spatialmerge.describe_schedule(model, method, **options)
        spatialmerge.patch(model, method, **options)
        observed.clear()
        forward(model, x)
        state = spatialmerge.patch_state(model)
        where = f"{family} {method} {options}"
        stages = [{key: stage[key] for key in ("loc", "grid_in", "grid_out")} for stage in described["stages"]]
        assert observed == stages, where
        for stage in described["stages"]:
            assert [stage["r_h"], stage["r_w"]] == [a - b for a, b in zip(stage["grid_in"], stage["grid_out"])]
        last = observed[-1]
        assert described["grid_out"] == last["grid_out"], where
        assert described["tokens_out"] == last["grid_out"][0] * last["grid_out"][1], where
        assert state.last_hw[1] == tuple(last["grid_out"]), where
        assert described["grid_in"] == observed[0]["grid_in"], where
    spatialmerge.unpatch(model)


@pytest.mark.parametrize(("build", "r"), [(tiny_deit, 3), (tiny_deit, (4, -1.0)), (tiny_distilled, [5, 2])])
@torch.no_grad()
def test_the_described_per_layer_tome_schedule_is_what_each_block_merged(build, r):
    model = build()
    counts = []
    for block in model.blocks:  # attention sees the tokens before the block's merge, the MLP after
        block.attn.register_forward_hook(lambda m, args, out: counts.append(args[0].shape[1]))
        block.mlp.register_forward_hook(lambda m, args, out: counts.append(args[0].shape[1]))
    described = spatialmerge.describe_schedule(model, "tome", r=r)
    spatialmerge.patch(model, "tome", r=r)
    side = model.patch_embed.img_size[0] // model.patch_embed.patch_size[0]
    out = model.forward_features(torch.randn(2, 3, *model.patch_embed.img_size))
    merged = [before - after for before, after in zip(counts[::2], counts[1::2])]
    assert described["r_per_block"] == merged
    assert described["grid_in"] == [side, side] and described["tokens_in"] == side * side
    assert described["tokens_out"] == out.shape[1] - model.num_prefix_tokens


def block_at(family: str, model: torch.nn.Module, loc: int) -> torch.nn.Module:
    if family == "hiera":
        return model.image_encoder.trunk.blocks[loc]
    if family == "transformers dinov2":
        return model.encoder.layer[loc]
    if family.startswith("transformers sam"):
        return model.vision_encoder.layers[loc]
    return model.blocks[loc]


def pre_attention_norm(family: str, block: torch.nn.Module) -> torch.nn.Module:
    """The norm each family's block applies to its input before attention, as its forward reads."""
    return block.layer_norm1 if family.startswith("transformers sam") else block.norm1


def keys_by_hand(family: str, block: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., head_dim): the key projection's rows of the block's own weights applied
    to the normed tokens, split into heads as the block's forward splits them, mean over heads."""
    if family == "transformers dinov2":
        heads, weight, bias = block.attention.config.num_attention_heads, block.attention.k_proj.weight, \
            block.attention.k_proj.bias
    else:  # one fused qkv projection, laid out (3, heads, head_dim) on its output axis
        attn = block.attn
        heads = getattr(attn, "num_heads", None) or attn.num_attention_heads
        third = attn.qkv.out_features // 3
        weight = attn.qkv.weight[third : 2 * third]
        bias = None if attn.qkv.bias is None else attn.qkv.bias[third : 2 * third]
    keys = torch.nn.functional.linear(normed, weight, bias)
    return keys.unflatten(-1, (heads, keys.shape[-1] // heads)).mean(-2)


@pytest.mark.parametrize("metric", ["keys", "normed"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_the_matching_metric_is_the_formula_on_the_merged_blocks_input(family, metric, sam2, monkeypatch):
    import spatialmerge.adapters.runtime as base

    model, x, forward = _families(sam2)[family]
    loc = STAGE3 if family == "hiera" else 1
    seen = []
    reduce_grid = base.reduce_grid

    def spy(method, grid, out_hw, metric=None, **options):
        seen.append((grid, metric))
        return reduce_grid(method, grid, out_hw, metric=metric, **options)

    monkeypatch.setattr(base, "reduce_grid", spy)
    spatialmerge.patch(model, "cubist", loc=loc, r_h=1, r_w=1, metric=metric)
    forward(model, x)
    spatialmerge.unpatch(model)
    (grid, used), = seen  # (B, H, W, C) patch grid entering block loc, and the metric it matched on
    block = block_at(family, model, loc)
    normed = pre_attention_norm(family, block)(grid)
    expected = normed if metric == "normed" else keys_by_hand(family, block, normed)
    torch.testing.assert_close(used, expected, atol=1e-6, rtol=1e-5)
    if metric == "normed":  # keys have head_dim channels, so they cannot be the tokens
        assert not torch.allclose(used, grid, atol=1e-3), "the norm must change the tokens"


# ``describe_schedule`` on inputs the family-wide test above does not cover: non-square grids,
# the defaults (method, loc, prop_attn), method none, the resolved Expedite settings, window
# alignment and SAM 2 at its own image size. Expected grids are worked out by hand from the patch
# size and the request.


@pytest.fixture
def wide():
    """A DeiT at 96x64 px with 16 px patches: a 6x4 grid (H != W), 4 blocks, one CLS token."""
    return tiny_deit(img_size=(96, 64))


@torch.no_grad()
def test_a_non_square_grid_schedule_keeps_rows_and_columns_apart(wide):
    described = spatialmerge.describe_schedule(wide, "cubist", loc=1, r_h=2, r_w=1)
    # 6x4 grid, 2 rows and 1 column removed: 4x3 = 12 tokens
    assert described["grid_in"] == [6, 4] and described["tokens_in"] == 24
    assert described["stages"] == [{"loc": 1, "r_h": 2, "r_w": 1, "grid_in": [6, 4], "grid_out": [4, 3]}]
    assert described["grid_out"] == [4, 3] and described["tokens_out"] == 12
    spatialmerge.patch(wide, "cubist", loc=1, r_h=2, r_w=1)
    out = wide.forward_features(torch.randn(1, 3, 96, 64))
    spatialmerge.unpatch(wide)
    assert out.shape[1] - wide.num_prefix_tokens == described["tokens_out"]


@torch.no_grad()
def test_per_layer_tome_on_a_non_square_grid_counts_its_tokens(wide):
    described = spatialmerge.describe_schedule(wide, "tome", r=3)
    # 24 patch tokens, 3 merged in each of the 4 blocks: 12 left
    assert described["grid_in"] == [6, 4] and described["tokens_in"] == 24
    assert described["r_per_block"] == [3, 3, 3, 3] and described["tokens_out"] == 24 - 4 * 3
    spatialmerge.patch(wide, "tome", r=3)
    out = wide.forward_features(torch.randn(1, 3, 96, 64))
    spatialmerge.unpatch(wide)
    assert out.shape[1] - wide.num_prefix_tokens == described["tokens_out"]


def test_the_defaults_are_those_patch_runs_with():
    """No method: cubist, as ``patch``; no loc: a quarter of the depth (8 blocks: block 2)."""
    model = tiny_deit(depth=8)
    described = spatialmerge.describe_schedule(model, r_h=1, r_w=1)
    assert described["method"] == "cubist"
    assert [stage["loc"] for stage in described["stages"]] == [8 // 4]
    spatialmerge.patch(model, r_h=1, r_w=1)
    config = spatialmerge.patch_state(model).config
    spatialmerge.unpatch(model)
    assert config.method == described["method"]
    assert [stage.loc for stage in config.stages] == [stage["loc"] for stage in described["stages"]]


def test_method_none_describes_no_merge(wide):
    assert spatialmerge.describe_schedule(wide, "none") == {"method": "none"}


@pytest.mark.parametrize(("method", "options", "default"), [
    ("cubist", {"loc": 1, "r_h": 1, "r_w": 1}, False),  # off for grid merges unless asked
    ("tome", {"r": 2}, True),  # faithful per-layer ToMe runs with its proportional attention
])
def test_the_recorded_prop_attn_is_what_the_patch_runs_with(wide, method, options, default):
    for asked, expected in ((None, default), (not default, not default)):
        extra = {} if asked is None else {"prop_attn": asked}
        described = spatialmerge.describe_schedule(wide, method, **options, **extra)
        assert described["method"] == method
        assert described["prop_attn"] is expected, (method, asked)
        spatialmerge.patch(wide, method, **options, **extra)
        assert spatialmerge.patch_state(wide).config.prop_attn is expected
        spatialmerge.unpatch(wide)


def test_expedite_records_its_resolved_settings_and_other_methods_none(wide):
    described = spatialmerge.describe_schedule(wide, "expedite", loc=1, ratio=0.25, k=1)
    settings = described["expedite"]
    # the request's k, and the family's defaults for every setting left unset (none left None)
    assert settings["k"] == 1 and None not in settings.values()
    spatialmerge.patch(wide, "expedite", loc=1, ratio=0.25, k=1)
    assert settings == spatialmerge.patch_state(wide).config.expedite
    spatialmerge.unpatch(wide)
    assert "expedite" not in spatialmerge.describe_schedule(wide, "cubist", loc=1, ratio=0.25)


def test_a_window_aligned_ratio_resolves_to_whole_windows(sam2):
    # stage 3 of the tiny Hiera: a 64x64 grid in windows of 14. ratio 0.1 alone would remove
    # round(6.4) = 6 (58 left); aligned, the side goes to the nearest multiple of 14, 56: r = 8
    described = spatialmerge.describe_schedule(sam2, "cubist", loc=STAGE3, ratio=0.1, align="window")
    assert described["stages"] == [{"loc": STAGE3, "r_h": 8, "r_w": 8, "grid_in": [64, 64], "grid_out": [56, 56]}]
    plain = spatialmerge.describe_schedule(sam2, "cubist", loc=STAGE3, ratio=0.1)
    assert plain["stages"][0]["grid_out"] == [58, 58]


def test_sam2_grids_follow_the_models_own_image_size(sam2, monkeypatch):
    """At 512 px: 4 px patches give 128x128 in stage 1, halved by the q-pools before blocks 1 and
    2: 32x32 in stage 3 (at SAM 2's usual 1024 px it would be 64x64)."""
    monkeypatch.setattr(sam2, "image_size", 512)
    single = spatialmerge.describe_schedule(sam2, "cubist", loc=STAGE3, r_h=4, r_w=4)
    assert single["grid_in"] == [32, 32] and single["grid_out"] == [28, 28]
    # a stage-1 merge, recovered at its stage's end, then a stage-3 one on that stage's own grid
    staged = spatialmerge.describe_schedule(sam2, "cubist", stages=[[0, 16, 16], [STAGE3, 4, 4]])
    assert [(stage["grid_in"], stage["grid_out"]) for stage in staged["stages"]] == [
        ([128, 128], [112, 112]), ([32, 32], [28, 28])]
    assert staged["tokens_in"] == 128 * 128 and staged["tokens_out"] == 28 * 28
