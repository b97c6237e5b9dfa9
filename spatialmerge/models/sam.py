"""Segment-anything ``Sam`` models (ViT-B / L / H image encoders), built as segment-anything does.

segment-anything's own ``build_sam_vit_*`` read checkpoints with a bare ``torch.load`` (which may
run code from the file) and take no size overrides, so the same configuration is assembled here
from ``segment_anything.modeling`` and the weights go through the safe loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn

from spatialmerge.models.checkpoints import PathLike, load_checkpoint


def _build_sam(
    name: str,
    checkpoint: PathLike | None,
    *,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: Sequence[int],
    image_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
) -> Sam:
    """Assemble a ``Sam`` with segment-anything's fixed parts and the given encoder size.

    Args:
        name: registry name, used in checkpoint error messages.
        checkpoint: official segment-anything ``.pth`` (or a ``.safetensors`` of the same keys).
        embed_dim: image encoder width.
        depth: image encoder blocks.
        num_heads: attention heads per encoder block.
        global_attn_indexes: blocks with global attention; all others use windows.
        image_size: input side in pixels (the prompt encoder's coordinate frame too).
        patch_size: patch side in pixels.
        window_size: window side in tokens for windowed blocks.
        prompt_embed_dim: width of the neck output, prompt embeddings and mask decoder.
    """
    embedding_size = image_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth,
            embed_dim=embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=num_heads,
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(global_attn_indexes),
            window_size=window_size,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    if checkpoint is not None:
        load_checkpoint(sam, checkpoint, model_name=name)
    return sam.eval()


def build_sam_b(checkpoint: PathLike | None = None, **overrides: object) -> Sam:
    """SAM with a ViT-B image encoder, as segment-anything's ``build_sam_vit_b``.

    Args:
        checkpoint: weights file, e.g. ``sam_vit_b_01ec64.pth``; None keeps random weights.
        **overrides: any keyword of ``_build_sam`` (``image_size``, ``depth``, ``embed_dim``,
            ``num_heads``, ``global_attn_indexes``, ``window_size``, ``prompt_embed_dim``).
    """
    config = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))
    return _build_sam("sam_b", checkpoint, **{**config, **overrides})


def build_sam_l(checkpoint: PathLike | None = None, **overrides: object) -> Sam:
    """SAM with a ViT-L image encoder, as segment-anything's ``build_sam_vit_l``.

    Args:
        checkpoint: weights file, e.g. ``sam_vit_l_0b3195.pth``; None keeps random weights.
        **overrides: any keyword of ``_build_sam``; see :func:`build_sam_b`.
    """
    config = dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23))
    return _build_sam("sam_l", checkpoint, **{**config, **overrides})


def build_sam_h(checkpoint: PathLike | None = None, **overrides: object) -> Sam:
    """SAM with a ViT-H image encoder, as segment-anything's ``build_sam_vit_h``.

    Args:
        checkpoint: weights file, e.g. ``sam_vit_h_4b8939.pth``; None keeps random weights.
        **overrides: any keyword of ``_build_sam``; see :func:`build_sam_b`.
    """
    config = dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31))
    return _build_sam("sam_h", checkpoint, **{**config, **overrides})
