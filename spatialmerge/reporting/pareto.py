"""Speed-up against accuracy: which merge schedules are worth it (the Pareto front)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from spatialmerge.reporting.table import IN_PROCESS_BASELINE, timing_useless

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
_Y_LABELS = {
    "miou": "COCO mIoU (%)",
    "top1": "ImageNet top-1 (%)",
    "fidelity/mask_iou": "mask IoU vs unmerged (%)",
    "fidelity/top1_agreement": "top-1 agreement with unmerged (%)",
    "fidelity/feature_cosine": "feature cosine vs unmerged",
}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the points no other point beats, both coordinates to be maximised.

    A point is dominated when another is at least as good on both axes and better on one; equal
    points do not dominate each other, so ties are all on the front. Points with a missing or
    non-finite coordinate are never on it. Returns indices sorted by x, then y.
    """
    valid = [i for i, (x, y) in enumerate(points) if _finite(x) and _finite(y)]
    front = []
    for i in valid:
        xi, yi = points[i]
        dominated = any(
            points[j][0] >= xi and points[j][1] >= yi and (points[j][0] > xi or points[j][1] > yi)
            for j in valid
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def _interval_bars(ax: Any, rows: Sequence[Mapping[str, Any]], y_key: str, colour: Any) -> None:
    """Each point's speed-up interquartile range as a horizontal error bar; a white centre on
    the points whose timing is noisy."""
    timed = [r for r in rows if _finite(r.get("speedup_q1")) and _finite(r.get("speedup_q3"))]
    if timed:
        ax.errorbar(
            [r["speedup"] for r in timed], [r[y_key] for r in timed],
            xerr=[[r["speedup"] - r["speedup_q1"] for r in timed], [r["speedup_q3"] - r["speedup"] for r in timed]],
            fmt="none", ecolor=colour, elinewidth=1.0, capsize=2, zorder=2,
        )
    noisy = [r for r in rows if r.get("noisy")]
    if noisy:
        ax.scatter([r["speedup"] for r in noisy], [r[y_key] for r in noisy], color="white", s=12, zorder=3.5)


def _title(rows: Sequence[Mapping[str, Any]]) -> str:
    first = rows[0]
    parts = [str(first["model"]), str(first.get("device") or "unknown device")]
    setup = first.get("setup")
    if setup:
        parts.append(f"{setup['dtype']}, batch {setup['batch_size']}")
    text = " · ".join(parts)
    if any(r.get("random_weights") for r in rows):
        text += " · random weights"
    return text


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Draw measured speed-up (x) against accuracy (y) for ``build_rows`` rows, one panel per
    group, one colour and marker per method, the Pareto front as a line through its points and
    the unmerged reference as a star. Groups without an accuracy metric plot tokens kept (%)
    instead and say so. Returns ``path``, or None when no row has a speed-up to plot.
    """
    import matplotlib
    from matplotlib.figure import Figure

    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    groups = {k: v for k, v in groups.items() if any(_finite(r["speedup"]) for r in v)}
    if not groups:
        return None
    methods = sorted({r["method"] for v in groups.values() for r in v if not r.get("reference")})
    colours = matplotlib.colormaps["tab10"]
    style = {m: (colours(i % 10), MARKERS[i % len(MARKERS)]) for i, m in enumerate(methods)}
    fig = Figure(figsize=(6.4 * len(groups), 4.8))
    axes = fig.subplots(1, len(groups), squeeze=False)
    for ax, group_rows in zip(axes[0], groups.values()):
        _plot_group(ax, group_rows, style)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _plot_group(ax: Any, rows: Sequence[Mapping[str, Any]], style: Mapping[str, tuple[Any, str]]) -> None:
    with_accuracy = any(_finite(r["value"]) for r in rows)
    y_key = "value" if with_accuracy else "kept_pct"
    # every timing noisy: the measured x would order the schedules by the machine's load
    x_key = "flop_speedup" if timing_useless(rows) else "speedup"
    metric = next((r["metric"] for r in rows if r["metric"]), None)
    ok = [r for r in rows if r["status"] == "ok" and _finite(r[x_key]) and _finite(r[y_key])]
    for method, (colour, marker) in style.items():
        mine = [r for r in ok if r["method"] == method and not r.get("reference")]
        if not mine:
            continue
        ax.scatter([r[x_key] for r in mine], [r[y_key] for r in mine], color=colour,
                   marker=marker, s=42, label=method, zorder=3)
        if x_key == "speedup":
            _interval_bars(ax, mine, y_key, colour)
    reference = [r for r in ok if r.get("reference")]
    if reference:
        label = "unmerged" + (" (in-process timing)" if reference[0]["method"] == IN_PROCESS_BASELINE else "")
        ax.scatter([r[x_key] for r in reference], [r[y_key] for r in reference], marker="*",
                   s=220, color="black", label=label, zorder=4)
    points = [(r[x_key], r[y_key]) for r in ok]
    front = [ok[i] for i in pareto_front(points)]
    if front:
        ax.plot([r[x_key] for r in front], [r[y_key] for r in front], color="0.3", lw=1.2,
                ls="--", zorder=2, label="Pareto front")
        for r in front:
            if not r.get("reference"):
                ax.annotate(r["schedule"], (r[x_key], r[y_key]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color="0.25")
    ax.axvline(1.0, color="0.75", lw=0.8, zorder=1)
    not_shown = len(rows) - len(ok)
    if not_shown:
        ax.text(0.99, 0.01, f"{not_shown} row(s) without numbers (failed) not shown",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="firebrick")
    if x_key == "speedup":
        ax.set_xlabel("measured speed-up vs unmerged (×; bars: IQR over rounds, hollow: noisy)")
    else:
        ax.set_xlabel("FLOP-ideal speed-up (×): every measured speed-up here was noisy")
    if with_accuracy:
        ax.set_ylabel(_Y_LABELS.get(metric, metric or "accuracy"))
        ax.set_title(_title(rows), fontsize=10)
    else:
        ax.set_ylabel("tokens kept (%)")
        ax.set_title(f"{_title(rows)}\nno accuracy metric: speed-up vs tokens kept", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
