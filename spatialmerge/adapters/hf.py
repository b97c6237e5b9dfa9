"""Hugging Face ``transformers`` vision backbones: ``ViTModel``, ``DeiTModel``, ``Dinov2Model``,
``Dinov2WithRegistersModel`` and ``DINOv3ViTModel``; and SAM's ``SamVisionEncoder`` (inside
``SamModel`` and ``SamVisionModel``).

Each of these models' ``forward`` embeds the image (prefix tokens first: CLS, DeiT's distillation
token, registers; then the H x W patch tokens in raster order), runs its layer list and applies
its final norm (and ViT / DeiT's pooler). The patch swaps that ``forward`` only: the layers are
``transformers``' own, called as the model calls them, with whichever attention implementation
(eager / SDPA / flash) it was loaded with. Before a scheduled layer the patch tokens are viewed
as a (B, H, W, C) grid, reduced by ``GridRun`` and put back behind the prefix. With
``prop_attn`` the layers after a merge get the log-size bias as their additive
``attention_mask`` (eager and SDPA attention add it to the logits; flash attention takes none
and is refused).

DINOv3's rotary embedding covers the patch tokens only (its ``apply_rotary_pos_emb`` splits the
prefix off by the table's length), so after a merge the table is rebuilt for the H' x W' tokens
left: ``positions="grid"`` asks the model's own ``rope_embeddings`` for an H' x W' grid over the
same normalised extent; ``positions="centroid"`` places each merged token at the mean normalised
coordinate of the patches it holds (the module's own coordinate function, angles as it forms
them), one table per image.

SAM's vision encoder keeps a (B, H, W, C) grid with no prefix tokens, its window layers pad
whatever grid they get and its attention interpolates its rel-pos tables to the grid it sees
(``get_rel_pos``), as in segment-anything: the stock layers run on the reduced grid, which is
recovered before the neck, so ``SamModel`` (and ``SamProcessor``'s post-processing) produce
masks at the image's size unchanged. Expedite defaults to Expedit-SAM's per-window form there.

What ``transformers`` would record on the way (``output_hidden_states``, ``output_attentions``)
is per layer and unmerged-length by contract, so asking for it on a patched model raises instead
of returning shapes that silently change mid-stack. ``transformers`` is optional: the classes are
only looked up once the package is imported.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from timm.data import create_transform, resolve_data_config
from torch import Tensor, nn

from spatialmerge.adapters.adapter import Adapter, OutputKind, keys_from_qkv
from spatialmerge.adapters.registry import STATE_ATTR, register_adapter
from spatialmerge.adapters.config import MergeConfig
from spatialmerge.adapters.loops import run_grid_blocks, run_prefixed_blocks
from spatialmerge.adapters.sam import SamFamily


@dataclass(frozen=True)
class _Family:
    """Where one ``transformers`` class keeps what its forward uses."""

    class_path: str  # module.Class
    layers: str  # attribute path of the layer ModuleList
    norm: str  # final norm
    pre_norm: str  # the layer's norm before attention (the "normed" metric)
    pooler: bool  # ViT / DeiT: an optional pooler module (and interpolate_pos_encoding); else
    # the CLS token is the pooled output and positions are always interpolated
    distilled: bool = False  # DeiT: CLS and distillation token in front
    rope: bool = False  # DINOv3: rotary embedding of the patch tokens


_FAMILIES: tuple[_Family, ...] = (
    _Family("transformers.models.vit.modeling_vit.ViTModel", "layers", "layernorm", "layernorm_before", True),
    _Family("transformers.models.deit.modeling_deit.DeiTModel", "layers", "layernorm", "layernorm_before", True,
            distilled=True),
    _Family("transformers.models.dinov2.modeling_dinov2.Dinov2Model", "encoder.layer", "layernorm", "norm1", False),
    _Family("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersModel",
            "encoder.layer", "layernorm", "norm1", False),
    _Family("transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTModel", "model.layer", "norm", "norm1",
            False, rope=True),
)


def _loaded_class(path: str) -> type | None:
    """The class at ``path`` if its module is already imported, else None (never imports
    transformers: a model of that class can only exist once it was)."""
    module, _, name = path.rpartition(".")
    return getattr(sys.modules.get(module), name, None)


def _family(model: nn.Module) -> _Family | None:
    for family in _FAMILIES:
        cls = _loaded_class(family.class_path)
        if cls is not None and isinstance(model, cls):
            return family
    return None


def _attr(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _num_prefix(model: nn.Module, family: _Family) -> int:
    return 1 + int(family.distilled) + int(getattr(model.config, "num_register_tokens", 0) or 0)


def _patch_side(model: nn.Module) -> tuple[int, int]:
    patch = model.config.patch_size
    return (patch, patch) if isinstance(patch, int) else tuple(patch)  # type: ignore[return-value]


def _refuse_unmerged_extras(model: nn.Module, attention_mask: Tensor | None, kwargs: dict[str, Any]) -> None:
    """Per-layer outputs and masks are defined on the unmerged sequence: refuse them."""
    name = getattr(model, STATE_ATTR).original_class.__name__
    for key in ("output_hidden_states", "output_attentions"):
        if kwargs.get(key) or (kwargs.get(key) is None and getattr(model.config, key, False)):
            raise ValueError(
                f"{key}=True on a token-merging {name}: the per-layer outputs would "
                "change length where the merge runs, so they are not returned; call "
                "spatialmerge.unpatch(model) to get them, or pass "
                f"{key}=False (and set model.config.{key}=False)"
            )
    if attention_mask is not None:
        raise ValueError(
            "attention_mask cannot be used on a token-merging model: merging changes the token "
            "count the mask was built for; spatialmerge.unpatch(model) first"
        )


@dataclass(frozen=True)
class _DINOv3GridRope:
    """DINOv3's ``rope_embeddings`` as ``merged_rope_table`` rebuilds it: (cos, sin) of
    (H' * W', D) each for a uniform grid, (B, 1, H' * W', D) per image."""

    model: nn.Module
    pixel_values: Tensor  # (B, 3, H_img, W_img): the device and dtype of the tables

    def grid_table(self, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        # the module reads only the spatial size of its input: an (H' * p) x (W' * p) stand-in
        ph, pw = _patch_side(self.model)
        pixels = self.pixel_values
        return self.model.rope_embeddings(pixels.new_empty(1, pixels.shape[1], hw[0] * ph, hw[1] * pw))

    def cell_coords(self, hw: tuple[int, int]) -> Tensor:
        from transformers.models.dinov3_vit.modeling_dinov3_vit import get_patches_center_coordinates

        return get_patches_center_coordinates(*hw, dtype=torch.float32, device=self.pixel_values.device)

    def coords_table(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        # as DINOv3ViTRopePositionEmbedding.forward forms its angles from coordinates
        angles = 2 * math.pi * coords[..., None] * self.model.rope_embeddings.inv_freq  # (B, N, 2, D / 4)
        angles = angles.flatten(-2).tile(2)[:, None]  # (B, 1, N, D)
        dtype = self.pixel_values.dtype
        return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def _hf_forward(
    self: nn.Module,
    pixel_values: Tensor | None = None,
    bool_masked_pos: Tensor | None = None,
    interpolate_pos_encoding: bool | None = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """The model's own forward with the merge schedule: (B, 3, H_img, W_img) ->
    ``BaseModelOutputWithPooling`` whose ``last_hidden_state`` is (B, P + H' * W', C), or
    (B, P + H * W, C) with ``recover=True``."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    state = getattr(self, STATE_ATTR)
    family = _family(self)
    return_dict = kwargs.pop("return_dict", None)
    _refuse_unmerged_extras(self, attention_mask, kwargs)
    for key in ("output_hidden_states", "output_attentions"):
        kwargs.pop(key, None)
    if family.rope and self.rope_embeddings.training and any(
        getattr(self.config, key, None) for key in ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")
    ):
        raise ValueError(
            "DINOv3's RoPE coordinate augmentation is active in training mode, and merged tokens "
            "cannot share the full grid's random draw; call model.rope_embeddings.eval() to train "
            "without it"
        )
    patch_embed = self.embeddings.patch_embeddings
    pixel_values = pixel_values.to(getattr(patch_embed, "projection", patch_embed).weight.dtype)
    if family.pooler:
        hidden = self.embeddings(
            pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding
        )  # (B, P + H * W, C)
    else:
        if interpolate_pos_encoding is not None:
            raise ValueError(
                f"interpolate_pos_encoding is not an argument of {type(self).__name__}.forward "
                "(it always interpolates); drop it"
            )
        hidden = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)  # (B, P + H * W, C)
    ph, pw = _patch_side(self)
    hw = (pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw)

    def call_layer(layer: nn.Module, tokens: Tensor, bias: Tensor | None,
                   rope_table: tuple[Tensor, Tensor] | None) -> Tensor:
        # prop_attn: eager and SDPA attention add this float mask to their logits
        if family.rope:
            return layer(tokens, attention_mask=bias, position_embeddings=rope_table, **kwargs)
        return layer(tokens, bias, **kwargs)

    hidden, _ = run_prefixed_blocks(
        state.run(self), hidden, hw, _num_prefix(self, family), _attr(self, family.layers), call_layer,
        rope_table=self.rope_embeddings(pixel_values) if family.rope else None,
        rope=_DINOv3GridRope(self, pixel_values) if family.rope else None,
    )
    sequence = _attr(self, family.norm)(hidden)
    if family.pooler:
        pooled = self.pooler(sequence) if self.pooler is not None else None
    else:
        pooled = sequence[:, 0, :]
    output = BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled)
    return output.to_tuple() if return_dict is False else output


def _eval_transform_at_config_size(model: nn.Module) -> Callable[[Any], Tensor]:
    """timm's default evaluation transform (a transformers model has no pretrained config:
    ImageNet mean / std, bicubic, crop 0.875) at the model's ``config.image_size`` where its
    config has one (a ``SamModel``'s does not): a PIL image -> a (3, H, W) float tensor."""
    config = resolve_data_config({}, model=model)
    size = getattr(model.config, "image_size", None)
    if isinstance(size, int):
        config["input_size"] = (3, size, size)
    return create_transform(**config)


class TransformersAdapter(Adapter):
    """``transformers`` ViT / DeiT / DINOv2 (with registers) / DINOv3 base models."""

    name = "transformers"
    type_names = tuple(family.class_path for family in _FAMILIES)
    methods = ("cubist", "tome", "expedite", "oracle", "pool")

    def matches(self, model: nn.Module) -> bool:
        return _family(model) is not None

    def depth(self, target: nn.Module) -> int:
        return len(_attr(target, _family(target).layers))

    def grid_size(self, target: nn.Module) -> tuple[int, int]:
        size = target.config.image_size
        h, w = (size, size) if isinstance(size, int) else size
        ph, pw = _patch_side(target)
        return h // ph, w // pw

    def has_rope(self, target: nn.Module) -> bool:
        return _family(target).rope

    def pre_norm(self, block: nn.Module) -> nn.Module:
        return getattr(block, "norm1", None) or block.layernorm_before

    def keys(self, block: nn.Module, normed: Tensor) -> Tensor:
        attention = block.attention
        heads = attention.config.num_attention_heads
        keys = attention.k_proj(normed)  # (..., heads * head_dim)
        return keys.unflatten(-1, (heads, keys.shape[-1] // heads)).mean(-2)  # (..., head_dim)

    def per_layer_refusal(self, target: nn.Module) -> str | None:
        return f"is not available on transformers' {type(target).__name__}: its attention takes no proportional-attention bias"

    per_layer_alternative = ", or the timm model (model=deit_b ...) for faithful ToMe"

    def check(self, target: nn.Module, config: MergeConfig) -> None:
        super().check(target, config)
        implementation = getattr(target.config, "_attn_implementation", None) or "eager"
        if config.prop_attn and implementation not in ("eager", "sdpa"):
            raise ValueError(
                f"prop_attn=True adds log(size) to the attention logits through the additive "
                f"attention mask, which {implementation!r} attention does not take; load the model "
                "with attn_implementation='sdpa' (or 'eager'), or use prop_attn=false"
            )

    def overrides(self) -> dict[str, Callable[..., Any]]:
        return {"forward": _hf_forward}

    def dense_features(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        """The patch features as a grid, and the pooled output.

        images (B, 3, H_img, W_img) -> ((B, C, H, W), (B, C')): prefix tokens (CLS, distillation,
        registers) are left out of the grid; ``pooler_output`` is the CLS token after the final
        norm (ViT / DeiT: their pooler, when the model has one).
        """
        output = model(pixel_values=images)
        ph, pw = _patch_side(model)
        h, w = images.shape[-2] // ph, images.shape[-1] // pw
        patches = output.last_hidden_state[:, _num_prefix(model, _family(model)):]
        if patches.shape[1] != h * w:
            raise RuntimeError(
                f"{type(model).__name__} returned {patches.shape[1]} patch tokens for a {h}x{w} grid: "
                "the merge was not recovered (recover=True), so merged and unmerged tokens do not line up"
            )
        pooled = output.pooler_output if output.pooler_output is not None else output.last_hidden_state[:, 0]
        return patches.unflatten(1, (h, w)).permute(0, 3, 1, 2), pooled

    def pools_cls_token(self, model: nn.Module) -> bool:
        # DINOv2 / DINOv3 (no pooler) and ViT / DeiT without theirs pool their CLS token
        return getattr(model, "pooler", None) is None

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        size = model.config.image_size
        if isinstance(size, int):
            return 3, size, size
        return super().input_size(model)

    def eval_transform(self, model: nn.Module) -> Callable[[Any], Tensor]:
        return _eval_transform_at_config_size(model)



_SAM_MODULE = "transformers.models.sam.modeling_sam"


def _sam_classes() -> tuple[type, ...]:
    """(SamModel, SamVisionModel, SamVisionEncoder), or () while transformers is not imported."""
    module = sys.modules.get(_SAM_MODULE)
    if module is None:
        return ()
    return module.SamModel, module.SamVisionModel, module.SamVisionEncoder


def _hf_sam_encoder_forward(self: nn.Module, pixel_values: Tensor | None = None, **kwargs: Any) -> Any:
    """``SamVisionEncoder.forward`` with the merge schedule: (B, 3, S, S) ->
    ``SamVisionEncoderOutput`` with the neck's (B, C_out, H, W) on the full grid."""
    module = sys.modules[_SAM_MODULE]
    if pixel_values is None:
        raise ValueError("You have to specify pixel_values")
    return_dict = kwargs.pop("return_dict", None)
    _refuse_unmerged_extras(self, None, kwargs)
    hidden = self.patch_embed(pixel_values)  # (B, H, W, C)
    if self.pos_embed is not None:
        hidden = hidden + self.pos_embed
    hidden = run_grid_blocks(getattr(self, STATE_ATTR).run(self), hidden, self.layers)  # (B, H, W, C)
    output = module.SamVisionEncoderOutput(last_hidden_state=self.neck(hidden))
    return output.to_tuple() if return_dict is False else output


class TransformersSamAdapter(SamFamily):
    """transformers ``SamModel`` / ``SamVisionModel`` (patches their vision encoder) or a bare
    ``SamVisionEncoder``."""

    name = "transformers SAM"
    type_names = tuple(f"{_SAM_MODULE}.{name}" for name in ("SamModel", "SamVisionModel", "SamVisionEncoder"))

    def matches(self, model: nn.Module) -> bool:
        classes = _sam_classes()
        return bool(classes) and isinstance(model, classes)

    def target(self, model: nn.Module) -> nn.Module:
        classes = _sam_classes()
        return model if isinstance(model, classes[2]) else model.vision_encoder

    def depth(self, target: nn.Module) -> int:
        return len(target.layers)

    def grid_size(self, target: nn.Module) -> tuple[int, int]:
        side = target.config.image_size // target.config.patch_size
        return side, side

    def window(self, target: nn.Module) -> int | None:
        sizes = [layer.window_size for layer in target.layers if layer.window_size > 0]
        return max(sizes) if sizes else None

    def pre_norm(self, block: nn.Module) -> nn.Module:
        return block.layer_norm1

    def keys(self, block: nn.Module, normed: Tensor) -> Tensor:
        return keys_from_qkv(block.attn.qkv, normed, block.attn.num_attention_heads)

    def overrides(self) -> dict[str, Callable[..., Any]]:
        return {"forward": _hf_sam_encoder_forward}

    def kind(self, model: nn.Module) -> OutputKind | None:
        return None  # the mask protocols run segment-anything's and sam2's SAM, not this one

    def eval_transform(self, model: nn.Module) -> Callable[[Any], Tensor]:
        return _eval_transform_at_config_size(model)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        size = self.target(model).config.image_size
        if isinstance(size, int):
            return 3, size, size
        return super().input_size(model)

    def timed_module(self, model: nn.Module) -> nn.Module:
        return self.target(model)


register_adapter(TransformersAdapter())
register_adapter(TransformersSamAdapter())
