"""The performance benchmark: merge schedules against their zero-cost limit.

For every schedule the same schedule also runs with the ``oracle`` method (slice to the reduced
grid, recover by nearest upsampling), whose speed-up is what the schedule could give if merging
cost nothing. Efficiency = measured speed-up / oracle speed-up. Everything is timed in one
process by ``ThroughputEvaluator`` (alternating variants, medians).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import spatialmerge
from spatialmerge.adapters import find_adapter
from spatialmerge.adapters.runtime import merge_clock
from spatialmerge.evaluators.throughput import ThroughputEvaluator
from spatialmerge.models import build_model

# Tiny architectures for a quick end-to-end check of the script (and its tests).
TINY = {
    "sam": {"image_size": 256, "depth": 4, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1, 3), "window_size": 8},
    "vit": {"image_size": 64, "depth": 4, "embed_dim": 32, "num_heads": 2},
    # Hiera at SAM 2's 1024 px with 1, 1, 4, 1 blocks (stage 3 = blocks 2-5 on 64x64)
    "sam2": {"trunk": {
        "embed_dim": 8, "num_heads": 1, "stages": [1, 1, 4, 1], "global_att_blocks": [4],
        "window_spec": [8, 4, 14, 7], "window_pos_embed_bkg_spatial_size": [7, 7],
    }},
}


@dataclass
class Suite:
    """One model and the schedules timed on it.

    Attributes:
        model: registry name for ``build_model``.
        batch_size: images per forward.
        schedules: variant name -> ``patch`` kwargs.
        oracle: variant name -> name of the oracle variant of the same schedule.
        overrides: architecture overrides (tiny runs).
    """

    model: str
    batch_size: int
    schedules: dict[str, dict[str, Any]]
    oracle: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)


def default_suites(tiny: bool = False, batch_size: int | None = None) -> dict[str, Suite]:
    """SAM-B 1024 batch 1; SAM 2.1 Hiera-B+ 1024 batch 1; DeiT-B 224 batch 32; DINOv3-B 224
    batch 32.

    SAM 2 merges in its third stage (64x64 -> 56x56, whole 14-windows) from the block after the
    stage's q-pool to the stage's end, where it is recovered (see ``spatialmerge.adapters.hiera``).

    SAM's Expedite rows are Expedit-SAM's per-window clustering (the SAM default), whose
    whole-window budget lands near, not on, cubist's: 64 -> 56 becomes 55x55 (11 x 11 centroids
    in each of 5 x 5 windows), 64 -> 42 becomes 40x40; the tokens column shows it."""
    sam_depth = TINY["sam"]["depth"] if tiny else 12
    vit_depth = TINY["vit"]["depth"] if tiny else 12
    # 64 -> 56 is ratio 0.125 and 64 -> 42 is 22/64; the same ratios shrink a tiny grid alike.
    sam_budgets = {"56": 0.125, "42": 22 / 64}
    sam: dict[str, dict[str, Any]] = {}
    sam_oracle: dict[str, str] = {}
    for side, loc in (("56", sam_depth // 4), ("56", sam_depth // 2), ("42", sam_depth // 4)):
        key = f"{side}@{loc}"
        sam[f"oracle {key}"] = dict(method="oracle", loc=loc, ratio=sam_budgets[side])
        for method in ("cubist", "tome", "expedite"):
            sam[f"{method} {key}"] = dict(method=method, loc=loc, ratio=sam_budgets[side])
            sam_oracle[f"{method} {key}"] = f"oracle {key}"
        # Expedit-SAM's own form on SAM: each 14x14 window clustered to s x s (its default k=36
        # needs s >= 6, more centroids than a tiny window holds)
        if tiny:
            sam[f"expedite {key}"]["k"] = 4
    deit: dict[str, dict[str, Any]] = {}
    deit_oracle: dict[str, str] = {}
    for r in (1, 2):
        deit[f"oracle r={r}"] = dict(method="oracle", loc=1, r_h=r, r_w=r)
        deit[f"cubist r={r}"] = dict(method="cubist", loc=1, r_h=r, r_w=r)
        deit_oracle[f"cubist r={r}"] = f"oracle r={r}"
    for r in (6, 9) if not tiny else (1, 2):
        deit[f"tome r={r}"] = dict(method="tome", r=r)
    dino: dict[str, dict[str, Any]] = {}
    dino_oracle: dict[str, str] = {}
    for ratio in (0.1, 0.2):
        dino[f"oracle {ratio}"] = dict(method="oracle", loc=vit_depth // 2, ratio=ratio)
        dino[f"cubist {ratio}"] = dict(method="cubist", loc=vit_depth // 2, ratio=ratio)
        dino_oracle[f"cubist {ratio}"] = f"oracle {ratio}"
    sam2 = {
        # loc null: the backbone's default, the first stage-3 block after its q-pool
        "oracle 56": dict(method="oracle", ratio=0.125, align="window"),
        "cubist 56": dict(method="cubist", ratio=0.125, align="window"),
    }
    return {
        "sam_b": Suite("sam_b", batch_size or 1, sam, sam_oracle, dict(TINY["sam"]) if tiny else {}),
        "sam2_b+": Suite(
            "sam2_b+", batch_size or 1, sam2, {"cubist 56": "oracle 56"}, dict(TINY["sam2"]) if tiny else {}
        ),
        "deit_b": Suite("deit_b", batch_size or (4 if tiny else 32), deit, deit_oracle, dict(TINY["vit"]) if tiny else {}),
        "dinov3_b": Suite(
            "dinov3_b", batch_size or (4 if tiny else 32), dino, dino_oracle,
            # 8x8 patches: ratio 0.1 must still remove a row and a column
            {**TINY["vit"], "image_size": 128} if tiny else {"image_size": 224},
        ),
    }


def _merge_share(module: nn.Module, x: torch.Tensor) -> float:
    """Share of one forward's wall time spent inside merge + recover."""
    merge_clock.enabled, merge_clock.seconds = True, 0.0
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            module(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            total = time.perf_counter() - start
        return merge_clock.seconds / total
    finally:
        merge_clock.enabled = False


def _rss_peak_mb(module: nn.Module, x: torch.Tensor) -> float | None:
    """Linux: the resident-memory high-water mark one forward adds over the memory held before
    it (resetting the mark through /proc/self/clear_refs). Approximate: the allocator may keep
    freed memory, which is why CUDA runs report the allocator's exact peak instead."""
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    if not status.exists():
        return None

    def field_kb(name: str) -> int:
        line = next(line for line in status.read_text().splitlines() if line.startswith(name))
        return int(line.split()[1])

    try:
        clear.write_text("5")
    except OSError:
        return None
    before = field_kb("VmRSS:")
    with torch.inference_mode():
        module(x)
    return (field_kb("VmHWM:") - before) / 1024


def run_suite(
    suite: Suite,
    device: str = "cpu",
    dtype: str = "fp32",
    warmup: int = 1,
    iters: int = 3,
) -> list[dict[str, Any]]:
    """Time one suite; return one row per variant with every benchmark column."""
    model = build_model(suite.model, **suite.overrides)
    evaluator = ThroughputEvaluator(batch_size=suite.batch_size, warmup=warmup, iters=iters, dtype=dtype)
    timings = evaluator.evaluate(model, suite.schedules, device)  # tqdm over the rounds
    adapter = find_adapter(model)
    channels, h, w = adapter.input_size(model)
    x = torch.randn(suite.batch_size, channels, h, w, device=device)
    rows = []
    for name in ["baseline", *suite.schedules]:
        timing = timings[name]
        variant = copy.deepcopy(model).to(device)
        if name != "baseline":
            spatialmerge.patch(variant, **suite.schedules[name])
        module = adapter.timed_module(variant)
        oracle = suite.oracle.get(name)
        oracle_speedup = timings[oracle]["speedup"] if oracle else None
        rows.append(
            {
                # a tiny architecture's figures say nothing about the real model: never under its name
                "suite": f"{suite.model} (tiny)" if suite.overrides else suite.model,
                "variant": name,
                "tokens": timing["tokens"],
                "gflops": timing["gflops"],
                "img_s": timing["img_s"],
                "speedup": timing["speedup"],
                "speedup_q1": timing["speedup_q1"],
                "speedup_q3": timing["speedup_q3"],
                "noisy": timing["noisy"],
                "noise": timing["noise"],
                "flop_speedup": timing["flop_speedup"],
                "oracle_speedup": oracle_speedup,
                "efficiency": timing["speedup"] / oracle_speedup if oracle_speedup else None,
                # Per-layer ToMe merges inside every block, outside the grid runtime's clock.
                "merge_share": None
                if name == "baseline" or "r" in suite.schedules[name]
                else _merge_share(module, x),
                "peak_memory_mb": timing["peak_memory_mb"]
                if torch.device(device).type == "cuda"
                else _rss_peak_mb(module, x),
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table of benchmark rows: img/s is the median round, speed-up the median of
    per-round ratios with its interquartile range, noisy where ``timing.summarise_rounds``
    says so (why, in the JSON)."""
    header = (
        "| model | variant | tokens | GFLOPs | img/s | speed-up (IQR) | noisy | FLOP-ideal | oracle | "
        "efficiency | merge+recover | peak MB |"
    )
    lines = [header, "|" + "---|" * 12]

    def fmt(value: Any, spec: str, suffix: str = "") -> str:
        return "-" if value is None else f"{value:{spec}}{suffix}"

    for row in rows:
        lines.append(
            f"| {row['suite']} | {row['variant']} | {fmt(row['tokens'], 'd')} | {row['gflops']:.1f} | "
            f"{row['img_s']:.2f} | {row['speedup']:.2f}x ({row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}) | "
            f"{'yes' if row['noisy'] else ''} | {row['flop_speedup']:.2f}x | "
            f"{fmt(row['oracle_speedup'], '.2f', 'x')} | {fmt(row['efficiency'], '.3f')} | "
            f"{fmt(None if row['merge_share'] is None else 100 * row['merge_share'], '.2f', '%')} | "
            f"{fmt(row['peak_memory_mb'], '.0f')} |"
        )
    return "\n".join(lines)
