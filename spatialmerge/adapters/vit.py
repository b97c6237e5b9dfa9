"""timm ``VisionTransformer``: ViT, DeiT (also ``VisionTransformerDistilled``) and register models.

The sequence is ``num_prefix_tokens`` prefix tokens (CLS, distillation, registers; never merged)
followed by the H x W patch tokens in raster order. Absolute position embeddings are added before
the first block, so the stock blocks run on a shorter sequence unchanged. Only
``forward_features`` is replaced; pooling and the classifier are timm's.

Two kinds of schedule:

- grid methods (cubist, single-layer tome, expedite, oracle): before a scheduled block the patch
  tokens are viewed as a (B, H, W, C) grid, reduced by ``GridRun`` and flattened back behind the
  prefix; any block type works because blocks are only ever called whole.
- faithful per-layer ToMe (``method="tome"`` with ``r``): every block merges r_i tokens between
  its attention and its MLP, with proportional attention (log token size added to the attention
  logits through timm's own ``attn_mask``; ``prop_attn=False`` turns it off) and the keys of
  that same attention call as the metric. This composes the block's own submodules, so it needs
  timm's plain ``Block``.

With ``prop_attn`` a grid schedule passes the same log-size bias to every block after a merge,
through the block's own ``attn_mask`` argument (prefix tokens: 0).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch.utils.checkpoint
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from spatialmerge.adapters.adapter import (
    Adapter,
    OutputKind,
    keys_from_qkv,
    keys_from_qkv_output,
    unmerged_entry_point,
)
from spatialmerge.adapters.registry import STATE_ATTR, register_adapter
from spatialmerge.adapters.config import MergeConfig
from spatialmerge.adapters.loops import run_prefixed_blocks
from spatialmerge.merging.tome import bipartite_soft_matching, max_r, merge_wavg, parse_r


def _fused_qkv(block: nn.Module) -> nn.Linear:
    """The fused qkv projection of ``block``'s attention, or a clear error."""
    attn = getattr(block, "attn", None)
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear) or not hasattr(attn, "num_heads"):
        raise TypeError(
            f"metric=keys needs an attention with a fused qkv projection (attn.qkv, attn.num_heads); "
            f"{type(attn).__name__} in {type(block).__name__} has none: use metric='tokens' or 'normed'"
        )
    return qkv


def _reject_mask(attn_mask: Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError(
            "attn_mask / is_causal cannot be used on a token-merging model: merging changes the "
            "token count the mask was built for; spatialmerge.unpatch(model) first"
        )


def _embed(vit: VisionTransformer, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Images (B, 3, H_img, W_img) -> tokens (B, P + N, C) as timm's ``forward_features`` makes
    them before its blocks, and the patch grid (H, W)."""
    img_hw = (x.shape[-2], x.shape[-1])
    x = vit.patch_embed(x)
    if x.dim() == 4:  # dynamic_img_size: (B, H, W, C), the grid follows the input
        hw = (x.shape[1], x.shape[2])
    else:
        hw = tuple(vit.patch_embed.dynamic_feat_size(img_hw))
    x = vit._pos_embed(x)  # (B, P + H * W, C)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    return x, hw


def _checkpointing(vit: VisionTransformer) -> bool:
    return vit.grad_checkpointing and vit.training


def _grid_forward_features(
    self: VisionTransformer, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    _reject_mask(attn_mask, is_causal)
    state = getattr(self, STATE_ATTR)
    run = state.run(self)
    x, (h, w) = _embed(self, x)
    prefix = self.num_prefix_tokens
    if x.shape[1] != prefix + h * w:
        raise ValueError(
            f"expected {prefix} prefix + {h}x{w} patch tokens, got {x.shape[1]} tokens: patch "
            "dropout removed patches, so there is no grid to merge; grid methods need "
            "patch_drop_rate=0 (or eval mode)"
        )
    checkpointing = _checkpointing(self)

    def call_block(block: nn.Module, tokens: Tensor, bias: Tensor | None, rope_table: None) -> Tensor:
        # timm's blocks add a float attn_mask to their attention logits (fused or not); without
        # a bias the block is called as timm calls it, so blocks that take no attn_mask run too
        args = (tokens,) if bias is None else (tokens, bias)
        if checkpointing:
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    x, _ = run_prefixed_blocks(run, x, (h, w), prefix, self.blocks, call_block)
    return self.norm(x)


def _check_schedule(schedule: list[int], num_tokens: int, num_prefix_tokens: int) -> None:
    """Reject a per-layer schedule that asks some block for more merges than its tokens allow."""
    for i, r in enumerate(schedule):
        limit = max_r(num_tokens, num_prefix_tokens)
        if r > limit:
            raise ValueError(
                f"per-layer ToMe asks block {i} to merge r={r} tokens, but that block gets "
                f"{num_tokens} tokens ({num_prefix_tokens} prefix) and can merge at most {limit}; "
                "lower r, or use a decreasing schedule such as r=(r, -1) or an explicit list"
            )
        num_tokens -= r


def _tome_block(
    block: Block, x: Tensor, size: Tensor | None, r: int, num_prefix_tokens: int, prop_attn: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One timm ``Block`` with a ToMe merge between attention and MLP.

    Returns x (B, N - r, C), the token sizes (B, N - r, 1) (None while nothing was merged) and the
    output slot (B, N) of every input token (None if r == 0).
    """
    # Proportional attention: a token holding s patches counts s times in every softmax.
    mask = size.log()[:, None, None, :, 0] if size is not None and prop_attn else None  # (B, 1, 1, N)
    keys: list[Tensor] = []
    handle = None
    if r > 0:
        # The metric is the keys of this very attention call (head mean, before q/k-norm, as
        # ToMe), so qkv is not computed twice and the attention module stays timm's.
        heads = block.attn.num_heads

        def keep_keys(module: nn.Module, args: Any, out: Tensor) -> None:
            keys.append(keys_from_qkv_output(out.detach(), heads))

        handle = block.attn.qkv.register_forward_hook(keep_keys)
    try:
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=mask)))
    finally:
        if handle is not None:
            handle.remove()
    slot = None
    if r > 0:
        merge, unmerge = bipartite_soft_matching(keys[0], r, num_prefix_tokens)  # keys (B, N, C_head)
        x, size = merge_wavg(merge, x, size)  # (B, N - r, C), (B, N - r, 1)
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        slot = unmerge(positions[..., None])[..., 0]  # (B, N)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size, slot


def _tome_forward_features(
    self: VisionTransformer, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    _reject_mask(attn_mask, is_causal)
    state = getattr(self, STATE_ATTR)
    x, _ = _embed(self, x)
    prefix = self.num_prefix_tokens
    schedule = state.schedule.r_per_block  # resolved once, when patching
    _check_schedule(schedule, x.shape[1], prefix)
    checkpointing = _checkpointing(self)
    prop = state.config.prop_attn
    size = None
    # (B, N0): where each token that entered the blocks sits now; prefix tokens stay put.
    where = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    for r, block in zip(schedule, self.blocks):
        if checkpointing:
            x, size, slot = torch.utils.checkpoint.checkpoint(
                _tome_block, block, x, size, r, prefix, prop, use_reentrant=False
            )
        else:
            x, size, slot = _tome_block(block, x, size, r, prefix, prop)
        if slot is not None:
            where = slot.gather(1, where)
    if state.config.recover:
        # Composing every layer's slot map and gathering once is the chain of unmerges, reversed.
        x = x.gather(1, where[..., None].expand(-1, -1, x.shape[-1]))  # (B, N0, C)
    state.last_assignment = (where[:, prefix:] - prefix).detach()
    state.last_hw = None
    return self.norm(x)


def _vit_forward_features(
    self: VisionTransformer, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """Patched ``VisionTransformer.forward_features``: (B, 3, H_img, W_img) -> (B, N', C)."""
    if getattr(self, STATE_ATTR).config.per_layer:
        return _tome_forward_features(self, x, attn_mask, is_causal)
    return _grid_forward_features(self, x, attn_mask, is_causal)


class TimmViTAdapter(Adapter):
    """timm ``VisionTransformer`` and subclasses (``deit_*``, ``vit_*``, register variants).

    ``state.last_assignment`` after a forward: grid methods as ``GridRun.finish``; per-layer ToMe
    (B, N0 - P) with, for every patch token that entered the blocks, the index of the patch token
    (prefix excluded) holding it at the end, and ``last_hw`` None (the result is no grid).
    """

    name = "timm ViT"
    model_types = (VisionTransformer,)

    def keys(self, block: nn.Module, normed: Tensor) -> Tensor:
        return keys_from_qkv(_fused_qkv(block), normed, block.attn.num_heads)

    def check(self, target: nn.Module, config: MergeConfig) -> None:
        super().check(target, config)
        if config.per_layer:
            if config.metric == "normed":
                raise ValueError(
                    "metric='normed' is for grid schedules (loc=...); per-layer ToMe always matches "
                    "on the attention keys of each block, as ToMe does: drop the metric option"
                )
            for i, block in enumerate(target.blocks):
                if type(block) is not Block or type(block.attn) is not Attention:
                    raise TypeError(
                        f"per-layer ToMe supports timm's plain Block with its standard Attention "
                        f"only, but block {i} is {type(block).__name__} with "
                        f"{type(getattr(block, 'attn', None)).__name__}; grid methods (cubist, "
                        "expedite, oracle, single-layer tome with loc) work with any block"
                    )
            if getattr(target.patch_embed, "strict_img_size", False):
                # Only one input size is possible, so a bad schedule fails now, not at run time.
                num_tokens = target.patch_embed.num_patches + target.num_prefix_tokens
                _check_schedule(parse_r(self.depth(target), config.r), num_tokens, target.num_prefix_tokens)
        elif config.metric == "keys":
            for block in target.blocks:
                _fused_qkv(block)
        if config.prop_attn and not config.per_layer:
            for i, block in enumerate(target.blocks):
                if "attn_mask" not in inspect.signature(block.forward).parameters:
                    raise TypeError(
                        f"prop_attn=True passes log(size) to each block's attn_mask, but block {i} "
                        f"({type(block).__name__}) takes no attn_mask; use prop_attn=false"
                    )

    def overrides(self) -> dict[str, Callable[..., Any]]:
        return {
            "forward_features": _vit_forward_features,
            "forward_intermediates": unmerged_entry_point(
                "forward_intermediates", "forward_features (recover=True keeps every patch token)"
            ),
        }

    def kind(self, model: nn.Module) -> OutputKind | None:
        """A classifier where the model has a head (``num_classes > 0``), else a feature backbone."""
        return "classifier" if model.num_classes > 0 else "features"


register_adapter(TimmViTAdapter())
