"""SAM 2's image encoder: the Hiera trunk of ``sam2`` (inside ``SAM2Base`` and ``ImageEncoder``).

Hiera is hierarchical: four stages at 1/4, 1/8, 1/16 and 1/32 of the input (256, 128, 64 and
32 tokens a side at SAM 2's 1024 px), each entered through a *q-pool* block that max-pools the
previous stage's grid by 2, and every stage's last output goes to the FPN neck. Its blocks take
any (B, H, W, C) grid: window blocks pad it to whole windows and positions are added once,
before the first block. So the stock blocks run on a reduced grid unmodified.

A merge lasts until the end of its stage: the stage's output is recovered to the stage's native
grid, which is what the neck receives, and the next stage's q-pool pools that recovered grid.
Continuing with the reduced grid through the q-pool instead would speed up the following stage
too, but its recovery would have to guess how pooled merged tokens map back to pooled cells. On
Hiera-B+ the fourth stage costs 3 of 24 equal-FLOP blocks, so ending the merge at the stage
boundary gives away little (measured in docs/library.md and docs/benchmark.md's SAM 2 rows) and keeps the recovery exact.

With ``prop_attn`` the merged stage's blocks run their attention under ``key_bias`` (the size
map partitioned into each block's windows as its tokens are; the bias ends with the merge).

The schedule goes in the third stage (16 of Hiera-B+'s 24 blocks, where the time goes), e.g.
``loc=6`` with ``ratio=0.125`` and ``align="window"``: 64x64 -> 56x56, four whole 14-windows.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from torch import Tensor, nn

from spatialmerge.adapters.adapter import Adapter, OutputKind, keys_from_qkv
from spatialmerge.adapters.registry import STATE_ATTR, register_adapter
from spatialmerge.adapters.config import MergeConfig
from spatialmerge.adapters.loops import run_grid_blocks

# SAM 2's encoder input side (``SAM2Base.image_size`` in every official config); a bare trunk
# does not know its input size, so schedules of a bare Hiera are described at this size.
SAM2_IMAGE_SIZE = 1024
SAM2_TYPES = ("sam2.modeling.sam2_base.SAM2Base", "sam2.modeling.backbones.image_encoder.ImageEncoder",
              "sam2.modeling.backbones.hieradet.Hiera")


def loaded_sam2_types() -> tuple[type, type, type] | None:
    """(SAM2Base, ImageEncoder, Hiera) if the sam2 package has been imported, else None.

    Importing sam2 initialises Hydra's global state (its ``__init__`` registers its config
    module), which would break a Hydra app started afterwards (``eval.py``) and any later
    ``hydra.initialize``. So spatialmerge never imports sam2 on its own account: a SAM 2 model
    can only exist once its package was imported by whoever built it.
    """
    if "sam2" not in sys.modules:
        return None
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import ImageEncoder
    from sam2.modeling.sam2_base import SAM2Base

    return SAM2Base, ImageEncoder, Hiera


def _hiera_forward(self: nn.Module, x: Tensor) -> list[Tensor]:
    """Hiera's forward with the merge schedule: (B, 3, S, S) -> the stage outputs (B, C_s,
    H_s, W_s), each at its native size (merges are recovered at the end of their stage)."""
    x = self.patch_embed(x)  # (B, H, W, C)
    x = x + self._get_pos_embed(x.shape[1:3])
    outputs = []

    def keep_stage_output(i: int, stage_output: Tensor) -> None:
        # recovered: the neck and the next q-pool get the stage's native grid
        if i == self.stage_ends[-1] or self.return_interm_layers:
            outputs.append(stage_output.permute(0, 3, 1, 2))

    run_grid_blocks(
        getattr(self, STATE_ATTR).run(self), x, self.blocks,
        stage_ends=self.stage_ends, on_stage_end=keep_stage_output,
    )
    return outputs


class HieraAdapter(Adapter):
    """sam2 ``SAM2Base`` or ``ImageEncoder`` (patches their Hiera trunk), or a bare ``Hiera``."""

    name = "SAM 2 Hiera"
    type_names = SAM2_TYPES

    def target(self, model: nn.Module) -> nn.Module:
        types = loaded_sam2_types()
        if types is not None and isinstance(model, types[0]):
            return model.image_encoder.trunk
        if types is not None and isinstance(model, types[1]):
            return model.trunk
        return model

    def matches(self, model: nn.Module) -> bool:
        types = loaded_sam2_types()
        return types is not None and isinstance(model, types) and isinstance(self.target(model), types[2])

    def _stage(self, target: nn.Module, loc: int) -> int:
        return sum(end < loc for end in target.stage_ends)

    def region(self, target: nn.Module, loc: int) -> int:
        return self._stage(target, loc)

    def grid_at(self, model: nn.Module, target: nn.Module, loc: int) -> tuple[int, int]:
        size = model.image_size if isinstance(model, loaded_sam2_types()[0]) else SAM2_IMAGE_SIZE
        side = size // target.patch_embed.proj.stride[0]
        for block in target.q_pool_blocks:
            if block <= loc:
                side //= target.q_stride[0]
        return side, side

    def window(self, target: nn.Module) -> int | None:
        return max(target.window_spec)

    def window_at(self, target: nn.Module, loc: int) -> int | None:
        return target.window_spec[self._stage(target, loc)]

    def default_loc(self, target: nn.Module) -> int:
        # the first block of the third stage after its q-pool block: the longest stage
        stage = min(2, len(target.stage_ends) - 1)
        return target.stage_ends[stage - 1] + 2 if stage > 0 else 0

    def keys(self, block: nn.Module, normed: Tensor) -> Tensor:
        return keys_from_qkv(block.attn.qkv, normed, block.attn.num_heads)

    def per_layer_refusal(self, target: nn.Module) -> str | None:
        return (
            "is not supported on SAM 2's Hiera: it leaves an unordered token set that window "
            "attention and q-pooling cannot run on"
        )

    def check(self, target: nn.Module, config: MergeConfig) -> None:
        if config.windowed:
            raise ValueError(
                "windowed=true (Expedit-SAM's per-window clustering) is not available on SAM 2's "
                "Hiera, whose windows change size per stage; use windowed=false (the default here)"
            )
        super().check(target, config)
        for stage in config.stages:
            if stage.loc in target.q_pool_blocks:
                raise ValueError(
                    f"loc={stage.loc} is a q-pool block of this Hiera (it pools the previous "
                    f"stage's grid; q-pool blocks {list(target.q_pool_blocks)}, stage ends "
                    f"{list(target.stage_ends)}); merge before block {stage.loc + 1} or later"
                )

    def overrides(self) -> dict[str, Callable[..., Any]]:
        return {"forward": _hiera_forward}

    def _is_whole(self, model: nn.Module) -> bool:
        """Whether ``model`` is a whole ``SAM2Base`` (image encoder, prompt encoder, mask decoder)."""
        return isinstance(model, loaded_sam2_types()[0])

    def kind(self, model: nn.Module) -> OutputKind | None:
        return "sam" if self._is_whole(model) else None

    def dense_features(self, model: nn.Module, images: Tensor) -> tuple[Tensor, None]:
        """The FPN level of Hiera's third stage, which the mask decoder reads:
        (B, 3, S, S) -> ((B, C, S / 16, S / 16), None)."""
        encoder = model.image_encoder if self._is_whole(model) else model
        if not isinstance(encoder, loaded_sam2_types()[1]):
            raise TypeError(
                "a bare Hiera trunk returns one map per stage, not the image embedding; pass "
                "the SAM2Base or its ImageEncoder"
            )
        return encoder(images)["vision_features"], None

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        if self._is_whole(model):  # a square input
            return 3, model.image_size, model.image_size
        return super().input_size(model)

    def timed_module(self, model: nn.Module) -> nn.Module:
        return model.image_encoder if self._is_whole(model) else model

    def prompt_predictor(self, model: nn.Module) -> Any:
        if not self._is_whole(model):
            return super().prompt_predictor(model)
        from sam2.sam2_image_predictor import SAM2ImagePredictor  # sam2 is imported: model exists

        return SAM2ImagePredictor(model)


register_adapter(HieraAdapter())
