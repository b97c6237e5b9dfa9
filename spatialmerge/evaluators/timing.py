"""One summary of timed rounds, used by every place that reports a speed-up: ``eval.py``'s
throughput evaluator, the schedule search, the benchmark and the reports.

The unmerged model and each merged one are timed alternately, one forward each per round, so
round i of every variant ran under the same conditions. From the same rounds:

- ``ms_per_batch`` / ``img_s``: the median of the variant's own round times (and its quartiles);
- ``speedup``: the median of the per-round ratios (unmerged time / merged time of the same
  round), with its quartiles ``speedup_q1`` / ``speedup_q3``: pairing rounds cancels drift that
  hits both variants alike;
- ``noisy`` with ``noise`` (the reasons): the spread of the ratio is large next to the gain, a
  variant's own rounds spread widely (one busy round can hide in a steady ratio), the img/s of the
  two medians disagrees with the paired speed-up beyond that same tolerance, or the machine was
  loaded beyond its cores (the 1-minute load average above the CPU count by more than
  ``LOAD_MARGIN``: other work competed for the cores).
"""

from __future__ import annotations

import os
import statistics
from typing import Any, Mapping, Sequence

import torch

# A speed-up whose interquartile range is wider than this share of its gain (speed-up - 1) is
# flagged: the rounds disagree about as much as the claim is worth.
NOISY_SPREAD = 0.5
# A variant whose own rounds have an interquartile range above this share of their median was
# timed on a machine whose speed changed while it ran.
NOISY_ROUNDS = 0.25


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile), linearly interpolated; one value gives it thrice."""
    if not values:
        raise ValueError("no timed rounds to summarise: set iters >= 1")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def machine_load() -> dict[str, Any]:
    """The machine as a timing saw it: 1-minute load average, CPU count, torch's threads."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load = None
    return {"load_1m": load, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


# How far the 1-minute load average may exceed the CPU count before a CPU timing is called
# loaded: the timing process's own threads fill the cores and count in the average, and the
# average still holds the data loader that ran just before, so an idle machine reads 2.0-2.1 on
# 2 cores; other work shows as more.
LOAD_MARGIN = 0.5


def overloaded(load: dict[str, Any] | None) -> bool:
    """Whether other work competed for the cores: the load average above the CPU count by more
    than ``LOAD_MARGIN``."""
    return bool(load) and load.get("load_1m") is not None and bool(load.get("cpus")) and (
        load["load_1m"] > load["cpus"] + LOAD_MARGIN
    )


def host_load(load: Mapping[str, dict[str, Any]] | None, device: str) -> dict[str, Any] | None:
    """The busiest of the loads read around a timing (``{"before": ..., "after": ...}``) if it
    makes a CPU timing suspect, else None: a GPU's timing does not depend on the host's load."""
    if not load or not str(device).startswith("cpu"):
        return None
    busiest = max(load.values(), key=lambda m: m.get("load_1m") or 0.0)
    return busiest if overloaded(busiest) else None


def summarise_rounds(
    baseline_s: Sequence[float],
    variant_s: Sequence[float],
    batch_size: int,
    load: dict[str, Any] | None = None,
    is_baseline: bool = False,
) -> dict[str, Any]:
    """One variant's row from the seconds per batch of each timed round (``baseline_s[i]`` and
    ``variant_s[i]`` timed in the same round).

    Returns ``img_s``, ``ms_per_batch`` (median round) with ``ms_q1`` / ``ms_q3``, ``times_ms``
    (every round), ``speedup`` (median of per-round ratios, 1.0 for the baseline itself) with
    ``speedup_q1`` / ``speedup_q3``, ``noisy`` and ``noise`` (why, empty when not noisy).
    """
    if len(baseline_s) != len(variant_s):
        raise ValueError(
            f"{len(baseline_s)} baseline rounds against {len(variant_s)} of the variant: rounds "
            "must be paired (timed alternately, one of each per round)"
        )
    q1_s, median_s, q3_s = quartiles(variant_s)
    per_round = [b / v for b, v in zip(baseline_s, variant_s)]
    speedup_q1, speedup, speedup_q3 = (1.0, 1.0, 1.0) if is_baseline else quartiles(per_round)
    noise: list[str] = []
    if not is_baseline:
        gain = abs(speedup - 1.0)
        if speedup_q3 - speedup_q1 > NOISY_SPREAD * gain:
            noise.append(
                f"the speed-up's IQR {speedup_q1:.2f}-{speedup_q3:.2f}x is wider than half its gain"
            )
        for name, rounds in (("unmerged", baseline_s), ("merged", variant_s)):
            low, mid, high = quartiles(rounds)
            if mid > 0 and (high - low) / mid > NOISY_ROUNDS:
                noise.append(f"the {name} rounds vary by {100 * (high - low) / mid:.0f}% (IQR / median)")
        # img/s of each variant's median round against the paired speed-up: apart by more than
        # the same tolerance, the rounds of the two variants do not describe one machine
        medians = statistics.median(baseline_s) / median_s
        slack = NOISY_SPREAD * gain
        if not speedup_q1 - slack <= medians <= speedup_q3 + slack:
            noise.append(
                f"the ratio of median times ({medians:.2f}x) disagrees with the paired speed-up "
                f"{speedup:.2f}x ({speedup_q1:.2f}-{speedup_q3:.2f})"
            )
        if overloaded(load):
            noise.append(f"load average {load['load_1m']:.1f} on {load['cpus']} CPUs")
    return {
        "img_s": batch_size / median_s,
        "ms_per_batch": median_s * 1e3,
        "ms_q1": q1_s * 1e3,
        "ms_q3": q3_s * 1e3,
        "times_ms": [t * 1e3 for t in variant_s],
        "speedup": speedup,
        "speedup_q1": speedup_q1,
        "speedup_q3": speedup_q3,
        "noisy": bool(noise),
        "noise": noise,
    }


def speedup_text(row: dict[str, Any]) -> str:
    """``1.25x (1.22-1.32)``, with ``noisy`` appended where the row is: how a speed-up is
    printed everywhere, never without its interval."""
    text = f"{row['speedup']:.2f}x"
    if row.get("speedup_q1") is not None and row.get("speedup_q3") is not None:
        text += f" ({row['speedup_q1']:.2f}-{row['speedup_q3']:.2f})"
    return text + (" noisy" if row.get("noisy") else "")
