"""The patch mechanism shared by every backbone: the registry of families and the patch API.

A patched module keeps its class's behaviour and parameters; only the method that runs its block
loop is swapped, by giving the instance a subclass that overrides it (ToMe's approach). The
blocks themselves are never touched, so timm / segment-anything features (LayerScale, QK-norm,
fused attention, window padding, rel-pos interpolation, RoPE) keep working as their authors wrote
them. ``unpatch`` puts the original class back.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from spatialmerge.adapters.adapter import Adapter
from spatialmerge.adapters.config import MergeConfig, with_default_loc
from spatialmerge.adapters.runtime import PatchState
from spatialmerge.adapters.schedule import Schedule, resolve_stage
from spatialmerge.merging.expedite import check_expedite_options
from spatialmerge.merging.tome import parse_r

STATE_ATTR = "_spatialmerge"


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
        entry_points = {name: _refusing_tracing(method) for name, method in adapter.overrides().items()}
        methods = {**entry_points, "__reduce_ex__": _reduce_patched,
                   "__prepare_scriptable__": _refuse_scripting}
        _CLASS_CACHE[key] = type(f"Merging{cls.__name__}", (cls,), methods)
    return _CLASS_CACHE[key]


def _refuse_scripting(self: nn.Module) -> nn.Module:
    """``torch.jit.script`` calls this before compiling: TorchScript cannot compile the patched
    block loop (plain Python over the library's blocks), so say so in one line instead of its
    compiler's traceback."""
    raise TypeError(
        f"{type(self).__name__} is patched by spatialmerge, which TorchScript cannot compile; export "
        "it with torch.export or torch.compile instead (spatialmerge.export, docs/deploy.md), or "
        "spatialmerge.unpatch(model) first to script the unmerged model"
    )


def _refusing_tracing(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` refusing ``torch.jit.trace`` (and the TorchScript ONNX exporter, which traces):
    the tracer turns the grid's sizes into tensors, so the schedule's row and column counts would
    fail deep inside it or be frozen as constants; say so in one line. torch.export and
    torch.compile see ``is_tracing()`` as False and trace through."""

    @functools.wraps(method)
    def entry_point(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.jit.is_tracing():
            raise TypeError(
                f"{type(self).__name__} is patched by spatialmerge, which torch.jit.trace cannot "
                "record (the merge's grid sizes become traced tensors); export it with "
                "torch.export or torch.onnx.export(..., dynamo=True) instead (spatialmerge.export, "
                "docs/deploy.md), or spatialmerge.unpatch(model) first to trace the unmerged model"
            )
        return method(self, *args, **kwargs)

    return entry_point


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
    See ``MergeConfig.create`` for every option. A request this backbone cannot run raises
    and leaves the model as it was (patched with its previous schedule, or not at all).
    """
    previous = patch_state(model)
    unpatch(model)
    try:
        schedule = resolve_schedule(model, method, **options)
    except Exception:
        if previous is not None:
            _apply(model, previous)
        raise
    if schedule is not None:
        adapter = find_adapter(model)
        _apply(model, PatchState(schedule.config, adapter, type(adapter.target(model)), schedule))
    return model


def _apply(model: nn.Module, state: PatchState) -> None:
    """Run ``model``'s block loop through ``state`` (its adapter's patched forward)."""
    target = state.adapter.target(model)
    target.__class__ = _patched_class(state.original_class, state.adapter)
    setattr(target, STATE_ATTR, state)


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


def resolve_schedule(model: nn.Module, method: str = "cubist", **options: Any) -> Schedule | None:
    """Validate ``patch(model, method, **options)`` once and resolve it on this backbone at its
    own input size: the default ``loc`` (a quarter of the depth; Hiera: the start of its third
    stage), ``prop_attn``'s default, Expedite's backbone settings, and every stage's grid.
    None for ``method="none"``. Raises ValueError for a request this backbone cannot run."""
    adapter = find_adapter(model)
    target = adapter.target(model)
    options = with_default_loc(options, adapter.default_loc(target))
    config = MergeConfig.create(method, **options)
    if config.method == "none":
        return None
    config = config.with_defaults(adapter.expedite_defaults)
    adapter.check(target, config)
    ran = {"method": config.method, **options, "prop_attn": config.prop_attn}
    if config.method == "expedite":
        ran.update(config.expedite)
    first = config.stages[0].loc if config.stages else 0
    hw = adapter.grid_at(model, target, first)
    if config.per_layer:
        r_per_block = tuple(parse_r(adapter.depth(target), config.r))
        return Schedule(config, ran, hw, r_per_block=r_per_block)
    stages = []
    region = adapter.region(target, first)
    for stage in config.stages:
        if adapter.region(target, stage.loc) != region:  # the earlier merges were recovered
            region, hw = adapter.region(target, stage.loc), adapter.grid_at(model, target, stage.loc)
        stages.append(resolve_stage(config, stage, hw, adapter.window_at(target, stage.loc)))
        hw = stages[-1].grid_out
    if config.method == "expedite":  # before any forward, with the merged grid's centroids
        (merged,) = stages
        side = merged.window_side
        centroids = side * side if side is not None else merged.grid_out[0] * merged.grid_out[1]
        options = config.grid_options()
        check_expedite_options(options["n_iters"], options["window_size"], options["temperature"],
                               options["reconstruct"], options["k"], centroids)
    return Schedule(config, ran, stages[0].grid_in, tuple(stages))


def describe_schedule(model: nn.Module, method: str = "cubist", **options: Any) -> dict[str, Any]:
    """What ``patch(model, method, **options)`` runs at the model's own input size, resolved.

    For grid schedules: each stage's block, the rows and columns removed and the grid before
    and after (a ratio and ``align`` turned into numbers, a per-window budget into its whole
    windows), and the tokens kept; for per-layer ToMe: the tokens merged in each block. This is
    what results.json records, rather than only the request (``loc: null``, ``ratio``).
    """
    schedule = resolve_schedule(model, method, **options)
    return {"method": "none"} if schedule is None else schedule.describe()
