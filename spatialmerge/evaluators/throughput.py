"""Throughput: how much faster a merge schedule makes a model, measured honestly.

Variants (the unmerged model and each merged one) are timed alternately in one process, after a
warm-up, and the median per-batch time is reported, so drift (thermal, other load) hits every
variant alike. Every timed round is kept: each round gives one speed-up (the unmerged time of
that round over the variant's), and the speed-up is reported as the median of those with its
interquartile range, flagged when the spread is large next to the gain being claimed. FLOPs come from PyTorch's own flop counter; the FLOP-ideal speed-up next to the
measured one shows where memory traffic, not arithmetic, sets the pace.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import spatialmerge
from spatialmerge.adapters import find_adapter, patch_state
from spatialmerge.evaluators.timing import host_load, machine_load, summarise_rounds
from spatialmerge.models.info import nearest_tiled_sides

if TYPE_CHECKING:
    from spatialmerge.pipeline import EvalContext

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def count_flops(module: nn.Module, x: Tensor) -> int:
    """FLOPs of one forward, counted by ``torch.utils.flop_counter``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(x)
    return counter.get_total_flops()


@dataclass
class Variant:
    name: str
    module: nn.Module
    times: list[float]
    flops: int = 0
    tokens: int | None = None
    peak_memory_mb: float | None = None
    graph_breaks: int | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(
    variants: list[Variant],
    make_input: Callable[[], Tensor],
    warmup: int,
    iters: int,
    device: torch.device,
    autocast: Any,
    progress: bool = False,
) -> None:
    """Fill each variant's ``times`` with ``iters`` seconds-per-batch, alternating variants."""
    x = make_input()
    rounds = tqdm(
        total=warmup + iters, desc=f"timing {len(variants)} variants", unit="round", disable=not progress
    )
    with torch.inference_mode(), autocast, rounds:
        for _ in range(warmup):
            for variant in variants:
                variant.module(x)
            rounds.update()
        _sync(device)
        for _ in range(iters):
            for variant in variants:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                variant.module(x)
                _sync(device)
                variant.times.append(time.perf_counter() - start)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) / 2**20
                    variant.peak_memory_mb = max(variant.peak_memory_mb or 0.0, peak)
            rounds.update()


def count_graph_breaks(module: nn.Module, x: Tensor) -> int:
    """Graph breaks TorchDynamo makes tracing one forward of ``module`` on ``x`` (B, C, H, W):
    each one splits the compiled forward into pieces that run eagerly in between."""
    with torch.inference_mode():
        return torch._dynamo.explain(module)(x).graph_break_count


def _tokens(model: nn.Module, unmerged: int) -> int | None:
    """Patch tokens after the last merge; None where it changes every layer (per-layer ToMe)."""
    state = patch_state(model)
    if state is not None and state.config.per_layer:
        return None
    if state is None or state.last_hw is None:
        return unmerged
    h, w = state.last_hw[1]
    return h * w


class ThroughputEvaluator:
    """Measures img/s, speed-up and FLOPs of a merged model against the same model unmerged.

    Args:
        batch_size: images per forward.
        warmup: untimed rounds (every variant once per round).
        iters: timed rounds; the median is reported.
        dtype: ``fp32``, or ``fp16`` / ``bf16`` autocast (CUDA only).
        compile: wrap every variant in ``torch.compile``; each row then records the graph breaks
            TorchDynamo makes in its forward (``graph_breaks``, 0 for a whole-graph merge).
        image_size: input side; None takes the model's own.
        progress: show a tqdm bar over the timed rounds.
    """

    def __init__(
        self,
        batch_size: int = 1,
        warmup: int = 1,
        iters: int = 3,
        dtype: str = "fp32",
        compile: bool = False,
        image_size: int | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(compile, bool):
            raise ValueError(f"compile={compile!r} must be true or false")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if batch_size < 1 or iters < 1 or warmup < 0:
            raise ValueError(
                f"batch_size={batch_size}, iters={iters} must be >= 1 and warmup={warmup} >= 0"
            )
        self.batch_size = batch_size
        self.warmup = warmup
        self.iters = iters
        self.dtype = dtype
        self.compile = compile
        self.image_size = image_size
        self.progress = progress

    def evaluate(
        self,
        model: nn.Module,
        merges: Mapping[str, Mapping[str, Any]],
        device: str | torch.device = "cpu",
    ) -> dict[str, Any]:
        """Time ``model`` unmerged and with each merge in ``merges`` (name -> patch kwargs).

        Returns ``{"baseline": {...}, name: {...}, ...}`` with img_s, ms_per_batch, gflops,
        tokens, speedup, flop_speedup and peak_memory_mb (CUDA) per variant, plus every timed
        round (``times_ms``), the speed-up's quartiles over rounds (``speedup_q1``,
        ``speedup_q3``) and ``noisy`` where their spread is large next to the gain.
        """
        device = torch.device(device)
        if self.dtype != "fp32" and device.type != "cuda":
            raise ValueError(
                f"dtype={self.dtype} autocast is for CUDA; on {device.type} use evaluator dtype=fp32"
            )
        model = model.eval().to(device)
        spatialmerge.unpatch(model)
        adapter = find_adapter(model)
        channels, h, w = adapter.input_size(model)
        if self.image_size is not None:
            h = w = self.image_size
        shape = (self.batch_size, channels, h, w)
        generator = torch.Generator().manual_seed(0)

        def make_input() -> Tensor:
            return torch.randn(shape, generator=generator).to(device)

        variants = [Variant("baseline", adapter.timed_module(model), [])]
        for name, options in merges.items():
            merged = copy.deepcopy(model)
            spatialmerge.patch(merged, **dict(options))
            variants.append(Variant(name, adapter.timed_module(merged), []))
        probe = make_input()
        with self._refusing_size(self._checked_size(model)):  # the first forward at this size
            variants[0].flops = count_flops(variants[0].module, probe)
        for variant in variants[1:]:
            variant.flops = count_flops(variant.module, probe)
        unmerged_tokens = self._unmerged_tokens(variants, probe)
        for variant in variants:
            variant.tokens = _tokens(variant.module, unmerged_tokens)
            if self.compile:
                variant.graph_breaks = count_graph_breaks(variant.module, probe)
                variant.module = torch.compile(variant.module)
        autocast = (
            torch.autocast(device.type, dtype=DTYPES[self.dtype]) if self.dtype != "fp32" else nullcontext()
        )
        load_before = machine_load()
        time_variants(variants, make_input, self.warmup, self.iters, device, autocast, self.progress)
        return self._summarise(variants, device, {"before": load_before, "after": machine_load()})

    def check(self, model: nn.Module) -> None:
        """Refuse an ``image_size`` the model cannot run, before any evaluator spends time: one
        that its patches do not tile, or that a model built for another size refuses (tried on
        one image, only when the size differs from the model's own)."""
        own = self._checked_size(model)
        if self.image_size in (None, own):
            return
        adapter = find_adapter(model)
        size = self.image_size
        image = torch.zeros(1, adapter.input_size(model)[0], size, size, device=_device_of(model))
        was_training = model.training
        try:
            with self._refusing_size(own), torch.no_grad():
                adapter.timed_module(model.eval())(image)
        finally:
            model.train(was_training)

    def _checked_size(self, model: nn.Module) -> int:
        """The model's own input side, after refusing an ``image_size`` that is no whole number
        of pixels or that the model's patches do not tile."""
        adapter = find_adapter(model)
        own = adapter.input_size(model)[1]
        size = self.image_size
        if size is None:
            return own
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"evaluator.throughput.image_size={size!r} must be a whole number of pixels, "
                             f"e.g. the model's own {own}")
        stride = max(1, own // adapter.grid_size(adapter.target(model))[0])
        if size % stride:
            low, high = nearest_tiled_sides(size, stride)
            raise ValueError(
                f"evaluator.throughput.image_size={size} is not a multiple of the model's {stride}-px "
                f"patches; the nearest sizes are {low} and {high}, or drop it for the model's own {own}"
            )
        return own

    @contextmanager
    def _refusing_size(self, own: int) -> Iterator[None]:
        """Around the first forward at ``image_size``: a model built for its ``own`` side that
        refuses another is one line naming both sizes and the fix."""
        try:
            yield
        except (AssertionError, RuntimeError, ValueError) as err:
            if self.image_size in (None, own):
                raise  # the model's own size: not a setting of this evaluator
            raise ValueError(
                f"evaluator.throughput.image_size={self.image_size}: the model runs at {own} px "
                f"({' '.join(str(err).split())[:160]}); drop evaluator.throughput.image_size, or build "
                f"the model at that size with model.image_size={self.image_size}"
            ) from None

    def run(self, ctx: "EvalContext") -> dict[str, Any]:
        """Pipeline entry: the unmerged model against the configured merge."""
        merges = {} if ctx.merge is None else {ctx.merge["method"]: ctx.merge}
        return self.evaluate(ctx.model, merges, ctx.device)

    @classmethod
    def _unmerged_tokens(cls, variants: list[Variant], x: Tensor) -> int:
        """Tokens of the grid the merges start from, unmerged: the patch grid, or for Hiera the
        stage the merge is in (its first stage holds 16x more tokens, never merged)."""
        for variant in variants[1:]:
            state = patch_state(variant.module)
            if state is not None and state.last_hw is not None:
                h, w = state.last_hw[0]
                return h * w
        return cls._grid_tokens(variants[0].module, x)

    @staticmethod
    def _grid_tokens(module: nn.Module, x: Tensor) -> int:
        patch_embed = getattr(module, "patch_embed", None)
        if patch_embed is None:
            return 0
        with torch.inference_mode():
            out = patch_embed(x[:1])
        return out.shape[1] * out.shape[2] if out.dim() == 4 else out.shape[1]

    def _summarise(self, variants: list[Variant], device: torch.device, load: dict[str, Any]) -> dict[str, Any]:
        base = variants[0]
        busy = host_load(load, device.type)
        results: dict[str, Any] = {}
        for variant in variants:
            row = summarise_rounds(base.times, variant.times, self.batch_size, busy, variant is base)
            results[variant.name] = {
                **row,
                "gflops": variant.flops / 1e9 / self.batch_size,
                "tokens": variant.tokens,
                "flop_speedup": base.flops / variant.flops if variant.flops else float("nan"),
                "peak_memory_mb": variant.peak_memory_mb,
                **({"graph_breaks": variant.graph_breaks} if self.compile else {}),
            }
        results["setup"] = {
            "device": str(device),
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "warmup": self.warmup,
            "iters": self.iters,
            "compile": self.compile,
            "load": load,
        }
        return results


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device
