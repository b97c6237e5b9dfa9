"""Test-only views of merge results: ToMe source maps and CubistMerge record composition."""

from __future__ import annotations

import torch
from torch import Tensor

from spatialmerge.merging.cubist import CubistRecord
from spatialmerge.merging.tome import MergeFn


def merge_source(merge_fn: MergeFn, x: Tensor, source: Tensor | None = None) -> Tensor:
    """Track which original tokens each merged token holds: (B, N, N0) -> (B, N', N0) 0/1 map.

    `source` None starts from the identity over the N tokens of `x` (B, N, C). Each original
    token belongs to exactly one token, so summing rows keeps entries 0/1.
    """
    if source is None:
        batch, num_tokens, _ = x.shape
        source = torch.eye(num_tokens, device=x.device, dtype=x.dtype)
        source = source.expand(batch, num_tokens, num_tokens)  # (B, N, N)
    return merge_fn(source, mode="sum")


def compose(earlier: CubistRecord, later: CubistRecord) -> CubistRecord:
    """One record for ``later`` applied on ``earlier``'s reduced grid: recovering through it
    equals recovering through ``later`` then ``earlier``."""
    if later.in_hw != earlier.out_hw:
        raise ValueError(
            f"cannot compose merges: the later merge starts from a {later.in_hw} grid but "
            f"this one produced {earlier.out_hw}; compose records in the order they were applied"
        )
    return CubistRecord(later.index.gather(1, earlier.index), earlier.in_hw, later.out_hw)


def cell_sizes(record: CubistRecord) -> Tensor:
    """(B, H', W') float: how many original cells each reduced token of ``record`` holds."""
    b = record.index.shape[0]
    h, w = record.out_hw
    ones = torch.ones_like(record.index, dtype=torch.float32)
    sizes = torch.zeros(b, h * w, device=record.index.device).scatter_add_(1, record.index, ones)
    return sizes.view(b, h, w)
