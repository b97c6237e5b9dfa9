"""One interface over every way of shrinking an (H, W) token grid to (H', W') and back.

Adapters call ``reduce_grid`` at a merge location and ``GridRecord.recover`` for dense outputs,
without knowing which method runs. Methods:

- ``cubist``: CubistMerge (spatial, order-preserving).
- ``tome``: single-layer ToMe removing the same number of tokens, its unordered result reshaped
  into the (H', W') grid: the "incompatible" baseline of the paper.
- ``expedite``: Expedite / Hourglass clustering into an (H', W') grid + k-NN reconstruction.
- ``oracle``: a zero-cost reduction (keep the top-left H' x W' tokens by slicing, recover by
  nearest upsampling): the speed limit of a merge schedule, meaningless for accuracy.
- ``pool``: 2D adaptive average pooling to (H', W'), recovered by nearest upsampling: the naive
  floor. A learned-free baseline that loses to it is broken, not beaten.

``reduce_windows`` applies a method to each window of a windowed backbone separately (as
Expedit-SAM clusters each 14x14 window of SAM into s x s centroids), so the reduced grid is made
of whole s x s windows and later window blocks can run with window s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from spatialmerge.merging.cubist import CubistRecord, cubist_merge, cubist_recover
from spatialmerge.merging.expedite import ExpediteRecord, expedite_cluster, expedite_reconstruct
from spatialmerge.merging.tome import bipartite_soft_matching, max_r, merge_wavg

GRID_METHODS: tuple[str, ...] = ("cubist", "tome", "expedite", "oracle", "pool")


@dataclass(frozen=True)
class GridRecord:
    """What undoing one grid reduction needs, whatever the method.

    Attributes:
        method: the method that produced it.
        in_hw: grid size before, (H, W).
        out_hw: grid size after, (H', W').
        assignment: (B, H * W) int64, the flat index of the reduced token each original cell
            went to (Expedite: its hard cluster label). Used for source maps and positions.
        restore: (B, H', W', C) -> (B, H, W, C).
        block_window: for a per-window reduction (``reduce_windows``), the window side the
            reduced grid is tiled in, which later window-attention blocks must use; else None.
    """

    method: str
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    assignment: Tensor
    restore: Callable[[Tensor], Tensor]
    block_window: int | None = None

    def recover(self, y: Tensor) -> Tensor:
        """(B, H', W', C) -> (B, H, W, C)."""
        return self.restore(y)


def reduce_grid(
    method: str,
    x: Tensor,
    out_hw: tuple[int, int],
    *,
    metric: Tensor | None = None,
    **options: Any,
) -> tuple[Tensor, GridRecord]:
    """Shrink ``x`` (B, H, W, C) to ``out_hw`` (H', W') with ``method``.

    Args:
        method: one of ``GRID_METHODS``.
        x: (B, H, W, C) patch tokens.
        out_hw: target grid (H', W').
        metric: optional (B, H, W, Cm) features to match or cluster on (defaults to ``x``).
        options: method-specific: cubist ``reduce``, ``collisions``; expedite ``n_iters``,
            ``temperature``, ``window_size``, ``k``, ``reconstruct``.

    Returns:
        ``(y, record)`` with y (B, H', W', C).
    """
    if method not in GRID_METHODS:
        raise ValueError(f"method={method!r} is not a grid method; choose one of {GRID_METHODS}")
    b, h, w, c = x.shape
    h2, w2 = out_hw
    if method == "cubist":
        y, rec = cubist_merge(x, h - h2, w - w2, metric=metric, **options)
        return y, _from_cubist(rec)
    expedite_options = {"n_iters", "temperature", "window_size", "k", "reconstruct"}
    _reject_options(method, options, expedite_options if method == "expedite" else set())
    if not (1 <= h2 <= h and 1 <= w2 <= w):
        raise ValueError(f"out_hw={out_hw} must fit inside the ({h}, {w}) grid it reduces")
    if method in ("oracle", "pool"):
        if method == "oracle":
            y = x[:, :h2, :w2].contiguous()  # (B, H', W', C)
        else:
            y = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), (h2, w2)).permute(0, 2, 3, 1)
        rows = torch.arange(h, device=x.device) * h2 // h
        cols = torch.arange(w, device=x.device) * w2 // w
        assignment = (rows[:, None] * w2 + cols[None, :]).flatten().expand(b, h * w)

        def restore_nearest(t: Tensor) -> Tensor:
            return F.interpolate(t.permute(0, 3, 1, 2), size=(h, w), mode="nearest").permute(0, 2, 3, 1)

        return y, GridRecord(method, (h, w), (h2, w2), assignment, restore_nearest)
    if method == "expedite":
        if metric is not None:
            raise ValueError(
                "expedite clusters the tokens themselves; a separate metric is not supported "
                "(use metric=tokens with method=expedite)"
            )
        y, rec = expedite_cluster(x, (h2, w2), **options)
        return y, _from_expedite(rec)
    return _tome_grid(x, (h2, w2), metric)


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nH * nW, window, window, C) windows in raster order, zero-padding the
    bottom and right to a multiple of ``window`` first (as SAM's window attention does); also
    returns the window counts (nH, nW)."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    n_h, n_w = (h + pad_h) // window, (w + pad_w) // window
    x = x.view(b, n_h, window, n_w, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * n_h * n_w, window, window, c), (n_h, n_w)


def window_unpartition(windows: Tensor, counts: tuple[int, int]) -> Tensor:
    """Inverse of ``window_partition`` without the crop: (B * nH * nW, s, s, C) -> (B, nH * s, nW * s, C)."""
    n_h, n_w = counts
    side, c = windows.shape[1], windows.shape[-1]
    x = windows.view(-1, n_h, n_w, side, side, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, n_h * side, n_w * side, c)


def reduce_windows(
    method: str, x: Tensor, window: int, out_window: int, **options: Any
) -> tuple[Tensor, GridRecord]:
    """Reduce each ``window`` x ``window`` window of ``x`` (B, H, W, C) to ``out_window`` x
    ``out_window`` tokens with ``method``, independently.

    The grid is zero-padded to whole windows first (the padding takes part, as in Expedit-SAM),
    so the result is (B, nH * s, nW * s, C) with s = ``out_window``, tiled in s x s windows; the
    record's ``restore`` recovers every window and crops the padding off again.
    """
    b, h, w, c = x.shape
    if isinstance(out_window, bool) or not isinstance(out_window, int) or not 1 <= out_window <= window:
        raise ValueError(
            f"out_window={out_window!r} must be an int in [1, {window}]: each {window}x{window} "
            "window is reduced to out_window x out_window tokens"
        )
    windows, (n_h, n_w) = window_partition(x, window)  # (B * nH * nW, window, window, C)
    reduced, inner = reduce_grid(method, windows, (out_window, out_window), **options)
    y = window_unpartition(reduced, (n_h, n_w))  # (B, nH * s, nW * s, C)

    # local index inside a window's s x s centroids -> flat index in the reduced grid
    local = inner.assignment.view(b, n_h, n_w, window * window)
    row = torch.arange(n_h, device=x.device)[None, :, None, None] * out_window + local // out_window
    col = torch.arange(n_w, device=x.device)[None, None, :, None] * out_window + local % out_window
    flat = (row * (n_w * out_window) + col).view(b * n_h * n_w, window, window, 1)
    assignment = window_unpartition(flat, (n_h, n_w))[:, :h, :w].reshape(b, h * w)

    def restore(t: Tensor) -> Tensor:
        parts, _ = window_partition(t, out_window)  # (B * nH * nW, s, s, C)
        return window_unpartition(inner.recover(parts), (n_h, n_w))[:, :h, :w]  # (B, H, W, C)

    return y, GridRecord(method, (h, w), tuple(y.shape[1:3]), assignment, restore, out_window)


def _reject_options(method: str, options: dict, allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"{method} does not take option(s) {sorted(unknown)}; it takes {sorted(allowed) or 'none'}"
        )


def _from_cubist(rec: CubistRecord) -> GridRecord:
    return GridRecord("cubist", rec.in_hw, rec.out_hw, rec.index, lambda y: cubist_recover(y, rec))


def _from_expedite(rec: ExpediteRecord) -> GridRecord:
    return GridRecord(
        "expedite", rec.in_hw, rec.out_hw, rec.labels, lambda y: expedite_reconstruct(y, rec)
    )


def _tome_grid(x: Tensor, out_hw: tuple[int, int], metric: Tensor | None) -> tuple[Tensor, GridRecord]:
    """Single-layer ToMe removing ``H*W - H'*W'`` tokens. One bipartite step removes at most half
    the tokens, so larger budgets (e.g. 64x64 -> 42x42) repeat the matching on the merged set,
    carrying sizes so the averages stay size-weighted."""
    b, h, w, c = x.shape
    h2, w2 = out_hw
    remaining = h * w - h2 * w2
    tokens = x.reshape(b, h * w, c)
    match = tokens if metric is None else metric.reshape(b, h * w, -1)
    size: Tensor | None = None
    unmerges = []
    while remaining > 0:
        step = min(remaining, max_r(tokens.shape[1]))
        merge, unmerge = bipartite_soft_matching(match, step)
        merged, new_size = merge_wavg(merge, tokens, size)  # an unordered set
        match = merged if metric is None else merge_wavg(merge, match, size)[0]
        tokens, size = merged, new_size
        unmerges.append(unmerge)
        remaining -= step

    def restore(t: Tensor) -> Tensor:
        t = t.reshape(b, h2 * w2, -1)
        for unmerge in reversed(unmerges):
            t = unmerge(t)
        return t.reshape(b, h, w, -1)

    with torch.no_grad():
        slots = torch.arange(h2 * w2, device=x.device, dtype=torch.float32)
        assignment = restore(slots.expand(b, -1).unsqueeze(-1).reshape(b, h2, w2, 1))
        assignment = assignment.reshape(b, h * w).round().long()
    return tokens.reshape(b, h2, w2, c), GridRecord("tome", (h, w), (h2, w2), assignment, restore)
