"""What a merge request resolves to on a model, and the one name it goes by.

``resolve_stage`` is the single rule turning a stage of a request into the grid it produces;
the forward (:class:`~spatialmerge.adapters.runtime.GridRun`) applies it to the grid it
receives and a :class:`Schedule` to the model's own grid, so what is described is what runs.
``label`` names a merge in reports, run names, W&B, the terminal summary and the search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from spatialmerge.adapters.config import MergeConfig, Stage
from spatialmerge.merging.cubist import check_removal

BASELINE_METHOD = "none"
# The variant options whose default is the paper's method: a label names them only when changed.
VARIANT_DEFAULTS: dict[str, str] = {
    "reduce": "maxmag", "metric": "tokens", "collisions": "exact", "positions": "grid",
}


@dataclass(frozen=True)
class ResolvedStage:
    """One merge as it runs: before block ``loc``, the grid ``grid_in`` becomes ``grid_out``.

    ``window_side`` is the tokens per window side of a per-window reduction (Expedit-SAM's
    ``windowed``), None for a reduction of the whole grid."""

    loc: int
    grid_in: tuple[int, int]
    grid_out: tuple[int, int]
    window_side: int | None = None

    @property
    def removal(self) -> tuple[int, int]:
        """(r_h, r_w): rows and columns removed (a per-window reduction may pad first)."""
        return self.grid_in[0] - self.grid_out[0], self.grid_in[1] - self.grid_out[1]

    def describe(self) -> dict[str, Any]:
        r_h, r_w = self.removal
        return {"loc": self.loc, "r_h": r_h, "r_w": r_w, "grid_in": list(self.grid_in),
                "grid_out": list(self.grid_out)}


def resolve_stage(config: MergeConfig, stage: Stage, hw: tuple[int, int], window: int | None) -> ResolvedStage:
    """The grid ``stage`` of ``config`` produces from an (H, W) grid ``hw`` in blocks whose
    attention window is ``window`` (None: global): a ratio and ``align`` turned into rows and
    columns, a per-window budget into its whole windows."""
    r_h, r_w = stage.removal(hw, window, config.align)
    for r, n, axis in ((r_h, hw[0], "r_h"), (r_w, hw[1], "r_w")):
        if config.method == "cubist":  # one pass pairs each removed token with a kept neighbour
            check_removal(r, n, axis)
        elif not 0 <= r < n:
            raise ValueError(
                f"{axis}={r} is out of range for a side of {n} tokens before block {stage.loc}: "
                f"{config.method} keeps at least one, so remove between 0 and {n - 1}"
            )
    if config.windowed:
        assert window is not None  # Adapter.check refuses windowed on a backbone without windows
        side = window_budget(hw, (r_h, r_w), window)
        out = (-(-hw[0] // window) * side, -(-hw[1] // window) * side)
        return ResolvedStage(stage.loc, hw, out, side)
    return ResolvedStage(stage.loc, hw, (hw[0] - r_h, hw[1] - r_w))


@dataclass(frozen=True)
class Schedule:
    """A validated merge request resolved on one model at its own input size.

    Attributes:
        config: the validated request, backbone defaults filled in.
        options: ``patch`` keyword arguments as they run (``loc`` and ``prop_attn`` resolved,
            Expedite's backbone defaults filled in): what results.json records as ``merge``.
        grid_in: (H, W) grid entering the first scheduled block.
        stages: each grid merge as it runs (empty for per-layer ToMe).
        r_per_block: per-layer ToMe's tokens merged in each block, else None.
    """

    config: MergeConfig
    options: dict[str, Any]
    grid_in: tuple[int, int]
    stages: tuple[ResolvedStage, ...] = ()
    r_per_block: tuple[int, ...] | None = None

    @property
    def grid_out(self) -> tuple[int, int]:
        return self.stages[-1].grid_out if self.stages else self.grid_in

    @property
    def tokens_out(self) -> int:
        if self.r_per_block is not None:  # prefix tokens are never merged: one patch per merge
            return self.grid_in[0] * self.grid_in[1] - sum(self.r_per_block)
        return self.grid_out[0] * self.grid_out[1]

    def describe(self) -> dict[str, Any]:
        """The resolved schedule as results.json, W&B and the ``ran:`` lines record it."""
        h, w = self.grid_in
        described: dict[str, Any] = {"method": self.config.method, "grid_in": [h, w], "tokens_in": h * w}
        if self.r_per_block is not None:
            described.update(r_per_block=list(self.r_per_block), tokens_out=self.tokens_out,
                             prop_attn=self.config.prop_attn)
            return described
        described.update(
            stages=[stage.describe() for stage in self.stages], grid_out=list(self.grid_out),
            tokens_out=self.tokens_out, prop_attn=self.config.prop_attn,
        )
        if self.config.method == "expedite":
            described["expedite"] = dict(self.config.expedite)
        return described

    def label(self) -> str:
        return label(self.options)


def method_label(merge: Mapping[str, Any] | None) -> str:
    """The method with the variants that change what it is: per-layer ToMe vs the single-layer
    grid form, which Expedite (temperature, per window, softmax), CubistMerge's options off
    their paper defaults, and whether proportional attention ran (the paper's CubistMerge has
    none). Takes ``patch`` kwargs or a raw ``merge`` config, as results.json records either."""
    if not merge:
        return BASELINE_METHOD
    method = merge.get("method") or BASELINE_METHOD
    if method == BASELINE_METHOD:
        return method
    if method == "tome" and merge.get("r") is not None:
        # proportional attention is per-layer ToMe's own default; only its absence is a variant
        return "tome (per layer)" if merge.get("prop_attn") is not False else "tome (per layer, no prop_attn)"
    parts = variant_parts(merge)
    return f"{method} ({', '.join(parts)})" if parts else method


def variant_parts(merge: Mapping[str, Any]) -> list[str]:
    """The options of a grid merge that are not its method's defaults, as short words."""
    parts = []
    if merge.get("method") == "expedite" and merge.get("temperature") is not None:
        parts.append(f"t={merge['temperature']}")
        if merge.get("windowed"):
            parts.append("per window")
        if merge.get("reconstruct") == "softmax":
            parts.append("softmax")
    parts += [f"{key}={merge[key]}" for key, default in VARIANT_DEFAULTS.items()
              if merge.get(key) not in (None, default)]
    if merge.get("prop_attn"):
        parts.append("prop_attn")
    return parts


def schedule_text(merge: Mapping[str, Any] | None) -> str:
    """A merge's schedule in a few characters: ``loc=3 ratio=0.125``, ``loc=1 r=2x2``,
    ``r=8/layer``; ``-`` for none.

    Takes resolved ``patch`` kwargs or a raw ``merge`` config (precedence as
    :func:`~spatialmerge.adapters.config.merge_options`: r > stages > r_h/r_w > ratio; ``loc:
    null`` shows as auto).
    """
    if not merge or merge.get("method", BASELINE_METHOD) == BASELINE_METHOD:
        return "-"
    if merge.get("r") is not None:
        return f"r={merge['r']}/layer"
    if merge.get("stages"):
        return "stages=" + json.dumps(merge["stages"], separators=(",", ":"))
    loc = "auto" if merge.get("loc") is None else merge["loc"]
    if merge.get("r_h") is not None or merge.get("r_w") is not None:
        text = f"loc={loc} r={merge.get('r_h')}x{merge.get('r_w')}"
    else:
        text = f"loc={loc} ratio={merge.get('ratio')}"
    return text + (" window" if merge.get("align") == "window" else "")


def label(merge: Mapping[str, Any] | None) -> str:
    """The one name of a merge: method with its variants, then its schedule
    (``cubist (reduce=mean, prop_attn) loc=3 ratio=0.25``; ``none``)."""
    schedule = schedule_text(merge)
    return method_label(merge) + ("" if schedule == "-" else f" {schedule}")


def window_budget(hw: tuple[int, int], removal: tuple[int, int], window: int) -> int:
    """Centroids per window side for a per-window reduction with about the requested budget.

    The grid pads to n windows per axis, each reduced to s x s, so the result is n * s per side:
    s = round((H - r_h) / n), the nearest whole-window grid to what cubist would keep. Windows
    are square, so both axes must give the same s.
    """
    sides = []
    for size, r in zip(hw, removal):
        count = -(-size // window)
        sides.append(min(window, max(1, round((size - r) / count))))
    if sides[0] != sides[1]:
        raise ValueError(
            f"a per-window reduction keeps square windows, but the removal (r_h, r_w)={removal} "
            f"on the {hw[0]}x{hw[1]} grid asks for {sides[0]} x {sides[1]} tokens per "
            f"{window}x{window} window; give one ratio, or r_h and r_w that agree"
        )
    if sides[0] == window:
        raise ValueError(
            f"the removal (r_h, r_w)={removal} on the {hw[0]}x{hw[1]} grid rounds to "
            f"{window}x{window} tokens per {window}x{window} window: nothing would be merged; "
            "ask for more (a larger ratio)"
        )
    return sides[0]
