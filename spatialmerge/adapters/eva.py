"""timm ``Eva`` as DINOv3 uses it (``vit_*_patch16_dinov3``): prefix tokens + RoPE over the patch grid.

The sequence is ``[CLS, 4 registers, H * W patch tokens]``. timm's attention rotates only the
tokens after ``num_prefix_tokens`` (``apply_rot_embed_cat(q[:, :, npt:])``), so after a merge the
prefix is split off, the patch grid is reduced, the prefix goes back in front, and the RoPE table
is rebuilt for the H' x W' tokens that remain. The blocks are timm's own, called exactly as
``Eva.forward_features`` calls them (``blk(x, rope=rope)``).

Where merged tokens sit (``positions``):

- ``"grid"`` (paper): a uniform H' x W' grid over the same normalised extent. DINOv3 coordinates
  are 0.5-centred and normalised by the grid size to [-1, 1], so ``rope.get_embed(shape=(H', W'))``
  is exactly that grid: its outermost tokens sit at +-(1 - 1/H') and +-(1 - 1/W').
- ``"centroid"`` (ours): each merged token at the mean normalised coordinate of the original cells
  it holds, giving a per-image table (B, 1, H' * W', 2 * head_dim). timm already builds tables of
  that layout for patch dropout, and the attention's broadcasting accepts it over the heads.

With ``prop_attn`` every block after a merge gets the log-size bias through its own
``attn_mask`` argument (prefix tokens: 0); RoPE is rebuilt as above either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3, _build_grid
from timm.models._features import feature_take_indices
from timm.models.eva import Eva, EvaBlockPostNorm
from torch import Tensor, nn

from spatialmerge.adapters.adapter import Adapter, keys_from_qkv
from spatialmerge.adapters.registry import STATE_ATTR, register_adapter
from spatialmerge.adapters.config import MergeConfig
from spatialmerge.adapters.loops import run_prefixed_blocks


def grid_coords(rope: RotaryEmbeddingDinoV3, hw: tuple[int, int]) -> Tensor:
    """Normalised coordinates of every cell of an (H, W) grid, built by the rope's own grid
    function (centring, offset, indexing, normalisation): (H * W, 2), float32, on CPU."""
    coords = _build_grid(
        list(hw),
        grid_type="centered",
        grid_offset=rope.grid_offset,
        grid_indexing=rope.grid_indexing,
        normalize_coords=rope.normalize_coords,
        ndim=2,
    )  # (H, W, 2)
    return coords.flatten(0, 1)


def rope_from_coords(rope: RotaryEmbeddingDinoV3, coords: Tensor) -> Tensor:
    """Per-image RoPE table for arbitrary coordinates, in ``get_embed``'s [sin, cos] layout.

    (B, N, 2) -> (B, 1, N, 2 * dim); the singleton broadcasts over attention heads.
    """
    b, n, _ = coords.shape
    sin, cos = rope._get_pos_embed_from_coords(coords.reshape(b * n, 2))  # 2 x (B * N, dim)
    return torch.cat([sin, cos], dim=-1).view(b, 1, n, -1)


@dataclass(frozen=True)
class _TimmGridRope:
    """timm's DINOv3 RoPE as ``merged_rope_table`` rebuilds it: tables (H' * W', 2 * dim) for a
    uniform grid, (B, 1, H' * W', 2 * dim) per image."""

    rope: RotaryEmbeddingDinoV3

    def grid_table(self, hw: tuple[int, int]) -> Tensor:
        return self.rope.get_embed(shape=list(hw))

    def cell_coords(self, hw: tuple[int, int]) -> Tensor:
        return grid_coords(self.rope, hw)

    def coords_table(self, coords: Tensor) -> Tensor:
        return rope_from_coords(self.rope, coords)


def _check_runtime(model: Eva, attn_mask: Tensor | None) -> None:
    """Reject what only shows up at call time: masks, patch dropout, RoPE coordinate augmentation."""
    if attn_mask is not None:
        raise NotImplementedError(
            "attn_mask is not supported on a merging Eva: the mask is over the unmerged sequence, "
            "which the merge shortens; unpatch the model to use attn_mask"
        )
    if model.patch_drop is not None and model.training:
        raise NotImplementedError(
            "patch dropout (patch_drop_rate > 0) leaves an irregular set of patches that cannot be "
            "merged as a grid; create the model with patch_drop_rate=0 or train unpatched"
        )
    rope = model.rope
    if rope is not None and rope.training and rope.aug_active:
        raise NotImplementedError(
            "RoPE coordinate augmentation (rope_shift/jitter/rescale_coords) is active in training "
            "mode, and merged tokens cannot share the full grid's random draw; call "
            "model.rope.eval() to train without it, or create the model without those options"
        )


def _embed(model: Eva, images: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
    """Eva's own embedding: patches, prefix tokens, positions. Returns (B, P + H * W, C), the
    RoPE table of the full grid (or None) and the grid size (H, W)."""
    x = model.patch_embed(images)  # (B, H, W, C) with dynamic_img_size, else (B, H * W, C)
    hw = tuple(x.shape[1:3]) if x.dim() == 4 else model.patch_embed.dynamic_feat_size(images.shape[-2:])
    x, rope = model._pos_embed(x)  # (B, P + H * W, C)
    return model.norm_pre(x), rope, (int(hw[0]), int(hw[1]))


def _run_blocks(
    model: Eva,
    x: Tensor,
    rope: Tensor | None,
    hw: tuple[int, int],
    blocks: nn.ModuleList,
    is_causal: bool,
    take_indices: frozenset[int] = frozenset(),
) -> tuple[Tensor, list[Tensor]]:
    """Run ``blocks`` with the patch's merge schedule.

    Returns the final tokens (recovered to the full grid if ``config.recover``) and, for each
    block in ``take_indices``, its output with the patch tokens recovered to the full grid.
    """
    run = getattr(model, STATE_ATTR).run(model)
    checkpointing = model.grad_checkpointing and model.training

    def call_block(block: nn.Module, tokens: Tensor, bias: Tensor | None, rope_table: Tensor | None) -> Tensor:
        # prop_attn: log(size) per key through the block's own attn_mask
        if checkpointing:
            return torch.utils.checkpoint.checkpoint(
                block, tokens, rope=rope_table, attn_mask=bias, is_causal=is_causal, use_reentrant=False
            )
        return block(tokens, rope=rope_table, attn_mask=bias, is_causal=is_causal)

    grid_rope = None if model.rope is None else _TimmGridRope(model.rope)
    return run_prefixed_blocks(
        run, x, hw, model.num_prefix_tokens, blocks, call_block,
        rope_table=rope, rope=grid_rope, take_indices=take_indices,
    )


def _eva_forward_features(
    self: Eva, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    _check_runtime(self, attn_mask)
    x, rope, hw = _embed(self, x)
    x, _ = _run_blocks(self, x, rope, hw, self.blocks, is_causal)
    return self.norm(x)  # (B, P + H' * W', C), or (B, P + H * W, C) with recover=True


def _eva_forward_intermediates(
    self: Eva,
    x: Tensor,
    indices: int | list[int] | None = None,
    return_prefix_tokens: bool = False,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> list[Any] | tuple[Tensor, list[Any]]:
    """timm's ``forward_intermediates`` with merging: every intermediate has its patch tokens
    recovered to the full grid, so dense users get the same (B, C, H, W) maps as unpatched."""
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt={output_fmt!r} is not supported; choose NCHW or NLC")
    _check_runtime(self, attn_mask)
    take_indices, max_index = feature_take_indices(len(self.blocks), indices)
    blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
    x, rope, hw = _embed(self, x)
    x, intermediates = _run_blocks(self, x, rope, hw, blocks, is_causal, frozenset(take_indices))
    intermediates = [self.norm(y) if norm else y for y in intermediates]  # (B, P + H * W, C)
    prefix = self.num_prefix_tokens
    prefix_tokens = [y[:, :prefix] for y in intermediates]
    intermediates = [y[:, prefix:] for y in intermediates]
    if output_fmt == "NCHW":
        intermediates = [y.unflatten(1, hw).permute(0, 3, 1, 2).contiguous() for y in intermediates]
    if return_prefix_tokens:
        intermediates = list(zip(intermediates, prefix_tokens))
    if intermediates_only:
        return intermediates
    return self.norm(x), intermediates


class TimmEvaAdapter(Adapter):
    """timm ``Eva`` with DINOv3 RoPE (``vit_*_patch16_dinov3``) or with absolute positions only.

    Grid methods only: per-layer ToMe produces an unordered token set that has no grid for RoPE.
    """

    name = "timm Eva (DINOv3)"
    model_types = (Eva,)

    def keys(self, block: nn.Module, normed: Tensor) -> Tensor:
        attn = block.attn
        if attn.qkv is not None:
            # Eva's fused projection has no bias on the key part (k_bias is a zero buffer).
            return keys_from_qkv(attn.qkv, normed, attn.num_heads)
        heads = getattr(attn, "num_kv_heads", attn.num_heads)  # grouped-query attention has fewer
        return attn.k_proj(normed).unflatten(-1, (heads, -1)).mean(-2)

    def overrides(self) -> dict[str, Callable[..., Any]]:
        return {
            "forward_features": _eva_forward_features,
            "forward_intermediates": _eva_forward_intermediates,
        }

    def has_rope(self, target: nn.Module) -> bool:
        return target.rope is not None

    def per_layer_refusal(self, target: nn.Module) -> str | None:
        return "is not supported on timm Eva / DINOv3: it leaves an unordered token set that RoPE cannot place"

    per_layer_alternative = ", or a timm VisionTransformer (e.g. DeiT) for per-layer ToMe"

    def check(self, target: nn.Module, config: MergeConfig) -> None:
        super().check(target, config)
        rope = target.rope
        supported = rope is None or isinstance(rope, RotaryEmbeddingDinoV3)
        if getattr(target, "rope_mixed", False) or not supported:
            raise ValueError(
                f"this Eva uses {type(rope).__name__} position embeddings; merging supports "
                "RotaryEmbeddingDinoV3 (rope_type='dinov3', the vit_*_patch16_dinov3 models) or no "
                "RoPE, because only those define positions for a reduced grid over the same extent"
            )
        post_norm = any(isinstance(block, EvaBlockPostNorm) for block in target.blocks)
        if post_norm and config.metric != "tokens":
            raise ValueError(
                f"metric={config.metric!r} needs the attention input as norm1(x), but this Eva uses "
                "post-norm blocks (norm1 follows attention); use metric=tokens"
            )


register_adapter(TimmEvaAdapter())
