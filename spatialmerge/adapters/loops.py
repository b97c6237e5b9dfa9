"""The block loops of patched forwards, written once for every family.

Two shapes of backbone:

- prefixed (timm ViT / Eva, ``transformers`` ViT / DeiT / DINOv2 / DINOv3): a sequence of prefix
  tokens (CLS, distillation, registers; never merged) then the H x W patch tokens in raster
  order. Before a scheduled block the patch tokens are viewed as a (B, H, W, C) grid, reduced,
  and put back behind the prefix; later blocks get the proportional-attention bias over the
  keys (``GridRun.key_bias``) and, for RoPE backbones, a table rebuilt for the reduced grid.
- grid (SAM, ``transformers`` SAM, SAM 2's Hiera): a prefix-free (B, H, W, C) grid, window and
  global blocks. Each block runs with the window side a per-window reduction left
  (``GridRun.block_window``) and under the bias partitioned into its windows
  (``GridRun.window_key_bias``); a merge lasts until the end of its stage, where it is recovered.

The blocks stay the backbone's own: a family passes how to call one (its arguments, gradient
checkpointing) and, for RoPE, how its rotary embedding lays out a grid.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Collection, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from spatialmerge.adapters.attention import key_bias
from spatialmerge.adapters.runtime import GridRun

# (block, tokens (B, P + N, C), key bias (B, 1, 1, P + N) or None, RoPE table or None) -> tokens
PrefixedBlockCall = Callable[[nn.Module, Tensor, Tensor | None, Any], Tensor]
# (block, grid (B, H, W, C)) -> grid
GridBlockCall = Callable[[nn.Module, Tensor], Tensor]


class GridRope(Protocol):
    """How one rotary embedding lays out tokens: the tables it builds are whatever its blocks
    take (timm: one tensor; ``transformers``: a (cos, sin) pair)."""

    def grid_table(self, hw: tuple[int, int]) -> Any:
        """The table of a uniform (H, W) grid over the embedding's normalised extent."""

    def cell_coords(self, hw: tuple[int, int]) -> Tensor:
        """(H * W, 2) float32 normalised coordinates of every cell of an (H, W) grid."""

    def coords_table(self, coords: Tensor) -> Any:
        """One table per image for tokens at (B, N, 2) coordinates, broadcasting over heads."""


def centroid_coords(
    coords: Tensor, assignment: Tensor, num_tokens: int, fallback: Tensor | None = None
) -> Tensor:
    """Mean coordinate of the original cells each reduced token holds.

    Args:
        coords: (N, 2) coordinate of every original cell.
        assignment: (B, N) int64, the reduced token each cell went to.
        num_tokens: N', the number of reduced tokens.
        fallback: optional (N', 2) coordinates for a token that holds no cell (Expedite can leave
            a cluster empty); without it such a token sits at the origin.

    Returns:
        (B, N', 2) float32.
    """
    b = assignment.shape[0]
    coords = coords.to(device=assignment.device, dtype=torch.float32).expand(b, -1, -1)  # (B, N, 2)
    index = assignment.unsqueeze(-1).expand(-1, -1, 2)  # (B, N, 2)
    sums = coords.new_zeros(b, num_tokens, 2).scatter_add_(1, index, coords)
    counts = coords.new_zeros(b, num_tokens).scatter_add_(1, assignment, coords.new_ones(assignment.shape))
    means = sums / counts.clamp_min(1).unsqueeze(-1)  # (B, N', 2)
    if fallback is not None:
        fallback = fallback.to(means)
        means = torch.where(counts.unsqueeze(-1) > 0, means, fallback.expand_as(means))
    return means


def merged_rope_table(rope: GridRope, run: GridRun, in_hw: tuple[int, int], hw: tuple[int, int]) -> Any:
    """The RoPE table for the (H', W') grid left by ``run``'s merges so far on an (H, W) input:
    ``positions="grid"`` a uniform H' x W' grid over the same extent (one table for the batch);
    ``"centroid"`` each token at the mean coordinate of the cells it holds (one per image), a
    token holding none at its cell of the uniform grid."""
    if run.config.positions == "grid":
        return rope.grid_table(hw)
    centroids = centroid_coords(
        rope.cell_coords(in_hw), run.assignment(), hw[0] * hw[1], fallback=rope.cell_coords(hw)
    )  # (B, H' * W', 2)
    return rope.coords_table(centroids)


def _recover_prefixed(run: GridRun, tokens: Tensor, hw: tuple[int, int], num_prefix: int) -> Tensor:
    """(B, P + H' * W', C) -> (B, P + H * W, C): undo the merges so far on the patch tokens."""
    if not run.records:
        return tokens
    grid = run.recover(tokens[:, num_prefix:].unflatten(1, hw))  # (B, H, W, C)
    return torch.cat([tokens[:, :num_prefix], grid.flatten(1, 2)], dim=1)


def run_prefixed_blocks(
    run: GridRun,
    tokens: Tensor,
    hw: tuple[int, int],
    num_prefix: int,
    blocks: Sequence[nn.Module],
    call_block: PrefixedBlockCall,
    rope_table: Any = None,
    rope: GridRope | None = None,
    take_indices: Collection[int] = (),
) -> tuple[Tensor, list[Tensor]]:
    """Run ``blocks`` on prefix + patch tokens with ``run``'s schedule, then ``run.finish()``.

    Args:
        tokens: (B, P + H * W, C), the ``num_prefix`` prefix tokens first.
        hw: the patch grid (H, W).
        call_block: runs one block on (tokens, key bias, RoPE table).
        rope_table: the model's own RoPE table of the full grid, None without RoPE.
        rope: how to rebuild ``rope_table`` after a merge (``merged_rope_table``); None keeps it.
        take_indices: blocks whose output is also returned, patch tokens recovered.

    Returns:
        The final tokens, (B, P + H' * W', C) or (B, P + H * W, C) with ``config.recover``, and
        the outputs of the ``take_indices`` blocks, each (B, P + H * W, C).
    """
    in_hw = hw
    bias = None
    intermediates = []
    for i, block in enumerate(blocks):
        if run.merges_at(i):
            grid = tokens[:, num_prefix:].unflatten(1, hw)  # (B, H, W, C)
            grid = run.before_block(i, grid, block)  # (B, H', W', C)
            merged_hw = (grid.shape[1], grid.shape[2])
            tokens = torch.cat([tokens[:, :num_prefix], grid.flatten(1, 2)], dim=1)  # (B, P + H' * W', C)
            # An unchanged grid keeps the table it had (timm's cached one for fixed-size models).
            if rope is not None and (merged_hw != hw or run.config.positions == "centroid"):
                rope_table = merged_rope_table(rope, run, in_hw, merged_hw)
            hw = merged_hw
            bias = run.key_bias(num_prefix, tokens.dtype)  # (B, 1, 1, P + H' * W') with prop_attn
        tokens = call_block(block, tokens, bias, rope_table)
        if i in take_indices:
            intermediates.append(_recover_prefixed(run, tokens, hw, num_prefix))
    if run.config.recover:
        tokens = _recover_prefixed(run, tokens, hw, num_prefix)
    run.finish()
    return tokens, intermediates


@contextmanager
def window_size(block: nn.Module, side: int | None) -> Iterator[None]:
    """Run a window-attention block with windows of ``side`` (Expedit-SAM: after per-window
    clustering the grid is tiled in side x side windows). The block is the stock one: its
    rel-pos tables, sized for the original window, are interpolated by its own ``get_rel_pos``.
    Global blocks (window 0) and ``side=None`` leave the block as it is."""
    original = block.window_size
    if side is None or original == 0:
        yield
        return
    block.window_size = side
    try:
        yield
    finally:
        block.window_size = original


def _call_whole(block: nn.Module, grid: Tensor) -> Tensor:
    return block(grid)


def run_grid_blocks(
    run: GridRun,
    grid: Tensor,
    blocks: Sequence[nn.Module],
    call_block: GridBlockCall = _call_whole,
    stage_ends: Collection[int] | None = None,
    on_stage_end: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Run windowed ``blocks`` (each with ``window_size`` and an ``attn``) on a prefix-free grid
    with ``run``'s schedule, then ``run.finish()``.

    Args:
        grid: (B, H, W, C).
        call_block: runs one block on the grid.
        stage_ends: the blocks whose output is recovered to the grid its stage entered with,
            where later merges start again (Hiera's stages); None: one stage, the last block.
        on_stage_end: receives (block index, recovered (B, H_s, W_s, C) output) at each stage end.

    Returns:
        The last block's output, recovered: (B, H_s, W_s, C) of the last stage.
    """
    if stage_ends is None:
        stage_ends = (len(blocks) - 1,)
    for i, block in enumerate(blocks):
        grid = run.before_block(i, grid, block)  # (B, H', W', C) until the stage ends
        # nested, so the bias is partitioned by the window side the block runs with
        with window_size(block, run.block_window), \
                key_bias(block.attn, run.window_key_bias(block.window_size, grid.dtype)):
            grid = call_block(block, grid)
        if i in stage_ends:
            grid = run.recover(grid)  # (B, H_s, W_s, C)
            run.end_region()
            if on_stage_end is not None:
                on_stage_end(i, grid)
    run.finish()
    return grid
