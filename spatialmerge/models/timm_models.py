"""timm backbones: SAM image encoders (samvit), DeiT (VisionTransformer) and DINOv3 (Eva).

Models are created with ``pretrained=False`` and the weights file is loaded here, rather than
through timm's ``pretrained=True, pretrained_cfg_overlay=dict(file=...)``: timm's pretrained path
chooses among file / hub / URL sources, so a wrong path can turn into a download attempt or a
hub error, and its errors cannot name the official file or our config key. Our loader reads
only plain weights and then applies timm's own key converter for the family, which is what
timm's pretrained path would have done.
"""

from __future__ import annotations

from functools import partial

import timm
from timm.models import eva, vision_transformer, vision_transformer_sam
from torch import nn

from spatialmerge.models.checkpoints import FilterFn, PathLike, StateDict, load_checkpoint
from spatialmerge.models.info import model_info


def _filter_dinov3(state_dict: StateDict, model: nn.Module) -> StateDict:
    """timm's Eva converter, refusing to silently drop a non-zero DINOv3 qkv bias.

    timm's DINOv3 models default to no qkv bias because the released distilled weights carry
    all-zero biases, and timm's converter then skips the bias. That is only lossless while the
    bias really is zero, so check it; only the q and v thirds count, DINOv3 masks out the k third.

    Args:
        state_dict: the file's state dict, official DINOv3 or timm keys.
        model: the timm ``Eva`` being loaded.
    """
    has_bias = any(name.endswith("attn.q_bias") for name, _ in model.named_parameters())
    if "storage_tokens" in state_dict and not has_bias:
        state_dict = dict(state_dict)
        for key in [k for k in state_dict if k.endswith("attn.qkv.bias")]:
            q_bias, _, v_bias = state_dict.pop(key).chunk(3)
            if q_bias.any() or v_bias.any():
                raise ValueError(
                    f"{key} is not zero but the model was built without a qkv bias; "
                    "build it with qkv_bias=True"
                )
    return eva.checkpoint_filter_fn(state_dict, model)


# Key converters per family: each accepts both the official release format and timm's own keys.
_FILTERS: dict[str, FilterFn] = {
    # segment-anything files: keep ``image_encoder.*``, drop the prompt encoder / mask decoder.
    "samvit": vision_transformer_sam.checkpoint_filter_fn,
    # timm's DeiT entry points use this converter with adapt_layer_scale=True.
    "vit": partial(vision_transformer.checkpoint_filter_fn, adapt_layer_scale=True),
    "eva": _filter_dinov3,
}

# DINOv2 at another input size: resample the 37x37 position grid as Hugging Face's Dinov2Model
# does (bicubic, no antialiasing), so the weights give the features they were exported with.
_NAME_FILTERS: dict[str, FilterFn] = {
    "dinov2_s": partial(vision_transformer.checkpoint_filter_fn, antialias=False),
}

# timm's samvit blocks default to LayerNorm eps=1e-5, but segment-anything trained with 1e-6;
# matching it makes samvit give SAM's encoder output on SAM's weights.
_DEFAULTS: dict[str, dict[str, object]] = {
    "samvit": {"norm_layer": partial(nn.LayerNorm, eps=1e-6)},
}


def build_timm_model(
    name: str, checkpoint: PathLike | None = None, **overrides: object
) -> nn.Module:
    """Create the timm model registered as ``name`` and load its weights file.

    Args:
        name: registry name of a timm-built model, e.g. ``"deit_b"`` or ``"dinov3_s"``.
        checkpoint: weights file in the official release format or timm's; None keeps random
            weights.
        **overrides: keyword arguments for the timm model (``depth``, ``embed_dim``,
            ``num_heads``, ``num_classes``, ...), and ``image_size``, the input side every model
            of this package takes (timm calls it ``img_size``).
    """
    info = model_info(name)
    if info.timm_name is None:
        raise ValueError(f"model {name!r} is not built by timm (family {info.family!r})")
    if "image_size" in overrides:  # checked by build_model against the patch size
        overrides["img_size"] = overrides.pop("image_size")
    kwargs = {**_DEFAULTS.get(info.family, {}), **overrides}
    model = timm.create_model(info.timm_name, pretrained=False, **kwargs)
    if checkpoint is not None:
        filter_fn = _NAME_FILTERS.get(name, _FILTERS[info.family])
        load_checkpoint(model, checkpoint, filter_fn=filter_fn, model_name=name)
    return model.eval()
