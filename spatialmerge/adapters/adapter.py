"""What a backbone family knows: how its blocks, grid, windows and attention keys look, and
what the evaluators and pictures need of a whole model (what it outputs, its dense features,
input size and transform, the module to time, its prompt predictor).

Each family (``vit``, ``eva``, ``sam``, ``hiera``, ``hf``) subclasses ``Adapter`` and registers
an instance with :func:`spatialmerge.adapters.registry.register_adapter`.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from timm.data import create_transform, resolve_data_config
from torch import Tensor, nn

from spatialmerge.adapters.config import MergeConfig
from spatialmerge.merging.grid import GRID_METHODS


# What a model outputs, which decides what label-free fidelity compares: masks for prompts,
# logits or dense patch features.
OutputKind = Literal["sam", "classifier", "features"]

# timm's defaults, which models without a pretrained config (SAM 2, transformers) also use
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Adapter:
    """How one backbone family runs its blocks. Subclasses fill in the class attributes and
    ``overrides``; everything else has a sensible default.

    Attributes:
        name: short family name used in messages.
        model_types: classes this adapter patches (the user may pass a wrapper, see ``target``).
        methods: merge methods this family supports.
        expedite_defaults: the Expedite settings a reference implementation uses on this
            family; options the user leaves unset take these.
    """

    name: str = ""
    model_types: tuple[type, ...] = ()
    # for messages, where the classes are not imported until a model of them exists (SAM 2)
    type_names: tuple[str, ...] = ()
    methods: tuple[str, ...] = GRID_METHODS
    # The CubistMerge authors' DINOv3 port: the whole grid clustered at once.
    expedite_defaults: dict[str, Any] = {
        "n_iters": 5, "temperature": 0.01, "window_size": 5, "k": 20, "reconstruct": "l2",
        "windowed": False,
    }

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_types)

    def target(self, model: nn.Module) -> nn.Module:
        """The module whose forward runs the blocks (e.g. ``Sam.image_encoder``)."""
        return model

    def depth(self, target: nn.Module) -> int:
        return len(target.blocks)

    def grid_size(self, target: nn.Module) -> tuple[int, int]:
        """(H, W) patch grid at the model's own input size."""
        return tuple(int(v) for v in target.patch_embed.grid_size)  # type: ignore[return-value]

    def window(self, target: nn.Module) -> int | None:
        """Attention window size, for ``align="window"``; None if the backbone has none."""
        return None

    def grid_at(self, model: nn.Module, target: nn.Module, loc: int) -> tuple[int, int]:
        """(H, W) grid entering block ``loc`` at the model's own input size, unmerged. A
        hierarchical backbone (Hiera) changes it between stages."""
        return self.grid_size(target)

    def window_at(self, target: nn.Module, loc: int) -> int | None:
        """Attention window of the blocks around ``loc`` (Hiera's differs per stage)."""
        return self.window(target)

    def region(self, target: nn.Module, loc: int) -> int:
        """Which stretch of blocks ``loc`` belongs to: a merge lasts until the end of its region
        (one region for plain backbones; Hiera's stages, recovered at every stage end)."""
        return 0

    def default_loc(self, target: nn.Module) -> int:
        """Where a single merge goes when ``loc`` is not given: a quarter of the depth."""
        return self.depth(target) // 4

    def has_rope(self, target: nn.Module) -> bool:
        """Whether token positions come from RoPE, the only case ``positions`` changes."""
        return False

    def pre_norm(self, block: nn.Module) -> nn.Module:
        """The norm ``block`` applies before attention (the ``normed`` and ``keys`` metrics)."""
        return block.norm1

    def keys(self, block: nn.Module, normed: Tensor) -> Tensor:
        """Attention keys of ``block`` for normed tokens (..., C), averaged over heads."""
        raise NotImplementedError(f"metric=keys is not available for {self.name} backbones")

    def overrides(self) -> dict[str, Callable[..., Any]]:
        """Methods of the patched subclass, by name."""
        raise NotImplementedError

    def per_layer_refusal(self, target: nn.Module) -> str | None:
        """Why faithful per-layer ToMe cannot run on ``target`` ("is not supported on X: ..."),
        or None where it can (timm's VisionTransformer)."""
        return None

    # what to use instead of per-layer ToMe, after the single-layer form on the grid
    per_layer_alternative: str = ""

    def check(self, target: nn.Module, config: MergeConfig) -> None:
        """Reject a config this backbone cannot run, with a message naming the fix."""
        refusal = self.per_layer_refusal(target) if config.per_layer else None
        if refusal:
            raise ValueError(
                f"per-layer ToMe (method='tome' with r=...) {refusal}; use single-layer ToMe on the "
                f"grid (method='tome', loc=..., ratio=... or r_h/r_w){self.per_layer_alternative}"
            )
        if config.method not in self.methods:
            raise ValueError(
                f"method={config.method!r} is not supported on {self.name} backbones; "
                f"choose one of {', '.join(self.methods)}"
            )
        depth = self.depth(target)
        for stage in config.stages:
            if stage.loc >= depth:
                raise ValueError(
                    f"loc={stage.loc} is out of range: this {self.name} model has {depth} blocks, "
                    f"so loc must be in [0, {depth - 1}]"
                )
        if config.align == "window" and self.window(target) is None:
            raise ValueError(
                f"align='window' needs a windowed backbone, but this {self.name} model has no "
                "window attention; use align=none"
            )
        if config.positions == "centroid" and not self.has_rope(target):
            raise ValueError(
                f"positions='centroid' places merged tokens for RoPE, but this {self.name} model "
                "has no rotary position embedding, so it would change nothing; use "
                "positions=grid (the default)"
            )
        if config.windowed and self.window(target) is None:
            raise ValueError(
                f"windowed=true clusters each attention window separately, but this {self.name} "
                "model has no window attention; use windowed=false (or leave it unset)"
            )

    # What the evaluators and pictures ask of a whole model (``model``, not ``target(model)``).
    # The defaults are a timm backbone's.

    # where ``kind`` is None: what to pass instead, appended to the evaluator's refusal
    whole_model_hint: str = ""

    def kind(self, model: nn.Module) -> OutputKind | None:
        """What ``model`` outputs: ``"sam"`` (masks for prompts), ``"classifier"`` (logits) or
        ``"features"`` (dense patch features); None for a part of a model (a bare encoder or
        trunk) whose output no evaluator compares."""
        return "features"

    def dense_features(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """The dense output merging is recovered for, as a grid, and the pooled output if any.

        images (B, 3, H_img, W_img) -> ((B, C, H, W), (B, C') or None). Default: timm's
        ``forward_features`` with the prefix tokens (CLS, registers) left out of the grid, and
        ``forward_head(pre_logits=True)`` as the pooled output.
        """
        tokens = model.forward_features(images)  # (B, P + H * W, C)
        h, w = model.patch_embed.dynamic_feat_size(images.shape[-2:])
        patches = tokens[:, model.num_prefix_tokens :]
        if patches.shape[1] != h * w:
            raise RuntimeError(
                f"{type(model).__name__} returned {patches.shape[1]} patch tokens for a {h}x{w} "
                "grid: the merge was not recovered, so merged and unmerged tokens do not line up"
            )
        grid = patches.unflatten(1, (h, w)).permute(0, 3, 1, 2)  # (B, C, H, W)
        pooled = model.forward_head(tokens, pre_logits=True)
        return grid, pooled if pooled.dim() == 2 else None

    def pools_cls_token(self, model: nn.Module) -> bool:
        """Whether the pooled output of ``dense_features`` is the CLS token (rather than, e.g.,
        the mean of the patch tokens)."""
        return getattr(model, "global_pool", None) == "token"

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) of the input ``model`` takes. Default: the size its patch embedding was
        built for, else its pretrained config's."""
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
            h, w = patch_embed.img_size
            return 3, int(h), int(w)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" in cfg:
            return tuple(cfg["input_size"])  # type: ignore[return-value]
        raise ValueError(
            f"cannot tell the input size of {type(model).__name__}; pass image_size=... to the "
            "throughput evaluator"
        )

    def timed_module(self, model: nn.Module) -> nn.Module:
        """The part of ``model`` whose speed merging changes, which throughput times: the whole
        model unless it holds more than an image encoder."""
        return model

    def eval_transform(self, model: nn.Module) -> Callable[[Any], Tensor]:
        """The evaluation transform of ``model``: a PIL image -> a (3, H, W) float tensor.

        Default: timm's, resolved from the pretrained config (for DeiT: resize the short side
        to 248, bicubic, center crop 224, to tensor, normalise with the ImageNet mean / std).
        """
        config = resolve_data_config({}, model=model)
        # A model built at another size (e.g. img_size=64 for a quick run) keeps its pretrained
        # config's 224: take the size its patch embedding actually expects.
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if size is not None and not getattr(model, "dynamic_img_size", False):
            config["input_size"] = (3, *tuple(size))
        return create_transform(**config)

    def normalize_pixels(self, model: nn.Module, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) float RGB in [0, 255] -> the normalised input ``model`` expects, same
        shape. Default: the pretrained config's mean / std, ImageNet's where there is none."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1)
        return (pixels / 255.0 - mean) / std

    def prompt_predictor(self, model: nn.Module) -> Any:
        """The family's own predictor of masks for box and point prompts on one image
        (segment-anything's ``SamPredictor``, sam2's ``SAM2ImagePredictor``), for a model whose
        ``kind`` is ``"sam"``; TypeError for a model that takes no prompts."""
        raise TypeError(
            f"{type(model).__module__}.{type(model).__qualname__} takes no prompts; the "
            "mask protocols need a whole segment-anything Sam or sam2 SAM2Base"
        )


def keys_from_qkv_output(qkv_out: Tensor, num_heads: int) -> Tensor:
    """Keys out of a fused qkv projection's output, averaged over heads:
    (..., 3 * C) -> (..., C // num_heads)."""
    out = qkv_out.unflatten(-1, (3, num_heads, qkv_out.shape[-1] // (3 * num_heads)))
    return out[..., 1, :, :].mean(-2)


def keys_from_qkv(qkv: nn.Linear, normed: Tensor, num_heads: int) -> Tensor:
    """Keys of a fused qkv projection, averaged over heads: (..., C) -> (..., C // num_heads)."""
    return keys_from_qkv_output(qkv(normed), num_heads)


def unmerged_entry_point(name: str, instead: str) -> Callable[..., Any]:
    """A stand-in for a model method that runs the backbone's own block loop (so it would not
    merge): calling it on a patched model raises instead of silently returning unmerged output."""

    def refuse(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__}.{name} runs the backbone's own block loop, which does not merge; "
            f"on a patched model use {instead}, or spatialmerge.unpatch(model) first"
        )

    return refuse
