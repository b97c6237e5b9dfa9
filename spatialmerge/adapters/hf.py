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
from torch import Tensor, nn

from spatialmerge.adapters.attention import key_bias
from spatialmerge.adapters.adapter import Adapter, keys_from_qkv
from spatialmerge.adapters.registry import STATE_ATTR, register_adapter
from spatialmerge.adapters.runtime import GridRun
from spatialmerge.adapters.config import MergeConfig
from spatialmerge.adapters.eva import centroid_coords
from spatialmerge.adapters.sam import SamFamily, window_size


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


def _rope_for(model: nn.Module, run: GridRun, pixel_values: Tensor, in_hw: tuple[int, int],
              hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """DINOv3's (cos, sin) for the (H', W') grid left by the merges so far: (H' * W', D) each for
    ``positions="grid"``, (B, 1, H' * W', D) for ``"centroid"``."""
    rope = model.rope_embeddings
    ph, pw = _patch_side(model)
    if run.config.positions == "grid":
        # the module reads only the spatial size of its input: an (H' * p) x (W' * p) stand-in
        stand_in = pixel_values.new_empty(1, pixel_values.shape[1], hw[0] * ph, hw[1] * pw)
        return rope(stand_in)
    from transformers.models.dinov3_vit.modeling_dinov3_vit import get_patches_center_coordinates

    device = pixel_values.device
    coords = get_patches_center_coordinates(*in_hw, dtype=torch.float32, device=device)  # (N, 2)
    fallback = get_patches_center_coordinates(*hw, dtype=torch.float32, device=device)
    centroids = centroid_coords(coords, run.assignment(), hw[0] * hw[1], fallback=fallback)  # (B, N', 2)
    # as DINOv3ViTRopePositionEmbedding.forward forms its angles from coordinates
    angles = 2 * math.pi * centroids[..., None] * rope.inv_freq  # (B, N', 2, D / 4)
    angles = angles.flatten(-2).tile(2)[:, None]  # (B, 1, N', D)
    return torch.cos(angles).to(pixel_values.dtype), torch.sin(angles).to(pixel_values.dtype)


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
    in_hw = hw = (pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw)
    prefix = _num_prefix(self, family)
    rope = self.rope_embeddings(pixel_values) if family.rope else None
    run = state.run(self)
    mask = None
    for i, layer in enumerate(_attr(self, family.layers)):
        if run.merges_at(i):
            grid = hidden[:, prefix:].unflatten(1, hw)  # (B, H, W, C)
            grid = run.before_block(i, grid, layer)  # (B, H', W', C)
            hw = (grid.shape[1], grid.shape[2])
            hidden = torch.cat([hidden[:, :prefix], grid.flatten(1, 2)], dim=1)  # (B, P + H' * W', C)
            if rope is not None:
                rope = _rope_for(self, run, pixel_values, in_hw, hw)
            # prop_attn: eager and SDPA attention add this float mask to their logits
            mask = run.key_bias(prefix, hidden.dtype)  # (B, 1, 1, P + H' * W')
        if family.rope:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, **kwargs)
        else:
            hidden = layer(hidden, mask, **kwargs)
    if state.config.recover and run.records:
        grid = run.recover(hidden[:, prefix:].unflatten(1, hw))  # (B, H, W, C)
        hidden = torch.cat([hidden[:, :prefix], grid.flatten(1, 2)], dim=1)
    run.finish()
    sequence = _attr(self, family.norm)(hidden)
    if family.pooler:
        pooled = self.pooler(sequence) if self.pooler is not None else None
    else:
        pooled = sequence[:, 0, :]
    output = BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled)
    return output.to_tuple() if return_dict is False else output


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
    run = getattr(self, STATE_ATTR).run(self)
    for i, layer in enumerate(self.layers):
        hidden = run.before_block(i, hidden, layer)  # (B, H', W', C) from the merge on
        with window_size(layer, run.block_window), \
                key_bias(layer.attn, run.window_key_bias(layer.window_size, hidden.dtype)):
            hidden = layer(hidden)
    hidden = run.recover(hidden)  # (B, H, W, C)
    run.finish()
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


register_adapter(TransformersAdapter())
register_adapter(TransformersSamAdapter())


def is_transformers_backbone(model: nn.Module) -> bool:
    """Whether ``model`` is one of the ``transformers`` classes this adapter runs."""
    return _family(model) is not None


def transformers_features(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The patch features of a ``transformers`` backbone as a grid, and its pooled output.

    images (B, 3, H_img, W_img) -> ((B, C, H, W), (B, C')): prefix tokens (CLS, distillation,
    registers) are left out of the grid; ``pooler_output`` is the CLS token after the final norm
    (ViT / DeiT: their pooler, when the model has one).
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
