"""report.py on hand-made results.json files: rows, deltas, CSV, plot, failed jobs."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from spatialmerge.reporting import build_rows, collect_results, markdown_table, pareto_front, plot_pareto
from spatialmerge.reporting.publish import sweep_group, wandb_config
from spatialmerge.adapters.schedule import schedule_text
from spatialmerge.reporting.table import COLUMN_KEYS, IN_PROCESS_BASELINE

SAM_CONFIG = {
    "model": {"_target_": "spatialmerge.models.build_model", "name": "sam_b", "checkpoint": "/w/sam.pth"},
    "evaluator": {"miou": {"prompt": "box"}, "throughput": {"batch_size": 1, "iters": 3}},
    "dataset": {"root": "/data/coco"},
    "device": "cuda",
    "logger": {"_target_": "spatialmerge.loggers.JsonlLogger"},
}
SETUP = {"device": "cuda", "dtype": "fp32", "batch_size": 1, "warmup": 1, "iters": 3, "compile": False}


def speed(img_s, gflops, tokens, speedup, flop_speedup):
    return dict(img_s=img_s, ms_per_batch=1e3 / img_s, gflops=gflops, tokens=tokens, speedup=speedup,
                flop_speedup=flop_speedup, peak_memory_mb=None)


def result(method, miou=None, merged=None, config=SAM_CONFIG, status="ok", error=None, **schedule):
    merge_cfg = {"method": method, "loc": None, "ratio": 0.125, "r_h": None, "r_w": None, "stages": None, "r": None}
    merge_cfg.update(schedule)
    metrics = {}
    if status == "ok":
        throughput = {"baseline": speed(10.0, 400.0, 4096, 1.0, 1.0), "setup": SETUP}
        if merged is not None:
            throughput[method] = merged
        metrics["throughput"] = throughput
        if miou is not None:
            metrics["miou"] = {"miou": miou, "miou_per_image": miou, "instances": 10, "images": 2}
    resolved = None if method == "none" or status != "ok" else {"method": method, "loc": merge_cfg["loc"], "ratio": merge_cfg["ratio"]}
    return {
        "status": status, "error": error, "model": config["model"]["name"], "merge": resolved,
        "metrics": metrics, "notes": [], "config": {**config, "merge": merge_cfg},
        "environment": {"device": config["device"], "gpu": "NVIDIA H100", "threads": 16},
    }


def write(root: Path, name: str, payload: dict) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(payload))


LONG_ERROR = "ValueError: ratio=0.6 is out of range: " + "x" * 300


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    write(root, "0", result("none", miou=70.0))
    write(root, "1", result("cubist", miou=68.5, merged=speed(12.5, 320.0, 3136, 1.25, 1.25), loc=3))
    write(root, "2", result("tome", miou=66.0, merged=speed(13.0, 318.0, 3136, 1.3, 1.26), loc=3))
    write(root, "10", result("expedite", status="failed", error=LONG_ERROR, loc=3, ratio=0.6))
    killed = root / "3" / ".hydra"
    killed.mkdir(parents=True)
    (killed / "config.yaml").write_text(json.dumps({**SAM_CONFIG, "merge": {"method": "cubist", "loc": 6, "ratio": 0.25}}))
    return root


def by_method(rows):
    return {row["method"]: row for row in rows}


def test_rows_carry_speedups_deltas_and_every_failure(sweep):
    results = collect_results(sweep)
    assert [r["_run"] for r in results] == ["0", "1", "2", "3", "10"]  # natural order
    rows = build_rows(results)
    assert len(rows) == 5, "a merge=none job exists: no in-process reference row is added"
    assert [r["method"] for r in rows] == ["none", "cubist", "cubist", "tome", "expedite"]
    cubist = next(r for r in rows if r["method"] == "cubist" and r["status"] == "ok")
    assert cubist["speedup"] == 1.25 and cubist["flop_speedup"] == 1.25
    assert cubist["delta"] == pytest.approx(-1.5)
    assert cubist["tokens"] == 3136 and cubist["kept_pct"] == pytest.approx(76.5625)
    assert cubist["out_grid"] == "56x56" and cubist["schedule"] == "loc=3 ratio=0.125"
    assert cubist["metric"] == "miou" and cubist["device"] == "NVIDIA H100"
    tome = by_method(rows)["tome"]
    assert tome["delta"] == pytest.approx(-4.0) and tome["speedup"] == 1.3
    none = by_method(rows)["none"]
    assert none["delta"] == 0.0 and none["speedup"] == 1.0 and none["out_grid"] == "64x64"
    failed = by_method(rows)["expedite"]
    assert failed["status"] == "failed" and failed["error"] == LONG_ERROR
    assert failed["schedule"] == "loc=3 ratio=0.6" and failed["speedup"] is None
    killed = next(r for r in rows if r["run"] == "3")
    assert killed["status"] == "no results" and killed["schedule"] == "loc=6 ratio=0.25"
    assert killed["group"] == cubist["group"], "a killed job is compared with its siblings"


def test_markdown_truncates_errors_and_formats_numbers(sweep):
    table = markdown_table(build_rows(collect_results(sweep)))
    lines = table.splitlines()
    assert len(lines) == 2 + 5
    cubist = next(line for line in lines if "| cubist | loc=3" in line)
    assert "| 1.25x |" in cubist and "| -1.50 |" in cubist and "| 76.6% |" in cubist
    failed = next(line for line in lines if "| failed |" in line)
    assert "ValueError: ratio=0.6 is out of range" in failed and "…" in failed and "x" * 200 not in failed


def test_cli_writes_markdown_csv_and_plot(sweep, tmp_path, capsys, report_cli):
    out = tmp_path / "report"
    assert report_cli([str(sweep), "--out", str(out), "--wandb", "off"]) == 0
    with (out / "report.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMN_KEYS
        rows = list(reader)
    assert len(rows) == 5
    tome = next(r for r in rows if r["method"] == "tome")
    assert float(tome["speedup"]) == 1.3 and float(tome["delta"]) == pytest.approx(-4.0)
    assert next(r for r in rows if r["status"] == "failed")["error"] == LONG_ERROR
    md = (out / "report.md").read_text()
    assert "![Pareto plot](pareto.png)" in md and "NVIDIA H100" in md
    with Image.open(out / "pareto.png") as png:
        assert png.size[0] > 300 and png.size[1] > 200
        assert len(np.unique(np.asarray(png.convert("L")))) > 10, "the plot is not blank"
    assert "report.md" in capsys.readouterr().out


def test_without_merge_none_the_in_process_baseline_is_the_reference(tmp_path):
    config = {**SAM_CONFIG, "evaluator": {"throughput": {"iters": 3}}, "device": "cpu"}
    for i, img_s in enumerate((9.0, 10.0, 14.0)):
        payload = result("cubist", merged=speed(12.0, 300.0, 2304, 1.2 + i / 10, 1.3), config=config, ratio=0.25)
        payload["metrics"]["throughput"]["baseline"]["img_s"] = img_s
        payload["environment"] = {"device": "cpu", "threads": 2}
        write(tmp_path, str(i), payload)
    rows = build_rows(collect_results(tmp_path))
    assert len(rows) == 4
    reference = rows[0]
    assert reference["method"] == IN_PROCESS_BASELINE and reference["img_s"] == 10.0  # median
    assert reference["speedup"] == 1.0 and reference["tokens"] == 4096
    assert all(r["delta"] is None and r["value"] is None for r in rows)
    assert rows[1]["device"] == "cpu (2 threads)" and rows[1]["out_grid"] == "48x48"
    assert plot_pareto(rows, tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("points", "front"),
    [
        # (1.25, 68.5) dominates (1.2, 67); (1.3, 66) is faster, so it stays.
        ([(1.0, 70.0), (1.25, 68.5), (1.3, 66.0), (1.2, 67.0)], [0, 1, 2]),
        # Equal points do not dominate each other; same speed with less accuracy is dominated.
        ([(1.5, 60.0), (1.5, 60.0), (1.5, 59.0), (1.0, 60.0)], [0, 1]),
        # Missing or non-finite coordinates are never on the front.
        ([(None, 99.0), (2.0, float("nan")), (1.1, 50.0), (1.0, 50.0)], [2]),
        ([], []),
    ],
)
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def test_schedule_text_follows_the_pipelines_precedence():
    assert schedule_text({"method": "tome", "r": 8, "loc": 3}) == "r=8/layer"
    assert schedule_text({"method": "cubist", "stages": [[2, 4, 4], [6, 4, 4]]}) == "stages=[[2,4,4],[6,4,4]]"
    assert schedule_text({"method": "cubist", "loc": 1, "r_h": 2, "r_w": 2, "ratio": 0.1}) == "loc=1 r=2x2"
    assert schedule_text({"method": "cubist", "loc": None, "ratio": 0.1, "align": "window"}) == "loc=auto ratio=0.1 window"
    assert schedule_text({"method": "none", "loc": 3}) == "-"


def test_wandb_is_detected_from_the_jobs_logger(sweep):
    results = collect_results(sweep)
    assert wandb_config(results) is None
    results[1]["config"]["logger"] = {"_target_": "spatialmerge.loggers.WandbLogger", "project": "p", "group": None}
    assert wandb_config(results)["project"] == "p"
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  mode: MULTIRUN\n  runtime:\n    choices: {}\n  job:\n    name: eval\n  sweeper:\n"
        "    params: null\n  overrides:\n    task:\n    - merge=cubist,tome\n    - model=sam_b\n"
    )
    assert sweep_group(results, [sweep]) == f"eval: merge ({sweep.name})", "the name the jobs logged under"
    results[1]["config"]["logger"]["group"] = "mine"
    assert sweep_group(results, [sweep]) == "mine"


class RecordingLogger:
    """Stands in for WandbLogger: remembers what the report logged."""

    calls: list = []

    def __init__(self, **options):
        self.calls.append(("init", options))

    def start(self, run_dir, config, name, group):
        self.calls.append(("start", name, group))

    def log_table(self, name, columns, rows):
        self.calls.append(("table", name, columns, len(rows)))

    def log_image(self, name, path):
        self.calls.append(("image", name, Path(path).name))

    def finish(self, status):
        self.calls.append(("finish", status))


def test_a_wandb_sweep_gets_a_report_run_in_its_group(sweep, tmp_path, monkeypatch, report_cli):
    monkeypatch.setattr("spatialmerge.reporting.publish.WandbLogger", RecordingLogger)
    RecordingLogger.calls = []
    payload = json.loads((sweep / "1" / "results.json").read_text())
    payload["config"]["logger"] = {"_target_": "spatialmerge.loggers.WandbLogger", "project": "p", "mode": "offline", "group": None}
    (sweep / "1" / "results.json").write_text(json.dumps(payload))
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  runtime:\n    choices: {sweep: sam_schedules}\n  job:\n    name: eval\n  sweeper:\n"
        "    params: {merge: 'cubist,tome'}\n  overrides:\n    task: []\n"
    )
    assert report_cli([str(sweep), "--out", str(tmp_path / "r")]) == 0  # --wandb auto
    assert RecordingLogger.calls == [
        ("init", {"project": "p", "mode": "offline", "group": None}),
        ("start", "report", "sam_schedules: merge (sweep)"),
        ("table", "report", list(COLUMN_KEYS), 5),
        ("image", "pareto", "pareto.png"),
        ("finish", "ok"),
    ]
    RecordingLogger.calls = []
    assert report_cli([str(sweep), "--out", str(tmp_path / "r"), "--wandb", "off"]) == 0
    assert RecordingLogger.calls == []


def test_wandb_report_runs_against_the_real_client(sweep, tmp_path, monkeypatch, report_cli):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert report_cli([str(sweep), "--out", str(tmp_path / "r"), "--wandb", "on"]) == 0


def test_an_empty_directory_is_an_error(tmp_path, capsys, report_cli):
    assert report_cli([str(tmp_path)]) == 1
    assert "no results.json" in capsys.readouterr().err


def test_method_labels_say_which_variant_ran():
    from spatialmerge.adapters.schedule import method_label

    assert method_label(None) == "none"
    assert method_label({"method": "cubist", "loc": 3, "ratio": 0.1}) == "cubist"
    assert method_label({"method": "tome", "loc": 3, "ratio": 0.1}) == "tome"
    assert method_label({"method": "tome", "r": 16}) == "tome (per layer)"
    assert method_label({"method": "expedite", "temperature": 0.01, "windowed": False}) == "expedite (t=0.01)"
    assert method_label({"method": "expedite", "temperature": "auto"}) == "expedite (t=auto)"
    assert method_label({"method": "expedite", "temperature": 0.1, "windowed": True}) == "expedite (t=0.1, per window)"


def test_two_expedites_in_one_sweep_stay_two_rows_with_their_own_speed(tmp_path):
    root = tmp_path / "sweep"
    for name, temperature in (("0", 0.01), ("1", "auto")):
        payload = result("expedite", miou=60.0, merged=speed(12.0, 350.0, 3136, 1.2, 1.1), loc=3)
        payload["merge"] = {"method": "expedite", "loc": 3, "ratio": 0.125, "temperature": temperature}
        write(root, name, payload)
    rows = [r for r in build_rows(collect_results(root)) if r["method"].startswith("expedite")]
    assert sorted(r["method"] for r in rows) == ["expedite (t=0.01)", "expedite (t=auto)"]
    assert all(r["speedup"] == 1.2 and r["tokens"] == 3136 for r in rows)


def test_logger_summaries_use_method_independent_keys_and_short_names():
    from omegaconf import OmegaConf

    from spatialmerge.jobs import run_name, summary_metrics

    metrics = {"throughput": {"baseline": {"speedup": 1.0, "times_ms": [1.0]}, "tome": {"speedup": 1.3, "times_ms": [2.0]},
                              "setup": {"iters": 3}}, "fidelity": {"feature_cosine": 0.9}}
    summary = summary_metrics(metrics)
    assert summary["throughput"] == {"unmerged": {"speedup": 1.0}, "merged": {"speedup": 1.3}}
    assert summary["fidelity"] == {"feature_cosine": 0.9}
    cfg = OmegaConf.create({"task_name": "eval", "model": {"name": "sam_b"},
                            "merge": {"method": "tome", "loc": 3, "ratio": 0.125, "r": None}})
    assert run_name(cfg) == "sam_b tome loc=3 ratio=0.125"


def test_an_in_run_baseline_gives_the_delta_without_a_merge_none_job(tmp_path):
    root = tmp_path / "sweep"
    payload = result("cubist", miou=60.0, merged=speed(12.0, 350.0, 3136, 1.2, 1.1), loc=3)
    payload["metrics"]["miou"].update(unmerged_miou=61.5, delta_miou=-1.5)
    write(root, "0", payload)
    (row,) = [r for r in build_rows(collect_results(root)) if r["method"] == "cubist"]
    assert row["value"] == 60.0 and row["delta"] == -1.5


def test_a_results_file_holding_a_list_is_an_unreadable_row(tmp_path):
    root = tmp_path / "sweep"
    (root / "0").mkdir(parents=True)
    (root / "0" / "results.json").write_text("[1, 2]")
    write(root, "1", result("cubist", miou=60.0, merged=speed(12.0, 350.0, 3136, 1.2, 1.1), loc=3))
    rows = build_rows(collect_results(root))
    (bad,) = [r for r in rows if r["status"] == "failed"]
    assert "holds a JSON list, not a run record" in bad["error"]
    assert any(r["status"] == "ok" for r in rows)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda m: m["miou"].update(miou="60.0"), "'metrics.miou.miou' is a str"),
        (lambda m: m.update(throughput="fast"), "'metrics.throughput' is a str"),
        (lambda m: m["throughput"]["cubist"].update(speedup="fast"), "'metrics.throughput.cubist.speedup' is a str"),
        (lambda m: m["throughput"].update(cubist=[1.2]), "'metrics.throughput.cubist' is a list"),
        (lambda m: m.update(miou=[60.0]), "'metrics.miou' is a list"),
    ],
)
def test_a_metric_of_the_wrong_type_is_a_failed_row_naming_it(tmp_path, damage, named):
    # a quality written as text used to be an ok row with a blank cell; a timing row as text, a crash
    root = tmp_path / "sweep"
    payload = result("cubist", miou=60.0, merged=speed(12.0, 350.0, 3136, 1.2, 1.1), loc=3)
    damage(payload["metrics"])
    write(root, "0", payload)
    write(root, "1", result("cubist", miou=61.0, merged=speed(12.0, 350.0, 3136, 1.2, 1.1), loc=3))
    rows = build_rows(collect_results(root))
    (bad,) = [r for r in rows if r["status"] == "failed"]
    assert named in bad["error"] and str(root / "0" / "results.json") in bad["error"]
    assert sum(r["status"] == "ok" for r in rows) >= 1


def test_the_texts_a_run_writes_among_its_metrics_are_not_problems(tmp_path):
    root = tmp_path / "run"
    payload = result("cubist", miou=60.0, merged=speed(12.0, 350.0, 3136, 1.2, 1.1), loc=3)
    payload["metrics"].update(fidelity={"kind": "features", "feature_cosine": 0.99},
                              train={"checkpoint": "/x/step_00000004.pt", "loss": 1.0, "skipped_files": []})
    write(root, "0", payload)
    (row,) = [r for r in build_rows(collect_results(root)) if r["method"] == "cubist"]
    assert row["status"] == "ok"


def _pivot_row(method, schedule, speedup, value):
    return {"status": "ok", "group": "g", "method": method, "schedule": schedule, "speedup": speedup, "value": value,
            "run": schedule}


def test_the_pivot_puts_grid_schedules_in_columns_and_lists_the_others_below():
    from spatialmerge.reporting.table import pivot_markdown

    rows = [
        _pivot_row("cubist", "loc=2 ratio=0.1", 1.2, 0.99), _pivot_row("tome", "loc=2 ratio=0.1", 1.19, 0.98),
        _pivot_row("cubist", "loc=4 ratio=0.2", 1.4, 0.97),
        _pivot_row("cubist", "stages=[[0,0.2],[3,0.3]]", 2.5, 0.9),
    ]
    text = pivot_markdown(rows).splitlines()
    assert text[0] == "| method | loc=2 ratio=0.1 | loc=4 ratio=0.2 |"
    assert text[2] == "| cubist | 0.990 / 1.20x | 0.970 / 1.40x |"
    assert text[3] == "| tome | 0.980 / 1.19x | - |"
    # a schedule with no loc column is listed, not put under another schedule's column
    assert text[-2:] == ["Other schedules:", "- cubist stages=[[0,0.2],[3,0.3]]: 0.900 / 2.50x"]


def test_a_search_with_many_schedules_gets_no_pivot():
    from spatialmerge.reporting.table import PIVOT_MAX_COLUMNS, pivot_markdown

    rows = [_pivot_row(m, f"loc={i} ratio=0.1", 1.1, 0.9) for i in range(PIVOT_MAX_COLUMNS + 1) for m in ("cubist", "tome")]
    assert pivot_markdown(rows) == ""
    assert pivot_markdown(rows[: 2 * PIVOT_MAX_COLUMNS]) != ""


def test_a_sweeps_logger_group_names_its_sweep_config_and_swept_keys():
    from spatialmerge.loggers import sweep_group as name_group

    hydra_cfg = OmegaConf.create({
        "runtime": {"choices": {"sweep": "sam_schedules", "model": "sam_b"}},
        "job": {"name": "eval"},
        "sweeper": {"params": {"merge": "cubist,tome", "merge.loc": "1,3"}},
    })
    argv = ["-m", "+sweep=sam_schedules", "merge.ratio=0.1,0.2", "model=sam_b"]
    sweep_dir = Path("logs/eval/multiruns/2026-12-03_16-45-29")
    expected = "sam_schedules: merge.ratio, merge, merge.loc (2026-12-03_16-45-29)"
    assert name_group(hydra_cfg, argv, sweep_dir) == expected
    hydra_cfg.runtime.choices.sweep = None
    hydra_cfg.sweeper.params = None
    assert name_group(hydra_cfg, ["-m", "merge=cubist,tome"], sweep_dir) == "eval: merge (2026-12-03_16-45-29)"


def test_the_terminal_summary_shows_percentages_points_and_small_values_as_they_are():
    from spatialmerge.evaluators.fidelity import PERCENT
    from spatialmerge.evaluators.metrics import is_percent
    from spatialmerge.reporting.summary import format_summary, metric_text

    payload = {"model": "dinov2_s", "merge": None, "metrics": {
        "fidelity": {"feature_cosine": 0.987654, "segment_agreement": 93.4, "images": 12},
        "miou": {"miou": 70.123, "unmerged_miou": 70.823, "delta_miou": -0.7},
        "train": {"lr": 3.9e-08, "peak_lr": 0.0005, "loss": 0.0},
    }}
    text = format_summary(payload)
    assert "fidelity: feature_cosine=0.988, segment_agreement=93.40%, images=12" in text
    assert "miou: miou=70.12%, unmerged_miou=70.82%, delta_miou=-0.70 pt" in text
    assert "train: lr=3.9e-08, peak_lr=0.0005, loss=0.000" in text
    assert metric_text("top5", 99.0) == "99.00%" and metric_text("delta_top1", 0.25) == "+0.25 pt"
    assert metric_text("kl", 0.0123) == "0.012" and metric_text("top1_agreement", 100.0) == "100.00%"
    assert all(is_percent(name) for name in PERCENT), "every percentage fidelity reports is shown as one"


def test_wrong_typed_records_and_corrupt_saved_configs_are_failed_rows_naming_the_file(tmp_path, report_cli, capsys):
    root = tmp_path / "sweep"
    write(root, "0", {**result("cubist", miou=60.0, merged=speed(12.0, 350.0, 3136, 1.2, 1.1), loc=3), "metrics": [1]})
    killed = root / "1" / ".hydra"
    killed.mkdir(parents=True)
    (killed / "config.yaml").write_text("model: [sam_b\nmerge: {")  # truncated while written
    write(root, "2", result("tome", miou=59.0, merged=speed(12.0, 350.0, 3136, 1.2, 1.1), loc=3))
    rows = build_rows(collect_results(root))
    errors = sorted(r["error"] for r in rows if r["status"] == "failed")
    assert len(errors) == 2 and any(r["status"] == "ok" for r in rows)
    assert f"unreadable {root / '0' / 'results.json'}: 'metrics' is a list" in errors[0]
    assert f"unreadable {killed / 'config.yaml'}: " in errors[1] and "\n" not in errors[1]
    assert report_cli([str(root), "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    (tmp_path / "taken.md").write_text("mine")
    assert report_cli([str(root), "--out", str(tmp_path / "taken.md")]) == 1
    assert "is a file; the report is a directory" in capsys.readouterr().err
    assert (tmp_path / "taken.md").read_text() == "mine"
    # the report of the same runs is brought up to date; another's is never replaced
    other = tmp_path / "other"
    write(other, "0", result("pool", miou=50.0, merged=speed(12.0, 350.0, 3136, 1.2, 1.1), loc=3))
    report = (tmp_path / "r" / "report.md").read_text()
    assert report_cli([str(other), "--out", str(tmp_path / "r")]) == 1
    assert f"{tmp_path / 'r'} holds the report of {root}; a report never replaces another's" in capsys.readouterr().err
    assert (tmp_path / "r" / "report.md").read_text() == report
    assert report_cli([str(root), "--out", str(tmp_path / "r")]) == 0
