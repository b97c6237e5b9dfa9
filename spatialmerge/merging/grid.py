"""One interface over every way of shrinking an (H, W) token grid to (H', W') and back.

Adapters call ``reduce_grid`` at a merge location and ``GridRecord.recover`` for dense outputs,
without knowing which method runs. Methods:

- ``cubist``: CubistMerge (spatial, order-preserving).
- ``tome``: single-layer ToMe removing the same number of tokens, its unordered result reshaped
  into the (H', W') grid: the "incompatible" baseline of the paper.
- ``expedite``: Expedite / Hourglass clustering into an (H', W') grid + k-NN reconstruction.
- ``oracle``: a zero-cost reduction (keep the top-left H' x W' tokens by slicing, recover by
  nearest upsampling): the speed limit of a merge schedule, meaningless for accuracy.
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

GRID_METHODS: tuple[str, ...] = ("cubist", "tome", "expedite", "oracle")


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
    """

    method: str
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    assignment: Tensor
    restore: Callable[[Tensor], Tensor]

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
            ``temperature``, ``window_size``, ``k``.

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
    _reject_options(method, options, {"n_iters", "temperature", "window_size", "k"} if method == "expedite" else set())
    if not (1 <= h2 <= h and 1 <= w2 <= w):
        raise ValueError(f"out_hw={out_hw} must fit inside the ({h}, {w}) grid it reduces")
    if method == "oracle":
        y = x[:, :h2, :w2].contiguous()  # (B, H', W', C)
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
