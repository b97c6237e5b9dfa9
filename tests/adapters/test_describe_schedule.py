"""``describe_schedule`` (what results.json and the ``ran:`` line say) against what a patched
forward actually did, on every backbone family and every method: the grid each scheduled block
received and returned, observed on the tensors, and the state's ``last_hw`` after the forward."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import spatialmerge
from spatialmerge.adapters.base import GridRun
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
