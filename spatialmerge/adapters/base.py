"""The patch mechanism shared by every backbone, and the runtime of a grid merge schedule.

A patched module keeps its class's behaviour and parameters; only the method that runs its block
loop is swapped, by giving the instance a subclass that overrides it (ToMe's approach). The
blocks themselves are never touched, so timm / segment-anything features (LayerScale, QK-norm,
fused attention, window padding, rel-pos interpolation, RoPE) keep working as their authors wrote
them. ``unpatch`` puts the original class back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from spatialmerge.adapters.config import MergeConfig
from spatialmerge.merging.grid import GridRecord, reduce_grid, reduce_windows, window_partition
from spatialmerge.merging.tome import parse_r

STATE_ATTR = "_spatialmerge"


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
    methods: tuple[str, ...] = ("cubist", "tome", "expedite", "oracle", "pool")
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
        if config.per_layer:
            parse_r(depth, config.r)


@dataclass
class PatchState:
    """Lives on the patched module: the request, how to undo it, and the last run's source map."""

    config: MergeConfig
    adapter: Adapter
    original_class: type
    last_assignment: Tensor | None = field(default=None, repr=False)
    last_hw: tuple[tuple[int, int], tuple[int, int]] | None = None

    def run(self, target: nn.Module) -> "GridRun":
        return GridRun(self, target)


def keys_from_qkv_output(qkv_out: Tensor, num_heads: int) -> Tensor:
    """Keys out of a fused qkv projection's output, averaged over heads:
    (..., 3 * C) -> (..., C // num_heads)."""
    out = qkv_out.unflatten(-1, (3, num_heads, qkv_out.shape[-1] // (3 * num_heads)))
    return out[..., 1, :, :].mean(-2)


def keys_from_qkv(qkv: nn.Linear, normed: Tensor, num_heads: int) -> Tensor:
    """Keys of a fused qkv projection, averaged over heads: (..., C) -> (..., C // num_heads)."""
    return keys_from_qkv_output(qkv(normed), num_heads)


class MergeClock:
    """Wall time spent inside merge and recover, for benchmarks. Off by default, and then it
    costs one attribute check per merge (plain checks, not a context manager, so torch.compile
    traces through it); when on, CUDA is synchronised so each section is timed on its own."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds = 0.0

    def start(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def stop(self, device: torch.device, started: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - started


merge_clock = MergeClock()


def unmerged_entry_point(name: str, instead: str) -> Callable[..., Any]:
    """A stand-in for a model method that runs the backbone's own block loop (so it would not
    merge): calling it on a patched model raises instead of silently returning unmerged output."""

    def refuse(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__}.{name} runs the backbone's own block loop, which does not merge; "
            f"on a patched model use {instead}, or spatialmerge.unpatch(model) first"
        )

    return refuse


class GridRun:
    """One forward pass of a grid schedule: merge before the scheduled blocks, recover at the end.

    Adapters call ``before_block(i, grid, block)`` in their block loop with the patch tokens as a
    (B, H, W, C) grid, and ``recover(grid)`` where a dense output is needed.
    """

    def __init__(self, state: PatchState, target: nn.Module) -> None:
        self.state = state
        self.config = state.config
        self.adapter = state.adapter
        self.target = target
        self.stages = {stage.loc: stage for stage in state.config.stages}
        self.records: list[GridRecord] = []
        self.closed: list[GridRecord] = []  # the records of the last region ended
        self._sizes: Tensor | None = None  # (B, H', W') of the open merges, with prop_attn
        self._nothing_removed = False

    @property
    def block_window(self) -> int | None:
        """The window side later window-attention blocks must use (a per-window reduction
        tiles the grid in smaller windows), or None to keep the backbone's own."""
        sides = [record.block_window for record in self.records if record.block_window]
        return sides[-1] if sides else None

    def merges_at(self, i: int) -> bool:
        return i in self.stages

    def before_block(self, i: int, grid: Tensor, block: nn.Module) -> Tensor:
        """(B, H, W, C) -> (B, H', W', C) if a stage is scheduled before block ``i``.

        An empty batch passes through: there is nothing to merge, and the unpatched model
        returns an empty batch of the full grid too."""
        stage = self.stages.get(i)
        if stage is None or grid.shape[0] == 0:
            return grid
        h, w = grid.shape[1:3]
        window = self.adapter.window_at(self.target, i)
        r_h, r_w = stage.removal((h, w), window, self.config.align)
        started = merge_clock.start(grid.device) if merge_clock.enabled else 0.0
        metric = self._metric(grid, block)
        if self.config.windowed:
            side = window_budget((h, w), (r_h, r_w), window)
            grid, record = reduce_windows(
                self.config.method, grid, window, side, **self.config.grid_options()
            )
        else:
            grid, record = reduce_grid(
                self.config.method, grid, (h - r_h, w - r_w), metric=metric,
                **self.config.grid_options(),
            )
        self.records.append(record)
        if self.config.prop_attn:
            self._sizes = _cell_sizes(self.records)
            # nothing removed (r_h = r_w = 0): no bias at all, so the blocks run exactly as
            # unpatched; decided from the shapes, so no value leaves the device
            self._nothing_removed = all(record.in_hw == record.out_hw for record in self.records)
        if merge_clock.enabled:
            merge_clock.stop(grid.device, started)
        return grid

    def cell_sizes(self) -> Tensor | None:
        """(B, H', W') float32: how many original patches each token of the current grid covers
        (summing to H * W; an empty Expedite cluster covers 0), while ``prop_attn`` is on and a
        merge is open; else None."""
        return self._sizes

    def key_bias(self, num_prefix: int, dtype: torch.dtype) -> Tensor | None:
        """Proportional attention as an additive mask over the keys of a sequence of
        ``num_prefix`` prefix tokens then the current grid in raster order: (B, 1, 1, P + H' * W'),
        log(size) per key, 0 for prefix tokens; None where nothing is to be added (no
        ``prop_attn``, no merge open, or no token removed), so the block runs exactly as
        unpatched."""
        if self._sizes is None or self._nothing_removed:
            return None
        log_size = _log_size(self._sizes).flatten(1)  # (B, H' * W')
        bias = torch.cat([log_size.new_zeros(log_size.shape[0], num_prefix), log_size], dim=1)
        return bias[:, None, None, :].to(dtype)

    def window_key_bias(self, window: int, dtype: torch.dtype) -> Tensor | None:
        """Proportional attention for a prefix-free grid as a block with window ``window`` (0:
        global) attends it: (B * nH * nW, window * window) log(size) per key of each window,
        partitioned and padded exactly as the tokens (padding cells: 0), or (B, H' * W') for a
        global block; None as in ``key_bias``."""
        if self._sizes is None or self._nothing_removed:
            return None
        log_size = _log_size(self._sizes)[..., None]  # (B, H', W', 1)
        if window > 0:
            log_size, _ = window_partition(log_size, window)  # (B * nH * nW, window, window, 1)
        return log_size.flatten(1).to(dtype)

    def _metric(self, grid: Tensor, block: nn.Module) -> Tensor | None:
        if self.config.metric == "tokens":
            return None
        with torch.no_grad():
            normed = self.adapter.pre_norm(block)(grid)
            return normed if self.config.metric == "normed" else self.adapter.keys(block, normed)

    def assignment(self) -> Tensor | None:
        """(B, H * W) composed map from original cells to the current grid's flat index."""
        return _composed(self.records)

    def end_region(self) -> None:
        """Call after ``recover`` where the resolution changes (Hiera's q-pool): later merges
        start again from the recovered grid."""
        if self.records:
            self.closed, self.records = self.records, []
            self._sizes = None

    def recover(self, grid: Tensor) -> Tensor:
        """Undo every merge of this run, latest first: (B, H', W', C) -> (B, H, W, C)."""
        started = merge_clock.start(grid.device) if merge_clock.enabled else 0.0
        for record in reversed(self.records):
            grid = record.recover(grid)
        if merge_clock.enabled:
            merge_clock.stop(grid.device, started)
        return grid

    def finish(self) -> None:
        """Keep the source map of this run (small: one index per cell) for pictures and tests:
        of the merges still open, else of the last region ended."""
        records = self.records or self.closed
        assignment = _composed(records)
        self.state.last_assignment = None if assignment is None else assignment.detach()
        self.state.last_hw = (records[0].in_hw, records[-1].out_hw) if records else None


def _composed(records: list[GridRecord]) -> Tensor | None:
    """(B, H * W) map from the first record's cells to the last record's flat token index."""
    if not records:
        return None
    composed = records[0].assignment
    for record in records[1:]:
        composed = record.assignment.gather(1, composed)
    return composed


def _cell_sizes(records: list[GridRecord]) -> Tensor:
    """(B, H', W') float32 count of the original cells behind each token of the last record's
    grid: merges compose, so a cell merged twice counts every patch it absorbed."""
    assignment = _composed(records)  # (B, H * W)
    h, w = records[-1].out_hw
    counts = torch.zeros(assignment.shape[0], h * w, device=assignment.device)
    counts.scatter_add_(1, assignment, torch.ones_like(assignment, dtype=counts.dtype))
    return counts.view(-1, h, w)


def _log_size(sizes: Tensor) -> Tensor:
    """log(size), an empty Expedite cluster counted as one patch: its centroid is still a token
    that later blocks attend to, and log(0) would mask it out of every softmax."""
    return sizes.clamp_min(1).log()


def window_budget(hw: tuple[int, int], removal: tuple[int, int], window: int) -> int:
    """Centroids per window side for a per-window reduction with about the requested budget.

    The grid pads to n windows per axis, each reduced to s x s, so the result is n * s per side:
    s = round((H - r_h) / n), the nearest whole-window grid to what cubist would keep. Windows
    are square, so both axes must give the same s.
    """
    sides = []
    for size, r in zip(hw, removal):
        count = -(-size // window)
        sides.append(min(window, max(1, round((size - r) / count))))
    if sides[0] != sides[1]:
        raise ValueError(
            f"a per-window reduction keeps square windows, but the removal (r_h, r_w)={removal} "
            f"on the {hw[0]}x{hw[1]} grid asks for {sides[0]} x {sides[1]} tokens per "
            f"{window}x{window} window; give one ratio, or r_h and r_w that agree"
        )
    if sides[0] == window:
        raise ValueError(
            f"the removal (r_h, r_w)={removal} on the {hw[0]}x{hw[1]} grid rounds to "
            f"{window}x{window} tokens per {window}x{window} window: nothing would be merged; "
            "ask for more (a larger ratio)"
        )
    return sides[0]


def default_loc(model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the backbone's default ``loc`` (a quarter of the depth; Hiera: the
    start of its third stage) where a single grid merge leaves it out (or None): the same
    default as the configs' ``loc: null``."""
    single = any(options.get(k) is not None for k in ("ratio", "r_h", "r_w"))
    if options.get("loc") is None and single and not options.get("stages") and options.get("r") is None:
        adapter = find_adapter(model)
        return {**options, "loc": adapter.default_loc(adapter.target(model))}
    return options


_ADAPTERS: list[Adapter] = []
_CLASS_CACHE: dict[tuple[type, str], type] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Add a backbone family; more specific adapters must be registered first."""
    _ADAPTERS.append(adapter)
    return adapter


def supported_types() -> list[str]:
    return [name for a in _ADAPTERS for name in a.type_names or
            tuple(f"{t.__module__}.{t.__qualname__}" for t in a.model_types)]


def find_adapter(model: nn.Module) -> Adapter:
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(
        f"{type(model).__module__}.{type(model).__qualname__} is not supported by spatialmerge; "
        f"supported model types: {', '.join(supported_types())}"
    )


def _patched_class(cls: type, adapter: Adapter) -> type:
    key = (cls, adapter.name)
    if key not in _CLASS_CACHE:
        methods = {**adapter.overrides(), "__reduce_ex__": _reduce_patched}
        _CLASS_CACHE[key] = type(f"Merging{cls.__name__}", (cls,), methods)
    return _CLASS_CACHE[key]


def _reduce_patched(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    """Pickle a patched module as its original class plus its patch, so ``torch.save(model)``,
    ``pickle`` and ``copy.deepcopy`` work although the generated class has no importable name;
    loading re-applies the patch."""
    state = getattr(self, STATE_ATTR)
    attributes = {k: v for k, v in self.__dict__.items() if k != STATE_ATTR}
    return _restore_patched, (state.original_class, attributes, state)


def _restore_patched(original_class: type, attributes: dict[str, Any], state: PatchState) -> nn.Module:
    module = original_class.__new__(original_class)
    module.__dict__.update(attributes)
    module.__class__ = _patched_class(original_class, state.adapter)
    setattr(module, STATE_ATTR, state)
    return module


def patch(model: nn.Module, method: str = "cubist", **options: Any) -> nn.Module:
    """Make ``model`` merge tokens; returns the same module, patched in place.

    Example::

        spatialmerge.patch(sam, "cubist", loc=3, r_h=8, r_w=8)
        spatialmerge.patch(deit, "tome", r=8)              # faithful per-layer ToMe
        spatialmerge.patch(sam, "expedite", loc=3, ratio=0.125)

    Patching a patched model replaces the patch; ``method="none"`` is ``unpatch``. Without
    ``loc``, a single merge goes before block ``depth // 4`` (as the configs' ``loc: null``).
    See ``MergeConfig.create`` for every option.
    """
    unpatch(model)
    adapter = find_adapter(model)
    config = MergeConfig.create(method, **default_loc(model, options))
    if config.method == "none":
        return model
    config = config.with_defaults(adapter.expedite_defaults)
    target = adapter.target(model)
    adapter.check(target, config)
    state = PatchState(config, adapter, type(target))
    target.__class__ = _patched_class(type(target), adapter)
    setattr(target, STATE_ATTR, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the original class comes back; parameters were never changed."""
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            target = adapter.target(model)
            state = getattr(target, STATE_ATTR, None)
            if state is not None:
                target.__class__ = state.original_class
                delattr(target, STATE_ATTR)
            break
    return model


def patch_state(model: nn.Module) -> PatchState | None:
    """The patch on ``model`` (or on the module that runs its blocks), if any."""
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return getattr(adapter.target(model), STATE_ATTR, None)
    return None
