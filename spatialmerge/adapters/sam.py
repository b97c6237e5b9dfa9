"""SAM image encoders: segment-anything's ``ImageEncoderViT`` (also inside ``Sam``) and timm's
``VisionTransformerSAM`` (``samvit_*``).

Tokens are already a (B, H, W, C) grid with no prefix tokens. Window blocks partition whatever
grid they get, padding it to a multiple of the window; global blocks interpolate their 127-entry
relative-position tables to the grid they see (``get_rel_pos``). So the stock blocks run on the
reduced grid unmodified, and the grid is recovered after the last block, before the neck, which
keeps the mask decoder, ``SamPredictor`` and ``SamAutomaticMaskGenerator`` working unchanged.
With ``prop_attn`` each block's attention runs under ``key_bias``: the size map is partitioned
into the block's windows exactly as its tokens are (global blocks: the whole grid), rel-pos
untouched.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.utils.checkpoint
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT, Sam
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import Tensor, nn

from spatialmerge.adapters.adapter import (
    Adapter,
    OutputKind,
    keys_from_qkv,
    unmerged_entry_point,
)
from spatialmerge.adapters.loops import run_grid_blocks
from spatialmerge.adapters.registry import STATE_ATTR, register_adapter


def _run_blocks(encoder: nn.Module, x: Tensor, checkpointing: bool = False) -> Tensor:
    """Run ``encoder.blocks`` on the (B, H, W, C) grid ``x`` with the patch's merge schedule and
    return the recovered (B, H, W, C) grid."""

    def call_block(block: nn.Module, grid: Tensor) -> Tensor:
        if checkpointing:
            return torch.utils.checkpoint.checkpoint(block, grid, use_reentrant=False)
        return block(grid)

    return run_grid_blocks(getattr(encoder, STATE_ATTR).run(encoder), x, encoder.blocks, call_block)


def _sam_encoder_forward(self: ImageEncoderViT, x: Tensor) -> Tensor:
    x = self.patch_embed(x)  # (B, H, W, C)
    if self.pos_embed is not None:
        x = x + self.pos_embed
    x = _run_blocks(self, x)
    return self.neck(x.permute(0, 3, 1, 2))  # (B, out_chans, H, W)


def _timm_samvit_forward_features(self: VisionTransformerSAM, x: Tensor) -> Tensor:
    x = self.patch_embed(x)  # (B, H, W, C)
    if self.pos_embed is not None:
        x = x + resample_abs_pos_embed_nhwc(self.pos_embed, x.shape[1:3])
    x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
    x = _run_blocks(self, x, checkpointing=self.grad_checkpointing and self.training)
    return self.neck(x.permute(0, 3, 1, 2))


class SamFamily(Adapter):
    """What every SAM image encoder shares: a prefix-free grid, window and global blocks,
    Expedit-SAM's defaults; subclasses say where the blocks are."""

    def per_layer_refusal(self, target: nn.Module) -> str | None:
        return (
            "is not supported on SAM encoders: it leaves an unordered token set that window "
            "attention and relative positions cannot run on"
        )

    per_layer_alternative = ", the paper's baseline for SAM"

    # Expedit-SAM's encoder defaults: each 14x14 window clustered on its own.
    expedite_defaults: dict[str, Any] = {
        "n_iters": 3, "temperature": 0.1, "window_size": 5, "k": 36, "reconstruct": "l2",
        "windowed": True,
    }

    def grid_size(self, target: nn.Module) -> tuple[int, int]:
        if isinstance(target, ImageEncoderViT):  # segment-anything: a square img_size input
            side = target.img_size // target.patch_embed.proj.kernel_size[0]
            return side, side
        return super().grid_size(target)

    def window(self, target: nn.Module) -> int | None:
        sizes = [block.window_size for block in target.blocks if block.window_size > 0]
        return max(sizes) if sizes else None

    def keys(self, block: nn.Module, normed: Tensor) -> Tensor:
        return keys_from_qkv(block.attn.qkv, normed, block.attn.num_heads)


class SegmentAnythingAdapter(SamFamily):
    """segment-anything ``Sam`` (patches its image encoder) or a bare ``ImageEncoderViT``."""

    name = "segment-anything SAM"
    model_types = (Sam, ImageEncoderViT)

    def target(self, model: nn.Module) -> nn.Module:
        return model.image_encoder if isinstance(model, Sam) else model

    def overrides(self) -> dict[str, Callable[..., Any]]:
        return {"forward": _sam_encoder_forward}

    whole_model_hint = "pass the whole Sam (its prompts and masks are what fidelity compares)"

    def kind(self, model: nn.Module) -> OutputKind | None:
        return "sam" if isinstance(model, Sam) else None

    def dense_features(self, model: nn.Module, images: Tensor) -> tuple[Tensor, None]:
        """The image embedding, (B, 3, S, S) -> ((B, C, S / 16, S / 16), None)."""
        return self.target(model)(images), None

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        side = self.target(model).img_size  # a square input
        return 3, side, side

    def timed_module(self, model: nn.Module) -> nn.Module:
        return self.target(model)

    def normalize_pixels(self, model: nn.Module, pixels: Tensor) -> Tensor:
        if isinstance(model, Sam):  # as Sam.preprocess
            return (pixels - model.pixel_mean.cpu()) / model.pixel_std.cpu()
        return super().normalize_pixels(model, pixels)

    def prompt_predictor(self, model: nn.Module) -> Any:
        if isinstance(model, Sam):
            return SamPredictor(model)
        return super().prompt_predictor(model)


class TimmSamAdapter(SamFamily):
    """timm ``VisionTransformerSAM`` (``samvit_base/large/huge_patch16``)."""

    name = "timm samvit"
    model_types = (VisionTransformerSAM,)

    def overrides(self) -> dict[str, Callable[..., Any]]:
        return {
            "forward_features": _timm_samvit_forward_features,
            "forward_intermediates": unmerged_entry_point(
                "forward_intermediates", "forward_features (the neck output on the full grid)"
            ),
        }

    def dense_features(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """The neck output, already a grid: (B, 3, H_img, W_img) -> ((B, C, H, W), (B, C') or
        None)."""
        grid = model.forward_features(images)  # (B, C, H, W)
        pooled = model.forward_head(grid, pre_logits=True)
        return grid, pooled if pooled.dim() == 2 else None


register_adapter(SegmentAnythingAdapter())
register_adapter(TimmSamAdapter())
