"""The runtime of a patched forward: the patch's state on the module, and one pass of a grid
schedule (merge before the scheduled blocks, proportional-attention biases, recover)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from spatialmerge.adapters.config import MergeConfig
from spatialmerge.adapters.schedule import Schedule, resolve_stage
from spatialmerge.merging.grid import GridRecord, reduce_grid, reduce_windows, window_partition

if TYPE_CHECKING:
    from spatialmerge.adapters.adapter import Adapter


@dataclass
class PatchState:
    """Lives on the patched module: the request, what it resolved to on this model, how to
    undo it, and the last run's source map."""

    config: MergeConfig
    adapter: Adapter
    original_class: type
    schedule: Schedule | None = None
    last_assignment: Tensor | None = field(default=None, repr=False)
    last_hw: tuple[tuple[int, int], tuple[int, int]] | None = None

    def run(self, target: nn.Module) -> "GridRun":
        return GridRun(self, target)


class MergeClock:
    """Wall time spent inside merge and recover, for benchmarks. Off by default, and then it
    costs one attribute check per merge (plain checks, not a context manager, so torch.compile
    traces through it); when on, CUDA is synchronised so each section is timed on its own."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds = 0.0

    def start(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def stop(self, device: torch.device, started: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - started


merge_clock = MergeClock()


class GridRun:
    """One forward pass of a grid schedule: merge before the scheduled blocks, recover at the end.

    Adapters call ``before_block(i, grid, block)`` in their block loop with the patch tokens as a
    (B, H, W, C) grid, and ``recover(grid)`` where a dense output is needed.
    """

    def __init__(self, state: PatchState, target: nn.Module) -> None:
        self.state = state
        self.config = state.config
        self.adapter = state.adapter
        self.target = target
        self.stages = {stage.loc: stage for stage in state.config.stages}
        self.records: list[GridRecord] = []
        self.closed: list[GridRecord] = []  # the records of the last region ended
        self._sizes: Tensor | None = None  # (B, H', W') of the open merges, with prop_attn
        self._nothing_removed = False

    @property
    def block_window(self) -> int | None:
        """The window side later window-attention blocks must use (a per-window reduction
        tiles the grid in smaller windows), or None to keep the backbone's own."""
        sides = [record.block_window for record in self.records if record.block_window]
        return sides[-1] if sides else None

    def merges_at(self, i: int) -> bool:
        return i in self.stages

    def before_block(self, i: int, grid: Tensor, block: nn.Module) -> Tensor:
        """(B, H, W, C) -> (B, H', W', C) if a stage is scheduled before block ``i``.

        An empty batch passes through: there is nothing to merge, and the unpatched model
        returns an empty batch of the full grid too."""
        stage = self.stages.get(i)
        if stage is None or grid.shape[0] == 0:
            return grid
        window = self.adapter.window_at(self.target, i)
        # the rule Schedule.describe applies to the model's own grid, here on the one received
        resolved = resolve_stage(self.config, stage, tuple(grid.shape[1:3]), window)
        started = merge_clock.start(grid.device) if merge_clock.enabled else 0.0
        metric = self._metric(grid, block)
        if resolved.window_side is not None:
            grid, record = reduce_windows(
                self.config.method, grid, window, resolved.window_side, **self.config.grid_options()
            )
        else:
            grid, record = reduce_grid(
                self.config.method, grid, resolved.grid_out, metric=metric, **self.config.grid_options(),
            )
        self.records.append(record)
        if self.config.prop_attn:
            self._sizes = _cell_sizes(self.records)
            # nothing removed (r_h = r_w = 0): no bias at all, so the blocks run exactly as
            # unpatched; decided from the shapes, so no value leaves the device
            self._nothing_removed = all(record.in_hw == record.out_hw for record in self.records)
        if merge_clock.enabled:
            merge_clock.stop(grid.device, started)
        return grid

    def cell_sizes(self) -> Tensor | None:
        """(B, H', W') float32: how many original patches each token of the current grid covers
        (summing to H * W; an empty Expedite cluster covers 0), while ``prop_attn`` is on and a
        merge is open; else None."""
        return self._sizes

    def key_bias(self, num_prefix: int, dtype: torch.dtype) -> Tensor | None:
        """Proportional attention as an additive mask over the keys of a sequence of
        ``num_prefix`` prefix tokens then the current grid in raster order: (B, 1, 1, P + H' * W'),
        log(size) per key, 0 for prefix tokens; None where nothing is to be added (no
        ``prop_attn``, no merge open, or no token removed), so the block runs exactly as
        unpatched."""
        if self._sizes is None or self._nothing_removed:
            return None
        log_size = _log_size(self._sizes).flatten(1)  # (B, H' * W')
        bias = torch.cat([log_size.new_zeros(log_size.shape[0], num_prefix), log_size], dim=1)
        return bias[:, None, None, :].to(dtype)

    def window_key_bias(self, window: int, dtype: torch.dtype) -> Tensor | None:
        """Proportional attention for a prefix-free grid as a block with window ``window`` (0:
        global) attends it: (B * nH * nW, window * window) log(size) per key of each window,
        partitioned and padded exactly as the tokens (padding cells: 0), or (B, H' * W') for a
        global block; None as in ``key_bias``."""
        if self._sizes is None or self._nothing_removed:
            return None
        log_size = _log_size(self._sizes)[..., None]  # (B, H', W', 1)
        if window > 0:
            log_size, _ = window_partition(log_size, window)  # (B * nH * nW, window, window, 1)
        return log_size.flatten(1).to(dtype)

    def _metric(self, grid: Tensor, block: nn.Module) -> Tensor | None:
        if self.config.metric == "tokens":
            return None
        with torch.no_grad():
            normed = self.adapter.pre_norm(block)(grid)
            return normed if self.config.metric == "normed" else self.adapter.keys(block, normed)

    def assignment(self) -> Tensor | None:
        """(B, H * W) composed map from original cells to the current grid's flat index."""
        return _composed(self.records)

    def end_region(self) -> None:
        """Call after ``recover`` where the resolution changes (Hiera's q-pool): later merges
        start again from the recovered grid."""
        if self.records:
            self.closed, self.records = self.records, []
            self._sizes = None

    def recover(self, grid: Tensor) -> Tensor:
        """Undo every merge of this run, latest first: (B, H', W', C) -> (B, H, W, C)."""
        started = merge_clock.start(grid.device) if merge_clock.enabled else 0.0
        for record in reversed(self.records):
            grid = record.recover(grid)
        if merge_clock.enabled:
            merge_clock.stop(grid.device, started)
        return grid

    def finish(self) -> None:
        """Keep the source map of this run (small: one index per cell) for pictures and tests:
        of the merges still open, else of the last region ended."""
        records = self.records or self.closed
        assignment = _composed(records)
        self.state.last_assignment = None if assignment is None else assignment.detach()
        self.state.last_hw = (records[0].in_hw, records[-1].out_hw) if records else None


def _composed(records: list[GridRecord]) -> Tensor | None:
    """(B, H * W) map from the first record's cells to the last record's flat token index."""
    if not records:
        return None
    composed = records[0].assignment
    for record in records[1:]:
        composed = record.assignment.gather(1, composed)
    return composed


def _cell_sizes(records: list[GridRecord]) -> Tensor:
    """(B, H', W') float32 count of the original cells behind each token of the last record's
    grid: merges compose, so a cell merged twice counts every patch it absorbed."""
    assignment = _composed(records)  # (B, H * W)
    h, w = records[-1].out_hw
    counts = torch.zeros(assignment.shape[0], h * w, device=assignment.device)
    counts.scatter_add_(1, assignment, torch.ones_like(assignment, dtype=counts.dtype))
    return counts.view(-1, h, w)


def _log_size(sizes: Tensor) -> Tensor:
    """log(size), an empty Expedite cluster counted as one patch: its centroid is still a token
    that later blocks attend to, and log(0) would mask it out of every softmax."""
    return sizes.clamp_min(1).log()
