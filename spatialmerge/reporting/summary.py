"""A run's results.json as a readable text table for the terminal."""

from __future__ import annotations

from typing import Any, Mapping

from spatialmerge.adapters.schedule import label
from spatialmerge.evaluators.metrics import is_percent


def metric_text(key: str, value: Any) -> str:
    """One metric as the terminal shows it: percentages with %, their differences in points
    (``delta_miou=-0.70 pt``), small values with their significant digits (a learning rate of
    3.9e-08 is not 0.000)."""
    if not isinstance(value, float):
        return str(value)
    if is_percent(key):
        return f"{value:+.2f} pt" if key.startswith("delta_") else f"{value:.2f}%"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.3f}"


def format_summary(payload: Mapping[str, Any]) -> str:
    """A readable text table of a run's results, for the terminal."""
    lines = [f"model: {payload['model']}   merge: {label(payload['merge'])}"]
    schedule = payload.get("schedule") or {}
    for stage in schedule.get("stages", []):
        lines.append(
            f"  ran: before block {stage['loc']} {stage['grid_in'][0]}x{stage['grid_in'][1]} -> "
            f"{stage['grid_out'][0]}x{stage['grid_out'][1]} (r_h={stage['r_h']}, r_w={stage['r_w']})"
        )
    metrics = payload["metrics"]
    speed = metrics.get("throughput")
    if speed:
        setup = speed["setup"]
        lines.append(
            f"throughput ({setup['device']}, {setup['dtype']}, batch {setup['batch_size']}, "
            f"{setup['iters']} rounds{', torch.compile' if setup.get('compile') else ''}; img/s: median round, speed-up: median of per-round ratios):"
        )
        header = (
            f"  {'variant':<10} {'tokens':>7} {'GFLOPs':>9} {'img/s':>9} {'speed-up':>9} "
            f"{'(IQR over rounds)':>18} {'FLOP-ideal':>11}"
            + (f" {'graph breaks':>13}" if setup.get("compile") else "")
        )
        lines.append(header)
        noisy = []
        for name, row in speed.items():
            if name in ("setup", "seconds"):
                continue
            tokens = "-" if row["tokens"] is None else str(row["tokens"])
            spread = f"{row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}" if "speedup_q1" in row else "-"
            lines.append(
                f"  {name:<10} {tokens:>7} {row['gflops']:>9.1f} {row['img_s']:>9.3f} "
                f"{row['speedup']:>8.2f}x {spread:>18} {row['flop_speedup']:>10.2f}x"
                + (f" {row['graph_breaks']:>13}" if setup.get("compile") else "")
                + ("  noisy" if row.get("noisy") else "")
            )
            if row.get("noisy"):
                noisy.append(f"{name}: {'; '.join(row.get('noise') or ['spread'])}")
        broken = [name for name, row in speed.items() if name not in ("setup", "seconds") and row.get("graph_breaks")]
        if broken:
            lines.append(
                f"  warning: graph breaks in {', '.join(broken)}: torch.compile runs those forwards in pieces, "
                "with eager Python between them, so their timing is not a whole-graph one"
            )
        for text in noisy:
            lines.append(
                f"  warning: noisy timing, {text}; time on an idle machine or raise "
                "evaluator.throughput.iters (the FLOP-ideal column does not depend on the machine)"
            )
    for name, values in metrics.items():
        if name == "throughput":
            continue
        shown = ", ".join(  # lists (e.g. skipped file names) stay in results.json
            f"{k}={metric_text(k, v)}" for k, v in values.items() if k != "seconds" and not isinstance(v, list)
        )
        lines.append(f"{name}: {shown}")
    lines.extend(f"note: {note}" for note in payload.get("notes", []))
    return "\n".join(lines)
