"""CubistMerge: spatial-preserving 2D token merging (Gong & Lis, arXiv 2509.21764).

A grid of tokens ``(B, H, W, C)`` is reduced to ``(B, H - r_h, W - r_w, C)`` in two 1D passes:
every row loses exactly ``r_w`` tokens, then every column of the row-merged grid loses exactly
``r_h``. Inside a pass only odd positions may be removed, each into its more similar immediate
even neighbour, so no two adjacent tokens disappear together and left/right, top/bottom order
survives. The result is always a dense rectangle that window attention, decomposed relative
positions and RoPE consume unchanged.

Everything here is pure tensor code: no model, no config, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduce = Literal["maxmag", "mean", "maxnorm"]
Collisions = Literal["exact", "reference"]
REDUCE_RULES: tuple[str, ...] = ("maxmag", "mean", "maxnorm")
COLLISION_RULES: tuple[str, ...] = ("exact", "reference")


@dataclass(frozen=True)
class CubistRecord:
    """What undoing one merge needs.

    Attributes:
        index: (B, H * W) int64. For every cell of the original grid, the flat index
            (``h' * W' + w'``) of the reduced-grid token that holds it.
        in_hw: the original grid size (H, W).
        out_hw: the reduced grid size (H', W').
    """

    index: Tensor
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    """Reject an option value outside ``valid``, naming the value and the choices."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(valid)}")


def check_removal(r: int, n: int, axis: str) -> None:
    """Refuse removing ``r`` tokens from a side of ``n`` in one CubistMerge pass (0..n // 2)."""
    if not isinstance(r, int) or isinstance(r, bool):
        raise ValueError(f"{axis}={r!r} must be an int (tokens removed per pass)")
    if r < 0 or r > n // 2:
        raise ValueError(
            f"{axis}={r} is out of range for a side of {n} tokens: one pass removes between 0 and "
            f"floor({n}/2)={n // 2} tokens; lower {axis} or merge again in a second stage"
        )


def _take_larger_magnitude(current: Tensor, candidate: Tensor, take: Tensor) -> Tensor:
    """Per channel, ``candidate`` where ``take`` and it is strictly larger in magnitude, else
    ``current``. Strictness is what gives ties to the value already held."""
    wins = take.unsqueeze(-1) & (candidate.abs() > current.abs())
    return torch.where(wins, candidate, current)


def _take_larger_norm(current: Tensor, candidate: Tensor, take: Tensor) -> Tensor:
    """The whole token with the larger L2 norm; ties keep the token already held."""
    wins = take & (candidate.float().norm(dim=-1) > current.float().norm(dim=-1))
    return torch.where(wins.unsqueeze(-1), candidate, current)


def _neighbour_similarity(x: Tensor, axis: int) -> Tensor:
    """Cosine of every token with its next neighbour along ``axis`` of a (B, H, W, C) grid:
    (B, H - 1, W) for axis 1, (B, H, W - 1) for axis 2. Computed as dot / (norm * norm), so no
    normalised copy of the whole grid is made."""
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    n = x.shape[axis]
    norms = torch.linalg.vector_norm(x, dim=-1).clamp_min(1e-12)  # (B, H, W)
    dots = (x.narrow(axis, 0, n - 1) * x.narrow(axis, 1, n - 1)).sum(-1)
    return dots / (norms.narrow(axis, 0, n - 1) * norms.narrow(axis, 1, n - 1))


@dataclass(frozen=True)
class _Plan:
    """Which tokens one pass removes, in the pass's own layout (B, L, N): L independent
    sequences of length N (rows for the row pass, columns for the column pass)."""

    keep: Tensor  # (B, L, N - r) kept positions, in order
    source: Tensor  # (B, L, r) removed positions, ascending
    destination: Tensor  # (B, L, r) the even neighbour each one merges into
    slot: Tensor  # (B, L, r) the destination's position among the kept tokens
    merges: Tensor  # (B, L, r) bool, whether the source contributes (reference collisions)
    shared: Tensor  # (B, L, r - 1) bool, sources j and j + 1 share a destination
    index: Tensor  # (B, L, N) position among the kept tokens of the token holding each one


def _descending_rank(score: Tensor) -> Tensor:
    """(..., N) -> (..., N) int64: each entry's place when sorted by descending score, equal
    scores in position order (a stable sort's order, so the leftmost token wins a tie on every
    device). Counted with comparisons rather than sorted: N is half a grid side, and ONNX has
    no stable sort."""
    n = score.shape[-1]
    positions = torch.arange(n, device=score.device)
    mine, other = score.unsqueeze(-1), score.unsqueeze(-2)  # (..., N, 1), (..., 1, N)
    ahead = (other > mine) | ((other == mine) & (positions < positions.unsqueeze(-1)))
    return ahead.sum(-1)


def _true_positions(mask: Tensor, count: int) -> Tensor:
    """(..., N) bool with ``count`` True per line -> (..., count) their positions, ascending.
    A cumulative count gives each True its slot; scattered, not sorted, for the same reason."""
    n = mask.shape[-1]
    positions = torch.arange(n, device=mask.device).expand_as(mask)
    slot = torch.where(mask, mask.long().cumsum(-1) - 1, count)  # the others: a spare slot
    out = torch.zeros(mask.shape[:-1] + (count + 1,), dtype=torch.long, device=mask.device)
    return out.scatter_(-1, slot, positions)[..., :count]


def _plan(sim: Tensor, r: int, collisions: str) -> _Plan:
    """Localized matching on similarities ``sim`` (B, L, N - 1) between neighbours."""
    n = sim.shape[-1] + 1
    n_odd = n // 2
    positions = torch.arange(n, device=sim.device)
    left = sim[..., 0::2][..., :n_odd]  # odd token 2k+1 vs its left neighbour 2k
    right = sim[..., 1::2]  # odd token 2k+1 vs 2k+2; missing for a last odd token
    right = F.pad(right, (0, n_odd - right.shape[-1]), value=float("-inf"))
    goes_right = right > left  # ties go left
    score = torch.maximum(left, right)  # (B, L, n_odd)
    rank = _descending_rank(score)
    chosen = _true_positions(rank < r, r)  # (B, L, r) odd slots, left to right
    source = 2 * chosen + 1
    destination = 2 * (chosen + goes_right.gather(-1, chosen))
    # Two sources share a destination only as neighbours in `chosen`: the left one going right,
    # the right one going left.
    shared = destination[..., 1:] == destination[..., :-1]
    merges = torch.ones_like(chosen, dtype=torch.bool)
    if collisions == "reference":
        # The reference scatters even-ranked then odd-ranked sources into the destinations,
        # each as max-magnitude against the *original* destination, so the second write wins:
        # the odd-ranked source, or among equal parities the later-ranked one.
        rank = rank.gather(-1, chosen)
        key = (rank % 2) * n + rank  # larger key = written later
        left_loses = shared & (key[..., 1:] > key[..., :-1])
        right_loses = shared & (key[..., :-1] > key[..., 1:])
        merges = merges & ~F.pad(left_loses, (0, 1)) & ~F.pad(right_loses, (1, 0))
    kept = torch.ones(sim.shape[:-1] + (n,), dtype=torch.bool, device=sim.device)
    kept.scatter_(-1, source, False)
    new_position = kept.long().cumsum(-1) - 1  # (B, L, N)
    holder = positions.expand_as(new_position).scatter(-1, source, destination)
    keep = _true_positions(kept, n - r)
    return _Plan(
        keep=keep,
        source=source,
        destination=destination,
        slot=new_position.gather(-1, destination),
        merges=merges,
        shared=shared,
        index=new_position.gather(-1, holder),
    )


def _combine(src: Tensor, dst: Tensor, plan: _Plan, reduce: str, w_src: Tensor | None, w_dst: Tensor | None) -> Tensor:
    """(B, L, r, C) sources and destinations -> each destination combined with all its sources,
    one row per source (a shared destination appears twice with the same value)."""
    shared, merges = plan.shared, plan.merges
    if reduce == "mean":
        assert w_src is not None and w_dst is not None
        w_src = (w_src * merges).unsqueeze(-1).to(src.dtype)
        w_dst = w_dst.unsqueeze(-1).to(src.dtype)
        weighted, weight = dst * w_dst + src * w_src, w_dst + w_src
        both = (weighted[..., :-1, :] + src[..., 1:, :] * w_src[..., 1:, :]) / (
            weight[..., :-1, :] + w_src[..., 1:, :]
        )
        first = weighted / weight
    else:
        take = _take_larger_magnitude if reduce == "maxmag" else _take_larger_norm
        first = take(dst, src, merges)  # each destination with its own source
        # A shared destination took its left source first; now the right one.
        both = take(first[..., :-1, :], src[..., 1:, :], shared & merges[..., 1:])
    # The right row of a pair writes the same slot again: detached, so that slot's gradient
    # reaches the merged value once.
    pair_left = F.pad(shared, (0, 1)).unsqueeze(-1)
    pair_right = F.pad(shared, (1, 0)).unsqueeze(-1)
    merged = torch.where(pair_right, F.pad(both, (0, 0, 1, 0)).detach(), first)
    return torch.where(pair_left, F.pad(both, (0, 0, 0, 1)), merged)


def _to_pass_layout(t: Tensor, axis: int) -> Tensor:
    """(B, H, W) -> (B, L, N) with the merged axis last."""
    return t.transpose(1, 2) if axis == 1 else t


def _from_pass_layout(t: Tensor, axis: int) -> Tensor:
    return t.transpose(1, 2) if axis == 1 else t


def _merge_axis(
    x: Tensor,
    r: int,
    axis: int,
    metric: Tensor | None,
    size: Tensor | None,
    reduce: str,
    collisions: str,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """One pass over a (B, H, W, C) grid: remove ``r`` tokens from every column (axis 1) or
    every row (axis 2). Tokens move as whole rows of a (B * H * W, C) view (``index_select``),
    and the output comes out directly in (B, H', W', C) order: no layout copies.

    Returns y, the reduced metric (or None), the reduced sizes (or None) and the pass's index
    (B, L, N) in pass layout.
    """
    b, h, w, _ = x.shape
    other = x.shape[3 - axis]
    with torch.no_grad():
        sim = _neighbour_similarity(x if metric is None else metric, axis)
        plan = _plan(_to_pass_layout(sim, axis), r, collisions)
        lines = torch.arange(b * other, device=x.device).view(b, other, 1)  # (B, L, 1)

        def flat_in(pos: Tensor) -> Tensor:
            """Pass-layout positions (B, L, k) -> rows of the input's (B*H*W, C) view."""
            if axis == 2:
                return lines * w + pos
            return ((lines // w) * h + pos) * w + lines % w

        out_h, out_w = (h - r, w) if axis == 1 else (h, w - r)
        keep_rows = _from_pass_layout(flat_in(plan.keep), axis).reshape(-1)  # output order

        def flat_out(pos: Tensor) -> Tensor:
            """Pass-layout positions among the kept tokens -> rows of the output's view."""
            if axis == 2:
                return lines * out_w + pos
            return ((lines // w) * out_h + pos) * out_w + lines % w

        src_rows, dst_rows = flat_in(plan.source).reshape(-1), flat_in(plan.destination).reshape(-1)
        slot_rows = flat_out(plan.slot).reshape(-1)
        sizes = None if size is None else _to_pass_layout(size, axis)

    def reduce_pass(t: Tensor) -> Tensor:
        rows = t.reshape(b * h * w, t.shape[-1])
        y = rows.index_select(0, keep_rows)  # the survivors, already in output order
        shape = plan.source.shape + (t.shape[-1],)
        merged = _combine(
            rows.index_select(0, src_rows).view(shape),
            rows.index_select(0, dst_rows).view(shape),
            plan,
            reduce,
            None if sizes is None else sizes.gather(-1, plan.source),
            None if sizes is None else sizes.gather(-1, plan.destination),
        )
        return y.index_copy_(0, slot_rows, merged.reshape(-1, t.shape[-1])).view(b, out_h, out_w, -1)

    y = reduce_pass(x.contiguous())
    new_metric = None if metric is None else reduce_pass(metric.contiguous())
    new_size = None
    if sizes is not None:
        gained = (sizes.gather(-1, plan.source) * plan.merges).to(sizes.dtype)
        new_size = _from_pass_layout(sizes.gather(-1, plan.keep).scatter_add(-1, plan.slot, gained), axis)
    return y, new_metric, new_size, plan.index


def merge_1d(
    x: Tensor,
    r: int,
    metric: Tensor | None = None,
    size: Tensor | None = None,
    reduce: Reduce = "maxmag",
    collisions: Collisions = "exact",
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """One localized-matching pass along dim -2: remove ``r`` tokens from every sequence.

    Args:
        x: (..., N, C) tokens; every leading index is an independent sequence (a row or column).
        r: tokens to remove from every sequence, 0 <= r <= N // 2.
        metric: (..., N, Cm) features the neighbour similarity is computed on; defaults to ``x``.
            It is reduced alongside ``x`` so a following pass can use it.
        size: (..., N) how many original tokens each token holds; needed by ``reduce="mean"``.
        reduce: how a destination and its sources become one token (see ``cubist_merge``).
        collisions: ``exact`` merges both sources of a destination that receives two;
            ``reference`` keeps only the one the public reference code's scatter keeps.

    Returns:
        ``(y, metric', size', index)``: y (..., N - r, C); the reduced metric (or None when it was
        ``x`` itself); the reduced sizes (or None when ``size`` was None); and index (..., N)
        int64, the position in y of the token that holds each original position.
    """
    n = x.shape[-2]
    check_removal(r, n, "r")
    check_choice("reduce", reduce, REDUCE_RULES)
    check_choice("collisions", collisions, COLLISION_RULES)
    lead = x.shape[:-2]
    if r == 0:
        return x, metric, size, torch.arange(n, device=x.device).expand(*lead, n)
    if reduce == "mean" and size is None:
        size = torch.ones(x.shape[:-1], device=x.device)

    def as_grid(t: Tensor | None, channels: bool = True) -> Tensor | None:
        if t is None:
            return None
        return t.reshape(-1, 1, n, t.shape[-1]) if channels else t.reshape(-1, 1, n)

    y, new_metric, new_size, index = _merge_axis(
        as_grid(x), r, 2, as_grid(metric), as_grid(size, channels=False), reduce, collisions
    )
    return (
        y.view(*lead, n - r, x.shape[-1]),
        None if new_metric is None else new_metric.view(*lead, n - r, -1),
        None if new_size is None else new_size.view(*lead, n - r),
        index.view(*lead, n),
    )


def cubist_merge(
    x: Tensor,
    r_h: int,
    r_w: int,
    *,
    metric: Tensor | None = None,
    size: Tensor | None = None,
    reduce: Reduce = "maxmag",
    collisions: Collisions = "exact",
) -> tuple[Tensor, CubistRecord]:
    """Merge a token grid to ``(H - r_h, W - r_w)``: rows first (width loses r_w), then columns.

    Args:
        x: (B, H, W, C) patch tokens (prefix tokens such as CLS split off by the caller).
        r_h: tokens removed from every column (height shrinks by r_h), 0 <= r_h <= H // 2.
        r_w: tokens removed from every row (width shrinks by r_w), 0 <= r_w <= W // 2.
        metric: optional (B, H, W, Cm) features to match on instead of the tokens themselves.
        size: optional (B, H, W) tokens held by each cell; only ``reduce="mean"`` uses it.
        reduce: ``maxmag`` (paper: per channel, the value of largest magnitude among the
            destination and all its sources; ties keep the destination, then the left source),
            ``mean`` (size-weighted average as ToMe) or ``maxnorm`` (the whole token of largest
            L2 norm).
        collisions: ``exact`` or ``reference`` (see ``merge_1d``).

    Returns:
        ``(y, record)``: y (B, H - r_h, W - r_w, C) and the record ``cubist_recover`` needs.
    """
    if x.dim() != 4:
        raise ValueError(f"cubist_merge expects a (B, H, W, C) grid, got shape {tuple(x.shape)}")
    b, h, w, _ = x.shape
    check_removal(r_w, w, "r_w")
    check_removal(r_h, h, "r_h")
    check_choice("reduce", reduce, REDUCE_RULES)
    check_choice("collisions", collisions, COLLISION_RULES)
    if r_h == 0 and r_w == 0:
        index = torch.arange(h * w, device=x.device).expand(b, h * w)
        return x, CubistRecord(index, (h, w), (h, w))
    w2, h2 = w - r_w, h - r_h
    if reduce == "mean" and size is None:
        size = torch.ones(b, h, w, device=x.device)
    w_slot = torch.arange(w, device=x.device).expand(b, h, w)  # (B, H, W)
    if r_w:  # row pass: every row is a sequence along W
        x, metric, size, w_slot = _merge_axis(x, r_w, 2, metric, size, reduce, collisions)
    h_slot = torch.arange(h, device=x.device).expand(b, w2, h)  # (B, W', H)
    if r_h:  # column pass on the row-merged grid: every column is a sequence along H
        x, _, _, h_slot = _merge_axis(x, r_h, 1, metric, size, reduce, collisions)
    # Compose both passes into one flat map: cell (h, w) -> row slot w', then column slot h'.
    h_of_cell = h_slot.transpose(1, 2).gather(2, w_slot)  # (B, H, W)
    index = (h_of_cell * w2 + w_slot).reshape(b, h * w)
    return x, CubistRecord(index, (h, w), (h2, w2))


def cubist_recover(y: Tensor, record: CubistRecord) -> Tensor:
    """Undo ``cubist_merge``: every original cell gets the current feature of the token holding it.

    Args:
        y: (B, H', W', C) tokens on the reduced grid, e.g. after more transformer blocks.
        record: the record ``cubist_merge`` returned.

    Returns:
        (B, H, W, C) on the original grid.
    """
    b, h2, w2, c = y.shape
    if (h2, w2) != record.out_hw or b != record.index.shape[0]:
        raise ValueError(
            f"cubist_recover got a grid of shape {tuple(y.shape)} but the record expects "
            f"(B={record.index.shape[0]}, {record.out_hw[0]}, {record.out_hw[1]}, C); pass the "
            "record of the merge that produced this grid"
        )
    h, w = record.in_hw
    if (h, w) == (h2, w2):
        return y
    # Whole token rows of a (B * H' * W', C) view: a row copy per cell, no per-element indexing.
    offsets = torch.arange(b, device=y.device).unsqueeze(1) * (h2 * w2)
    rows = (record.index + offsets).reshape(-1)
    return y.reshape(b * h2 * w2, c).index_select(0, rows).view(b, h, w, c)


def ratio_to_r(hw: tuple[int, int], ratio: float) -> tuple[int, int]:
    """Per-axis ratio -> (r_h, r_w) with ``r = round(side * ratio)``; 0 <= ratio < 0.5."""
    check_ratio(ratio)
    return round(hw[0] * ratio), round(hw[1] * ratio)


def window_aligned_r(hw: tuple[int, int], ratio: float, window: int) -> tuple[int, int]:
    """Like ``ratio_to_r`` but lands each reduced side on a multiple of ``window``.

    SAM's window blocks pad the grid up to a multiple of the window (64 -> 70 for 14), so a reduced
    side of 57..63 saves nothing there. Each axis takes, among the sides one pass can reach
    (multiples of ``window`` in ``[ceil(H / 2), H]``, plus ``H`` itself, i.e. no merge), the one
    nearest to the requested side ``H - round(H * ratio)``; ties keep more tokens.
    """
    check_ratio(ratio)
    if window < 1:
        raise ValueError(f"window={window} must be >= 1 (the backbone's attention window size)")
    out = []
    for side in hw:
        target = side - round(side * ratio)
        reachable = [s for s in range(window, side + 1, window) if 2 * s >= side] + [side]
        best = min(reachable, key=lambda s: (abs(s - target), -s))
        out.append(side - best)
    return out[0], out[1]


def check_ratio(ratio: float) -> None:
    """Reject a per-axis ratio outside [0, 0.5), naming the value, the limit and the fix."""
    if not 0 <= ratio < 0.5:
        raise ValueError(
            f"ratio={ratio} is out of range: it is the share of tokens removed per axis in one "
            "merge and must satisfy 0 <= ratio < 0.5; use stages to merge more"
        )
