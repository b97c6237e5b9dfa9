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
    """What undoing one or more merges needs.

    Attributes:
        index: (B, H * W) int64. For every cell of the original grid, the flat index
            (``h' * W' + w'``) of the reduced-grid token that holds it.
        in_hw: the original grid size (H, W).
        out_hw: the reduced grid size (H', W').
    """

    index: Tensor
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]

    def then(self, later: "CubistRecord") -> "CubistRecord":
        """Compose with a merge applied afterwards on this record's reduced grid."""
        if later.in_hw != self.out_hw:
            raise ValueError(
                f"cannot compose merges: the later merge starts from a {later.in_hw} grid but "
                f"this one produced {self.out_hw}; compose records in the order they were applied"
            )
        return CubistRecord(later.index.gather(1, self.index), self.in_hw, later.out_hw)

    def cell_sizes(self) -> Tensor:
        """(B, H', W') float: how many original cells each reduced token holds."""
        b = self.index.shape[0]
        h, w = self.out_hw
        ones = torch.ones_like(self.index, dtype=torch.float32)
        sizes = torch.zeros(b, h * w, device=self.index.device).scatter_add_(1, self.index, ones)
        return sizes.view(b, h, w)


def _check_rule(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(valid)}")


def _check_r(r: int, n: int, axis: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool):
        raise ValueError(f"{axis}={r!r} must be an int (tokens removed per pass)")
    if r < 0 or r > n // 2:
        raise ValueError(
            f"{axis}={r} is out of range for a side of {n} tokens: one pass removes between 0 and "
            f"floor({n}/2)={n // 2} tokens; lower {axis} or merge again in a second stage"
        )


def _max_magnitude(current: Tensor, candidate: Tensor, take: Tensor) -> Tensor:
    """Per channel, replace ``current`` by ``candidate`` where ``take`` and it is strictly larger
    in magnitude. Strictness is what gives ties to the value already held."""
    wins = take.unsqueeze(-1) & (candidate.abs() > current.abs())
    return torch.where(wins, candidate, current)


def _max_norm(current: Tensor, candidate: Tensor, take: Tensor) -> Tensor:
    """Keep the whole token with the larger L2 norm; ties keep the token already held."""
    wins = take & (candidate.float().norm(dim=-1) > current.float().norm(dim=-1))
    return torch.where(wins.unsqueeze(-1), candidate, current)


def _shift_right(t: Tensor, length: int, fill: float | bool) -> Tensor:
    """(..., n) -> (..., length) with ``t[k]`` at ``k + 1``: odd slot k's value seen from even
    slot k + 1, whose left neighbour it is."""
    pad = length - t.shape[-1] - 1
    return F.pad(t, (1, pad), value=fill)


def _shift_right_tokens(t: Tensor, length: int) -> Tensor:
    # (..., n_odd, C) -> (..., length, C) with t[k] at k + 1 and zeros elsewhere
    pad = length - t.shape[-2] - 1
    return F.pad(t, (0, 0, 1, pad))


def _pad_tokens(t: Tensor, length: int) -> Tensor:
    # (..., n, C) -> (..., length, C) padded with zeros at the end
    return F.pad(t, (0, 0, 0, length - t.shape[-2]))


def _interleave(even: Tensor, odd: Tensor) -> Tensor:
    """(..., ceil(N/2), C) and (..., floor(N/2), C) -> (..., N, C) with even/odd positions."""
    n = even.shape[-2] + odd.shape[-2]
    pairs = torch.stack((even, _pad_tokens(odd, even.shape[-2])), dim=-2)  # (..., ceil, 2, C)
    return pairs.flatten(-3, -2)[..., :n, :]


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
    _check_r(r, n, "r")
    positions = torch.arange(n, device=x.device)
    if r == 0:
        return x, metric, size, positions.expand(x.shape[:-1])
    n_odd, n_even = n // 2, (n + 1) // 2

    with torch.no_grad():
        m = F.normalize((x if metric is None else metric).float(), dim=-1)
        sim = (m[..., :-1, :] * m[..., 1:, :]).sum(-1)  # (..., N - 1): sim[i] = cos(t_i, t_i+1)
        left = sim[..., 0::2][..., :n_odd]  # odd token 2k+1 vs its left neighbour 2k
        right = sim[..., 1::2]  # odd token 2k+1 vs 2k+2; missing for a last odd token
        right = F.pad(right, (0, n_odd - right.shape[-1]), value=float("-inf"))
        goes_right = right > left  # ties go left
        score = torch.maximum(left, right)  # (..., n_odd)
        # A stable sort makes equal scores pick the leftmost token on every device.
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        chosen = order[..., :r]  # (..., r) odd-slot indices
        removed = torch.zeros_like(goes_right).scatter_(-1, chosen, True)  # (..., n_odd)

        from_left = _shift_right(removed & goes_right, n_even, False)  # even e <- odd e-1
        from_right = F.pad(removed & ~goes_right, (0, n_even - n_odd), value=False)  # e <- odd e
        if collisions == "reference":
            # The reference scatters even-ranked then odd-ranked sources into the destinations,
            # each as max-magnitude against the *original* destination, so the second write wins:
            # the odd-ranked source, or among equal parities the later-ranked one.
            rank = torch.empty_like(order).scatter_(-1, order, positions[:n_odd].expand_as(order))
            key = (rank % 2) * n + rank  # larger key = written later
            left_key = _shift_right(key, n_even, -1)
            right_key = F.pad(key, (0, n_even - n_odd), value=-1)
            both = from_left & from_right
            from_left = from_left & ~(both & (right_key > left_key))
            from_right = from_right & ~(both & (left_key > right_key))

        kept = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        kept[..., 1::2] = ~removed
        new_position = kept.long().cumsum(-1) - 1  # (..., N)
        destination = positions.expand_as(new_position).clone()
        odd_positions = destination[..., 1::2]
        destination[..., 1::2] = torch.where(removed, odd_positions - 1 + 2 * goes_right, odd_positions)
        index = new_position.gather(-1, destination)  # (..., N)
        # Stable sort of the removed flags lists the kept positions first, in their order.
        keep_index = torch.sort((~kept).to(torch.uint8), dim=-1, stable=True).indices[..., : n - r]

    def reduce_pass(t: Tensor, t_size: Tensor | None) -> Tensor:
        even, odd = t[..., 0::2, :], t[..., 1::2, :]
        left_src, right_src = _shift_right_tokens(odd, n_even), _pad_tokens(odd, n_even)
        if reduce == "maxmag":
            merged = _max_magnitude(even, left_src, from_left)
            merged = _max_magnitude(merged, right_src, from_right)
        elif reduce == "maxnorm":
            merged = _max_norm(even, left_src, from_left)
            merged = _max_norm(merged, right_src, from_right)
        else:
            assert t_size is not None
            s_even, s_odd = t_size[..., 0::2], t_size[..., 1::2]
            s_left = _shift_right(s_odd, n_even, 0.0) * from_left
            s_right = F.pad(s_odd, (0, n_even - n_odd)) * from_right
            total = (s_even + s_left + s_right).unsqueeze(-1).to(t.dtype)
            merged = (
                even * s_even.unsqueeze(-1).to(t.dtype)
                + left_src * s_left.unsqueeze(-1).to(t.dtype)
                + right_src * s_right.unsqueeze(-1).to(t.dtype)
            ) / total
        full = _interleave(merged, odd)  # (..., N, C)
        return full.gather(-2, keep_index.unsqueeze(-1).expand(*keep_index.shape, t.shape[-1]))

    _check_rule("reduce", reduce, REDUCE_RULES)
    _check_rule("collisions", collisions, COLLISION_RULES)
    if reduce == "mean" and size is None:
        size = torch.ones(x.shape[:-1], device=x.device)
    y = reduce_pass(x, size)
    new_metric = None if metric is None else reduce_pass(metric, size)
    new_size = None
    if size is not None:
        s_even = size[..., 0::2]
        s_even = s_even + _shift_right(size[..., 1::2], n_even, 0.0) * from_left
        s_even = s_even + F.pad(size[..., 1::2], (0, n_even - n_odd)) * from_right
        s_full = _interleave(s_even.unsqueeze(-1), size[..., 1::2].unsqueeze(-1)).squeeze(-1)
        new_size = s_full.gather(-1, keep_index)
    return y, new_metric, new_size, index


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
    _check_r(r_w, w, "r_w")
    _check_r(r_h, h, "r_h")
    _check_rule("reduce", reduce, REDUCE_RULES)
    _check_rule("collisions", collisions, COLLISION_RULES)
    if r_h == 0 and r_w == 0:
        index = torch.arange(h * w, device=x.device).expand(b, h * w)
        return x, CubistRecord(index, (h, w), (h, w))
    w2, h2 = w - r_w, h - r_h
    # Row pass: every row (B, H) is a sequence along W.
    y, metric, size, row_index = merge_1d(x, r_w, metric, size, reduce, collisions)  # (B, H, W', C)
    # Column pass on a transposed view, so nothing is copied just to change the layout.
    y, _, _, col_index = merge_1d(
        y.transpose(1, 2),
        r_h,
        None if metric is None else metric.transpose(1, 2),
        None if size is None else size.transpose(1, 2),
        reduce,
        collisions,
    )  # (B, W', H', C)
    y = y.transpose(1, 2).contiguous()  # (B, H', W', C)
    # Compose both passes into one flat map: cell (h, w) -> row slot w', then column slot h'.
    w_slot = row_index  # (B, H, W)
    h_slot = col_index.transpose(1, 2).gather(2, w_slot)  # (B, H, W)
    index = (h_slot * w2 + w_slot).reshape(b, h * w)
    return y, CubistRecord(index, (h, w), (h2, w2))


def cubist_recover(y: Tensor, record: CubistRecord) -> Tensor:
    """Undo ``cubist_merge``: every original cell gets the current feature of the token holding it.

    Args:
        y: (B, H', W', C) tokens on the reduced grid, e.g. after more transformer blocks.
        record: the record ``cubist_merge`` returned (or several composed with ``then``).

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
    flat = y.reshape(b, h2 * w2, c)
    return flat.gather(1, record.index.unsqueeze(-1).expand(b, h * w, c)).view(b, h, w, c)


def ratio_to_r(hw: tuple[int, int], ratio: float) -> tuple[int, int]:
    """Per-axis ratio -> (r_h, r_w) with ``r = round(side * ratio)``; 0 <= ratio < 0.5."""
    _check_ratio(ratio)
    return round(hw[0] * ratio), round(hw[1] * ratio)


def window_aligned_r(hw: tuple[int, int], ratio: float, window: int) -> tuple[int, int]:
    """Like ``ratio_to_r`` but lands each reduced side on a multiple of ``window``.

    SAM's window blocks pad the grid up to a multiple of the window (64 -> 70 for 14), so a reduced
    side of 57..63 saves nothing there. Each axis takes, among the sides one pass can reach
    (multiples of ``window`` in ``[ceil(H / 2), H]``, plus ``H`` itself, i.e. no merge), the one
    nearest to the requested side ``H - round(H * ratio)``; ties keep more tokens.
    """
    _check_ratio(ratio)
    if window < 1:
        raise ValueError(f"window={window} must be >= 1 (the backbone's attention window size)")
    out = []
    for side in hw:
        target = side - round(side * ratio)
        reachable = [s for s in range(window, side + 1, window) if 2 * s >= side] + [side]
        best = min(reachable, key=lambda s: (abs(s - target), -s))
        out.append(side - best)
    return out[0], out[1]


def _check_ratio(ratio: float) -> None:
    if not 0 <= ratio < 0.5:
        raise ValueError(
            f"ratio={ratio} is out of range: it is the share of tokens removed per axis in one "
            "merge and must satisfy 0 <= ratio < 0.5; use stages to merge more"
        )
