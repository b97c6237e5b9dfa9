"""ToMe: bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

Pure tensor code, no model knowledge. `bipartite_soft_matching` decides which tokens merge and
returns closures that apply (and undo) that decision to any tensor with the same token axis, so
the same matching moves features, sizes and source maps consistently.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

_MODES = ("mean", "sum")


class MergeFn(Protocol):
    """(B, N, C) -> (B, N - r, C): reduce each group of matched tokens by "mean" or "sum"."""

    def __call__(self, x: Tensor, mode: str = "mean") -> Tensor: ...


class UnmergeFn(Protocol):
    """(B, N - r, C) -> (B, N, C): give every original token its merged token's value."""

    def __call__(self, x: Tensor) -> Tensor: ...


def max_r(num_tokens: int, num_prefix_tokens: int = 0) -> int:
    """Most tokens one matching step can remove: one per unprotected token of set A.

    Set A holds the even positions, set B the odd ones; the first `num_prefix_tokens` positions
    are protected in both sets. Nothing can merge if set B has no unprotected token.
    """
    num_a, num_b = (num_tokens + 1) // 2, num_tokens // 2
    prot_a, prot_b = (num_prefix_tokens + 1) // 2, num_prefix_tokens // 2
    if num_b - prot_b <= 0:
        return 0
    return max(num_a - prot_a, 0)


def bipartite_soft_matching(
    metric: Tensor, r: int, num_prefix_tokens: int = 0
) -> tuple[MergeFn, UnmergeFn]:
    """Match tokens of `metric` (B, N, C) and return `(merge_fn, unmerge_fn)` removing `r` tokens.

    Tokens alternate into sets A (even positions) and B (odd positions); each A token proposes
    its most cosine-similar B token and the `r` most similar proposals are merged (A token into
    its B partner). The first `num_prefix_tokens` tokens (CLS, distillation, registers) are
    neither sources nor destinations, and `merge_fn` keeps them, in order, at the front.

    `merge_fn(x, mode)`: (B, N, C') -> (B, N - r, C'), reducing each group by "mean" or "sum";
    the order is prefix tokens, then unmerged A tokens, then B tokens (as ToMe).
    `unmerge_fn(y)`: (B, N - r, C') -> (B, N, C'), each token gets its merged token's value.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, N, C), got shape {tuple(metric.shape)}")
    batch, num_tokens, _ = metric.shape
    if not 0 <= num_prefix_tokens <= num_tokens:
        raise ValueError(
            f"num_prefix_tokens={num_prefix_tokens} must be in [0, {num_tokens}] "
            f"(the number of tokens in metric)"
        )
    limit = max_r(num_tokens, num_prefix_tokens)
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"r must be an int, got {r!r}")
    if not 0 <= r <= limit:
        raise ValueError(
            f"r={r} is outside [0, {limit}]: {num_tokens} tokens with {num_prefix_tokens} "
            f"prefix tokens allow at most {limit} merges in one step (one per unprotected "
            f"token of the alternating set A); lower r or spread it with parse_r"
        )

    if r == 0:
        return _identity_closures(batch, num_tokens)

    slot = _match(metric, r, num_prefix_tokens)  # (B, N): output position of each token
    num_out = num_tokens - r

    def merge_fn(x: Tensor, mode: str = "mean") -> Tensor:
        _check_tokens(x, batch, num_tokens, "merge_fn")
        _check_mode(mode)
        index = slot[..., None].expand(-1, -1, x.shape[-1])  # (B, N, C')
        out = x.new_zeros(batch, num_out, x.shape[-1])
        # include_self=False: every output slot receives at least one token, so the zeros
        # never enter a mean
        return out.scatter_reduce(1, index, x, reduce=mode, include_self=False)

    def unmerge_fn(x: Tensor) -> Tensor:
        _check_tokens(x, batch, num_out, "unmerge_fn")
        return x.gather(1, slot[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, C')

    return merge_fn, unmerge_fn


@torch.no_grad()
def _match(metric: Tensor, r: int, num_prefix_tokens: int) -> Tensor:
    """Output position (B, N) of every token after merging `r` tokens."""
    batch, num_tokens, _ = metric.shape
    device = metric.device
    prot_a, prot_b = (num_prefix_tokens + 1) // 2, num_prefix_tokens // 2

    # float32 scores even under autocast: low-precision cosines tie often and flip the matching
    with torch.autocast(device.type, enabled=False):
        metric = F.normalize(metric.float(), dim=-1)
        a, b = metric[:, ::2], metric[:, 1::2]  # (B, N_A, C), (B, N_B, C)
        scores = a @ b.transpose(1, 2)  # (B, N_A, N_B)
    # protected rows can never be sources, protected columns never destinations
    scores[:, :prot_a, :] = -math.inf
    scores[:, :, :prot_b] = -math.inf

    node_max, node_idx = scores.max(dim=-1)  # (B, N_A): best B partner of each A token
    edge_idx = node_max.argsort(dim=-1, descending=True)  # (B, N_A)
    src_idx = edge_idx[:, :r]  # (B, r)
    unm_idx = edge_idx[:, r:]  # (B, N_A - r)
    if num_prefix_tokens > 0:
        # protected A tokens score -inf and would sit last; sorting by index puts them first
        unm_idx = unm_idx.sort(dim=-1).values
    dst_idx = node_idx.gather(1, src_idx)  # (B, r)

    num_a, num_b = a.shape[1], b.shape[1]
    num_unm = num_a - r
    # Output layout: prefix tokens at their own positions, then unmerged A, then B tokens.
    # Protected tokens are the first prot_a entries of unm_idx and the first prot_b of B.
    p = torch.arange(num_unm, device=device)
    pos_unm = torch.where(p < prot_a, 2 * p, num_prefix_tokens + p - prot_a)  # (N_A - r,)
    j = torch.arange(num_b, device=device)
    pos_b = torch.where(
        j < prot_b, 2 * j + 1, num_prefix_tokens + num_unm - prot_a + j - prot_b
    )  # (N_B,)

    slot_a = torch.empty(batch, num_a, dtype=torch.long, device=device)
    slot_a.scatter_(1, unm_idx, pos_unm.expand(batch, -1))
    slot_a.scatter_(1, src_idx, pos_b[dst_idx])  # sources land where their destination lands
    slot = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    slot[:, ::2] = slot_a
    slot[:, 1::2] = pos_b
    return slot


def _identity_closures(batch: int, num_tokens: int) -> tuple[MergeFn, UnmergeFn]:
    def merge_fn(x: Tensor, mode: str = "mean") -> Tensor:
        _check_tokens(x, batch, num_tokens, "merge_fn")
        _check_mode(mode)
        return x

    def unmerge_fn(x: Tensor) -> Tensor:
        _check_tokens(x, batch, num_tokens, "unmerge_fn")
        return x

    return merge_fn, unmerge_fn


def _check_tokens(x: Tensor, batch: int, num_tokens: int, name: str) -> None:
    if x.dim() != 3 or x.shape[0] != batch or x.shape[1] != num_tokens:
        raise ValueError(
            f"{name} expects a (B={batch}, N={num_tokens}, C) tensor matching the metric it "
            f"was built from, got shape {tuple(x.shape)}"
        )


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} is not supported; use one of {_MODES}")


def merge_wavg(
    merge_fn: MergeFn, x: Tensor, size: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Merge `x` (B, N, C) as a size-weighted average: returns x' (B, N', C), size' (B, N', 1).

    Weighting by size keeps a token that already stands for many patches from being diluted by
    a single one. `size` (B, N, 1) counts the patches each token holds; None means all ones.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])  # (B, N, 1)
    x = merge_fn(x * size, mode="sum")
    size = merge_fn(size, mode="sum")
    return x / size, size


def parse_r(num_layers: int, r: int | tuple[int, float] | list[int]) -> list[int]:
    """Per-layer merge counts from a ToMe schedule.

    - int: the same r in every layer;
    - (r, inflection) with inflection in [-1, 1]: a linear schedule averaging r, decreasing for
      inflection < 0 (from 2r to 0 at -1), increasing for > 0, constant at 0 (as ToMe);
    - list: explicit per-layer values, padded with zeros up to `num_layers`.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r} must be an int >= 1")

    if isinstance(r, list):
        if len(r) > num_layers:
            raise ValueError(
                f"r lists {len(r)} layers but the model has {num_layers}; "
                f"give at most {num_layers} values"
            )
        for value in r:
            _check_count(value, "every entry of the r list")
        return list(r) + [0] * (num_layers - len(r))

    inflection = 0.0
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"a schedule r must be (r, inflection), got {r!r}")
        r, inflection = r
        if isinstance(inflection, bool) or not isinstance(inflection, (int, float)):
            raise ValueError(f"inflection must be a number in [-1, 1], got {inflection!r}")
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(
                f"inflection={inflection} is outside [-1, 1]; -1 is the most decreasing "
                f"schedule, 1 the most increasing, 0 constant"
            )
    _check_count(r, "r")

    if num_layers == 1:
        return [r]
    min_val = int(r * (1.0 - inflection))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def _check_count(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{name} must be a non-negative int (tokens merged per layer), got {value!r}"
        )
