"""What a merge request resolves to on a given model, without running it: the schedule that
results.json and the ``ran:`` line record (tests compare it with what a forward actually did)."""

from __future__ import annotations

from typing import Any

from torch import nn

from spatialmerge.adapters.base import default_loc, find_adapter, window_budget
from spatialmerge.adapters.config import MergeConfig
from spatialmerge.merging.tome import parse_r


def describe_schedule(model: nn.Module, method: str = "cubist", **options: Any) -> dict[str, Any]:
    """What ``patch(model, method, **options)`` runs at the model's own input size, resolved.

    For grid schedules: each stage's block, the rows and columns removed and the grid before
    and after (a ratio and ``align`` turned into numbers, a per-window budget into its whole
    windows), and the tokens kept; for per-layer ToMe: the tokens merged in each block. This is
    what results.json records, rather than only the request (``loc: null``, ``ratio``).
    """
    adapter = find_adapter(model)
    target = adapter.target(model)
    config = MergeConfig.create(method, **default_loc(model, options)).with_defaults(adapter.expedite_defaults)
    if config.method == "none":
        return {"method": "none"}
    adapter.check(target, config)
    first = config.stages[0].loc if config.stages else 0
    hw = adapter.grid_at(model, target, first)
    described: dict[str, Any] = {"method": config.method, "grid_in": list(hw), "tokens_in": hw[0] * hw[1]}
    if config.per_layer:
        schedule = parse_r(adapter.depth(target), config.r)
        # prefix tokens are never merged, so every merge takes one patch token away
        described.update(
            r_per_block=schedule, tokens_out=hw[0] * hw[1] - sum(schedule), prop_attn=config.prop_attn
        )
        return described
    stages = []
    region = adapter.region(target, first)
    for stage in config.stages:
        if adapter.region(target, stage.loc) != region:  # the earlier merges were recovered
            region, hw = adapter.region(target, stage.loc), adapter.grid_at(model, target, stage.loc)
        window = adapter.window_at(target, stage.loc)
        r_h, r_w = stage.removal(hw, window, config.align)
        if config.windowed:
            side = window_budget(hw, (r_h, r_w), window)
            out = tuple(-(-size // window) * side for size in hw)
        else:
            out = (hw[0] - r_h, hw[1] - r_w)
        stages.append({"loc": stage.loc, "r_h": hw[0] - out[0], "r_w": hw[1] - out[1],
                       "grid_in": list(hw), "grid_out": list(out)})
        hw = out
    described.update(stages=stages, grid_out=list(hw), tokens_out=hw[0] * hw[1], prop_attn=config.prop_attn)
    if config.method == "expedite":
        described["expedite"] = dict(config.expedite)
    return described
