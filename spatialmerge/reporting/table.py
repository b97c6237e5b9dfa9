"""A sweep's results.json files -> one comparison table (report.md, report.csv).

Every job appears as a row, failed ones included (with their error), and so do jobs that were
killed before writing results.json (a run directory with ``.hydra/config.yaml`` only): a table
that silently loses jobs would make a sweep look better than it was.

Rows of the same model, evaluator settings, dataset and device form a *group*; each group has one
unmerged reference. Accuracy deltas are taken against a ``merge=none`` job of the group; speed-ups
are the throughput evaluator's own, measured against the unmerged model in the same process.
Without a ``merge=none`` job the group gets a reference row built from those in-process
baselines (speed only).
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spatialmerge.adapters.schedule import BASELINE_METHOD, method_label, schedule_text
from spatialmerge.evaluators.timing import host_load, speedup_text, summarise_rounds
from spatialmerge.results import RESULTS_FILE

# (key, markdown header); report.csv uses the keys as its header.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("status", "status"),
    ("model", "model"),
    ("method", "method"),
    ("schedule", "schedule"),
    ("out_grid", "out grid"),
    ("tokens", "tokens"),
    ("kept_pct", "kept"),
    ("gflops", "GFLOPs"),
    ("img_s", "img/s"),
    ("speedup", "speed-up"),
    ("speedup_q1", "q1"),
    ("speedup_q3", "q3"),
    ("noisy", "noisy"),
    ("flop_speedup", "FLOP-ideal"),
    ("metric", "metric"),
    ("value", "value"),
    ("delta", "Δ vs none"),
    ("run", "run"),
    ("error", "error"),
)
COLUMN_KEYS: tuple[str, ...] = tuple(key for key, _ in COLUMNS)

# Which number stands for accuracy, best first: the task metric, else label-free fidelity.
ACCURACY_METRICS: tuple[tuple[str, str], ...] = (
    ("miou", "miou"),
    ("top1", "top1"),
    ("fidelity", "mask_iou"),
    ("fidelity", "top1_agreement"),
    ("fidelity", "feature_cosine"),
)
IN_PROCESS_BASELINE = "baseline (in-process)"
STATUS_NO_RESULTS = "no results"
_METHOD_ORDER = {
    BASELINE_METHOD: 0, IN_PROCESS_BASELINE: 0, "cubist": 1, "tome": 2, "expedite": 3, "pool": 4, "oracle": 5,
}
_MD_ERROR_CHARS = 90


def _natural_key(path: Path) -> list[Any]:
    """Sort key that puts job 10 after job 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def collect_results(dirs: Path | str | Iterable[Path | str]) -> list[dict[str, Any]]:
    """Every results.json below ``dirs``, in natural path order, each with ``_run`` (its run
    directory, relative to the directory it was found under).

    A run directory holding ``.hydra/config.yaml`` but no results.json (a job killed before it
    could record anything) yields ``{"status": "no results", "config": ...}``; an unreadable
    results.json yields a failed entry naming the file.
    """
    roots = [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]
    found: list[dict[str, Any]] = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory; pass a run or sweep directory of eval.py")
        run_dirs = {p.parent for p in root.rglob(RESULTS_FILE)}
        run_dirs |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
        for run_dir in sorted(run_dirs, key=_natural_key):
            label = str(run_dir.relative_to(root)) if run_dir != root else root.name
            found.append({**_read_run(run_dir), "_run": label})
    return found


# The fields of results.json the report reads, and the JSON types a run writes them as.
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "status": (str,), "config": (dict,), "metrics": (dict,), "merge": (dict, type(None)),
    "schedule": (dict, type(None)), "notes": (list,), "error": (str, type(None)),
}


# The numbers of a timing row the report reads; a row holds lists and texts beside them.
TIMING_NUMBERS = (
    "tokens", "gflops", "img_s", "ms_per_batch", "ms_q1", "ms_q3", "speedup", "speedup_q1", "speedup_q3",
    "flop_speedup",
)
# Texts a record's metrics hold beside their numbers: fidelity's output kind, a training run's
# final checkpoint.
METRIC_TEXTS = ("kind", "checkpoint")


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _metrics_problems(metrics: Mapping[str, Any]) -> list[str]:
    """What in a record's metrics is not of the type a run writes, each as ``'metrics.x.y' is a
    str``: a report reading it would show a blank cell as if nothing were measured, or crash."""
    problems = []
    for evaluator, values in metrics.items():
        if not isinstance(values, dict):
            problems.append(f"'metrics.{evaluator}' is a {type(values).__name__}")
            continue
        for key, value in values.items():
            where = f"metrics.{evaluator}.{key}"
            if evaluator == "throughput" and key not in ("setup", "seconds"):  # a timing row
                if not isinstance(value, dict):
                    problems.append(f"'{where}' is a {type(value).__name__}")
                    continue
                problems += [f"'{where}.{k}' is a {type(value[k]).__name__}"
                             for k in TIMING_NUMBERS if not _is_number(value.get(k))]
            elif isinstance(value, str) and key not in METRIC_TEXTS:
                problems.append(f"'{where}' is a str")
    return problems


def _read_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESULTS_FILE
    if path.exists():
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            return {"status": "failed", "error": f"unreadable {path}: {err}", "config": {}}
        if not isinstance(payload, dict):
            return {
                "status": "failed",
                "error": f"unreadable {path}: it holds a JSON {type(payload).__name__}, not a run record",
                "config": {},
            }
        wrong = [f"{key!r} is a {type(payload[key]).__name__}" for key, kinds in RECORD_FIELDS.items()
                 if key in payload and not isinstance(payload[key], kinds)]
        wrong = wrong or _metrics_problems(payload.get("metrics") or {})
        if wrong:
            return {"status": "failed", "error": f"unreadable {path}: {', '.join(wrong)}, not what a run records",
                    "config": payload["config"] if isinstance(payload.get("config"), dict) else {}}
        return payload
    saved = run_dir / ".hydra" / "config.yaml"
    try:
        config = OmegaConf.load(saved)
    except (OSError, OmegaConfBaseException, yaml.YAMLError) as err:
        why = " ".join(str(err).split())  # one line for the report's error column
        return {"status": "failed", "error": f"unreadable {saved}: {type(err).__name__}: {why}", "config": {}}
    if not isinstance(config, DictConfig):
        return {"status": "failed", "error": f"unreadable {saved}: it holds a list, not a config", "config": {}}
    try:
        # Resolved like results.json's config, so the job lands in the same group as its siblings.
        container = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException:  # an interpolation that only the job's environment could resolve
        container = OmegaConf.to_container(config, resolve=False)
    return {
        "status": STATUS_NO_RESULTS,
        "error": "the job wrote no results.json (killed, out of memory or still running?)",
        "config": container,
    }


def accuracy(metrics: Mapping[str, Any]) -> tuple[str, float] | None:
    """(name, value) of the accuracy-like number in a run's metrics, or None (speed only)."""
    for evaluator, key in ACCURACY_METRICS:
        value = metrics.get(evaluator, {}).get(key)
        if isinstance(value, (int, float)):
            return (evaluator if evaluator == key else f"{evaluator}/{key}"), float(value)
    return None


def _out_grid(merge: Mapping[str, Any] | None, tokens: int | None, base_tokens: int | None) -> str:
    """H'xW' of the merged grid, inferred from the token counts (results.json records counts);
    blank where they do not pin it down (non-square input with a ratio, per-layer ToMe)."""
    if tokens is None or base_tokens is None:
        return ""
    side = math.isqrt(base_tokens)
    if side * side != base_tokens:
        return ""
    if merge and merge.get("r_h") is not None and merge.get("r_w") is not None and not merge.get("stages"):
        h, w = side - int(merge["r_h"]), side - int(merge["r_w"])
        if h * w == tokens:
            return f"{h}x{w}"
    out = math.isqrt(tokens)
    return f"{out}x{out}" if out * out == tokens else ""


def _device(result: Mapping[str, Any]) -> str | None:
    """The GPU's name, or the device with its thread count (CPU timings depend on it)."""
    env = result.get("environment") or {}
    if env.get("gpu"):
        return str(env["gpu"])
    device = env.get("device") or (result.get("config") or {}).get("device")
    if device and env.get("threads"):
        return f"{device} ({env['threads']} threads)"
    return device


def _group_key(config: Mapping[str, Any]) -> str:
    """What must match for two jobs to share an unmerged reference."""
    keys = ("model", "evaluator", "dataset", "device")
    return json.dumps({k: config.get(k) for k in keys}, sort_keys=True, default=str)


def _row(result: Mapping[str, Any]) -> dict[str, Any]:
    config = result.get("config") or {}
    merge_cfg = config.get("merge") or {}
    merge = result.get("merge")
    method = (merge or {}).get("method") or merge_cfg.get("method") or BASELINE_METHOD
    row: dict[str, Any] = dict.fromkeys(COLUMN_KEYS)
    row.update(
        status=result.get("status", "failed"),
        model=result.get("model") or (config.get("model") or {}).get("name"),
        method=method_label(merge if merge is not None else merge_cfg),
        schedule=schedule_text(merge if merge is not None else merge_cfg),
        run=result.get("_run", ""),
        error=result.get("error") or "",
        device=_device(result),
        group=_group_key(config),
        random_weights="checkpoint" in (config.get("model") or {}) and config["model"]["checkpoint"] is None,
    )
    metrics = result.get("metrics") or {}
    speed = metrics.get("throughput") or {}
    base = speed.get("baseline")
    mine = base if method == BASELINE_METHOD else speed.get(method)
    if base is not None and mine is not None:
        mine = _summarised(mine, base, speed.get("setup") or {})
        row.update(
            tokens=mine["tokens"],
            kept_pct=_percent(mine["tokens"], base["tokens"]),
            gflops=mine["gflops"],
            img_s=mine["img_s"],
            speedup=mine["speedup"],
            # records from before quartiles were kept have none: the cells stay blank
            speedup_q1=mine.get("speedup_q1"),
            speedup_q3=mine.get("speedup_q3"),
            noisy=mine.get("noisy"),
            noise=mine.get("noise") or [],
            flop_speedup=mine["flop_speedup"],
            out_grid=_out_grid(merge, mine["tokens"], base["tokens"]),
            setup=speed.get("setup"),
            baseline_speed=base,
        )
    found = accuracy(metrics)
    if found is not None:
        row["metric"], row["value"] = found
        evaluator, _, key = found[0].rpartition("/")
        # an accuracy evaluator that ran the unmerged model on the same images in this job
        in_run = metrics.get(evaluator or found[0], {}).get(f"delta_{key}")
        if isinstance(in_run, (int, float)):
            row["delta"] = float(in_run)
    return row


def _summarised(mine: Mapping[str, Any], base: Mapping[str, Any], setup: Mapping[str, Any]) -> Mapping[str, Any]:
    """A record's timing row with its speed-up, interval and noise verdict derived again from
    its recorded rounds by ``timing.summarise_rounds``, so every report judges every run by the
    same rule; a record without rounds keeps what it says."""
    rounds, base_rounds = mine.get("times_ms"), base.get("times_ms")
    if not rounds or not base_rounds or len(rounds) != len(base_rounds):
        return mine
    again = summarise_rounds(
        [t / 1e3 for t in base_rounds], [t / 1e3 for t in rounds], int(setup.get("batch_size") or 1),
        host_load(setup.get("load"), str(setup.get("device", "cpu"))), is_baseline=mine is base,
    )
    return {**mine, **{k: again[k] for k in ("img_s", "speedup", "speedup_q1", "speedup_q3", "noisy", "noise")}}


def _reference(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The group's unmerged reference: its merge=none job (the mean if several), else a row
    from the in-process baselines of its throughput runs, else None."""
    ok = [r for r in rows if r["status"] == "ok"]
    unmerged = [r for r in ok if r["method"] == BASELINE_METHOD]
    if unmerged:
        if len(unmerged) == 1:
            return unmerged[0]
        return {**unmerged[0], "value": _mean(r["value"] for r in unmerged)}
    timed = [r for r in ok if r.get("baseline_speed")]
    if not timed:
        return None
    base = timed[0]["baseline_speed"]
    row = dict.fromkeys(COLUMN_KEYS)
    row.update(
        status="ok",
        model=timed[0]["model"],
        method=IN_PROCESS_BASELINE,
        schedule="-",
        out_grid=_out_grid(None, base["tokens"], base["tokens"]),
        tokens=base["tokens"],
        kept_pct=100.0,
        gflops=base["gflops"],
        # Each job timed the same unmerged model; their median is the fairest single number.
        img_s=statistics.median(r["baseline_speed"]["img_s"] for r in timed),
        speedup=1.0,
        speedup_q1=1.0,
        speedup_q3=1.0,
        noisy=False,
        flop_speedup=1.0,
        run=f"median of {len(timed)} job(s)",
        error="",
        device=timed[0]["device"],
        group=timed[0]["group"],
        setup=timed[0].get("setup"),
        synthetic=True,
    )
    return row


def _percent(part: int | None, whole: int | None) -> float | None:
    return None if part is None or not whole else 100.0 * part / whole


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


def _sort_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", row["schedule"] or "")]
    order = _METHOD_ORDER.get(row["method"], _METHOD_ORDER.get(row["method"].split(" ")[0], 9))
    return (order, row["method"], numbers, row["schedule"], row["run"])


def build_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per result (see ``COLUMNS``) plus, per group without a ``merge=none`` job, the
    in-process reference row; ``delta`` is accuracy minus the unmerged model's: measured in the
    same job where the evaluator ran both (``delta_<metric>``), else the group's ``merge=none``.

    Rows also carry ``group`` (what they are compared within), ``device`` and, when the
    throughput evaluator ran, ``setup``; groups keep their first-seen order, and within a group
    the reference comes first, then methods, then schedules in numeric order.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        row = _row(result)
        groups.setdefault(row["group"], []).append(row)
    table: list[dict[str, Any]] = []
    for rows in groups.values():
        reference = _reference(rows)
        if reference is not None and reference.get("synthetic"):
            rows = [reference, *rows]
        for row in rows:
            # a delta measured against the unmerged model inside the job itself is kept
            in_job = row["delta"] is not None
            if not in_job and reference is not None and row["value"] is not None and reference["value"] is not None:
                if row["metric"] == reference["metric"]:
                    row["delta"] = row["value"] - reference["value"]
            row["reference"] = row is reference or (
                reference is not None and row["method"] == BASELINE_METHOD and row["status"] == "ok"
            )
        table.extend(sorted(rows, key=_sort_key))
    return table


def _markdown_cell(key: str, value: Any) -> str:
    if value is None or value == "":
        return ""
    if key == "error":
        text = " ".join(str(value).split())
        value = text if len(text) <= _MD_ERROR_CHARS else text[: _MD_ERROR_CHARS - 1] + "…"
    elif key in ("speedup", "speedup_q1", "speedup_q3", "flop_speedup"):
        value = f"{value:.2f}x"
    elif key == "noisy":
        value = "noisy" if value else ""
    elif key == "kept_pct":
        value = f"{value:.1f}%"
    elif key == "delta":
        value = f"{value:+.2f}"
    elif key in ("gflops", "value", "img_s"):
        value = f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` as a GitHub markdown table, numbers rounded for reading."""
    lines = [
        "| " + " | ".join(header for _, header in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(key, row.get(key)) for key in COLUMN_KEYS) + " |")
    return "\n".join(lines)


def describe_setup(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line on where the speed numbers come from (device, dtype, batch, iterations)."""
    # the machine's load is a measurement of each run, not part of how it was set up
    setups = {json.dumps({k: v for k, v in r["setup"].items() if k != "load"}, sort_keys=True)
              for r in rows if r.get("setup")}
    devices = sorted({str(r["device"]) for r in rows if r.get("device")})
    parts = [f"device: {', '.join(devices) or 'unknown'}"]
    for setup in map(json.loads, sorted(setups)):
        parts.append(
            f"throughput: {setup['dtype']}, batch {setup['batch_size']}, median of {setup['iters']} "
            f"(warm-up {setup['warmup']}{', compiled' if setup.get('compile') else ''})"
        )
    return "; ".join(parts)


PIVOT_MAX_COLUMNS = 16


def _schedule_order(text: str) -> list[tuple[int, float, str]]:
    """Sort key of a schedule such as ``loc=3 ratio=0.125``: numbers in numeric order, words
    (``loc=auto``) after every number in the same place, so the two never compare directly."""
    return [
        (0, float(part), "") if part.replace(".", "", 1).isdigit() else (1, 0.0, part)
        for part in re.split(r"[= ]", text)
    ]


def pivot_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The sweep at a glance: one line per method, one column per schedule, each cell
    ``accuracy / speed-up`` (``speed-up`` alone without an accuracy); schedules that are not one
    ``loc`` + amount (several stages, per-layer ToMe) are listed below the table. Empty when
    fewer than two methods share it, no row succeeded, or there are more than
    ``PIVOT_MAX_COLUMNS`` schedules (a search rather than a sweep: the full table says it all).

    Only successful rows of the first group take part; a schedule a method did not run is ``-``.
    """
    ok = [r for r in rows if r["status"] == "ok" and not r.get("reference")]
    if not ok:
        return ""
    group = ok[0]["group"]
    ok = [r for r in ok if r["group"] == group]
    methods = list(dict.fromkeys(r["method"] for r in sorted(ok, key=_sort_key)))
    grid = [r for r in ok if r["schedule"].startswith("loc=")]
    schedules = sorted(dict.fromkeys(r["schedule"] for r in grid), key=_schedule_order)
    if len(methods) < 2 or not schedules or len(schedules) > PIVOT_MAX_COLUMNS:
        return ""
    cells: dict[tuple[str, str], str] = {}
    for row in grid:
        value = f"{row['value']:.3f} / " if row.get("value") is not None else ""
        cells[(row["method"], row["schedule"])] = value + _speed_cell(row)
    header = "| method | " + " | ".join(schedules) + " |"
    lines = [header, "|---" * (len(schedules) + 1) + "|"]
    for method in methods:
        if any((method, schedule) in cells for schedule in schedules):
            lines.append(f"| {method} | " + " | ".join(cells.get((method, s), "-") for s in schedules) + " |")
    others = [r for r in ok if not r["schedule"].startswith("loc=")]
    if others:
        lines.append("")
        lines.append("Other schedules:")
    for row in sorted(others, key=_sort_key):
        value = f"{row['value']:.3f} / " if row.get("value") is not None else ""
        lines.append(f"- {row['method']} {row['schedule']}: {value}{_speed_cell(row)}")
    return "\n".join(lines)


def _speed_cell(row: Mapping[str, Any]) -> str:
    """A speed-up with its interval and noisy mark (``timing.speedup_text``), or ``-``."""
    if row.get("speedup") is None:
        return "-"
    return speedup_text(row)


def timing_useless(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every timed merged row is noisy: then the measured speed-ups cannot order the
    schedules and the FLOP-ideal speed-up (hardware-independent) is used instead."""
    timed = [r for r in rows if r["status"] == "ok" and not r.get("reference") and r.get("speedup") is not None]
    return bool(timed) and all(r.get("noisy") for r in timed)


def _sources_text(sources: Sequence[Path | str]) -> str:
    names = [str(source) for source in sources]
    if len(names) <= 3:
        return ", ".join(names)
    return f"{', '.join(names[:2])}, ... ({len(names)} directories, the last {names[-1]})"


_SOURCE_LINE = "Source: "


def check_report_dir(out_dir: Path, sources: Sequence[Path | str]) -> None:
    """Refuse to write the report of ``sources`` into ``out_dir`` when it holds the report of
    other sources: a report is replaced only by one of the same runs (rerun as they finish)."""
    existing = Path(out_dir) / "report.md"
    if not existing.is_file():
        return
    line = next((l for l in existing.read_text(errors="replace").splitlines() if l.startswith(_SOURCE_LINE)), None)
    previous = None if line is None else line[len(_SOURCE_LINE):].strip()
    if previous != _sources_text(sources):
        raise FileExistsError(
            f"{out_dir} holds the report of {previous or 'other runs'}; a report never replaces another's: "
            f"choose another --out, or remove {existing} to replace it"
        )


def write_report(
    rows: Sequence[Mapping[str, Any]], out_dir: Path, sources: Sequence[Path | str], plot: str | None = None
) -> tuple[Path, Path]:
    """Write ``report.md`` (the table, how to read it, the plot) and ``report.csv`` (full-precision
    numbers, full error text) into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = [r for r in rows if r["status"] != "ok"]
    lines = [
        "# Sweep report",
        "",
        f"{_SOURCE_LINE}{_sources_text(sources)}  ",
        f"{len(rows)} rows, {len(failed)} not ok. {describe_setup(rows)}.",
        "",
        "speed-up is the median of per-round ratios against the unmerged model timed "
        "alternately in the same process, q1-q3 its interquartile range over rounds, noisy where "
        "the recorded rounds disagree (each run's rounds judged again by one rule, "
        "`spatialmerge.evaluators.timing`); img/s is the median "
        "round; FLOP-ideal is the flop counter's ratio, which no machine's load changes; "
        "Δ vs none is the accuracy difference to the unmerged model: measured in the same job "
        "where the evaluator ran both, else to the group's `merge=none` job (blank without either). "
        f"`{IN_PROCESS_BASELINE}` rows stand for the unmerged model where the sweep had no "
        "`merge=none` job.",
        "",
        markdown_table(rows),
        "",
    ]
    pivot = pivot_markdown(rows)
    if pivot:
        metric = next((r["metric"] for r in rows if r.get("metric")), None)
        lines[6:6] = [
            "",
            "At a glance: " + (f"{metric} / speed-up" if metric else "speed-up") + " per method and schedule.",
            "",
            pivot,
            "",
        ]
    groups = {r["group"] for r in rows}
    useless = [g for g in groups if timing_useless([r for r in rows if r["group"] == g])]
    if useless:
        lines[6:6] = [
            "",
            f"**Every measured speed-up of {len(useless)} of {len(groups)} group(s) is noisy**: "
            "those timings cannot order the schedules, so their Pareto plot uses the FLOP-ideal "
            "speed-up instead. Time again on an idle machine with more rounds "
            "(evaluator.throughput.iters).",
        ]
    if plot:
        lines += [f"![Pareto plot]({plot})", ""]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(lines))
    csv_path = out_dir / "report.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMN_KEYS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMN_KEYS})
    return md_path, csv_path
