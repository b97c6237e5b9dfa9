"""Every speed-up a report shows comes with its interval and noisy mark: report.md, report.csv,
the pivot and the Pareto plot's error bars; a group whose every timing is noisy is ordered by
the FLOP-ideal speed-up instead, and says so."""

from __future__ import annotations

import csv

from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from test_report import result, speed, write

from spatialmerge.reporting import build_rows, collect_results, plot_pareto
from spatialmerge.reporting.pareto import _plot_group
from spatialmerge.reporting.table import pivot_markdown, timing_useless, write_report


def timed(img_s, speedup, q1, q3, noisy, flop_speedup=1.2):
    row = speed(img_s, 300.0, 3136, speedup, flop_speedup)
    row.update(speedup_q1=q1, speedup_q3=q3, noisy=noisy, noise=["a reason"] if noisy else [])
    return row


def sweep(tmp_path, noisy_cubist=True, noisy_tome=False):
    root = tmp_path / "sweep"
    write(root, "0", result("cubist", miou=68.5, merged=timed(12.5, 1.25, 1.10, 1.40, noisy_cubist), loc=3))
    write(root, "1", result("tome", miou=66.0, merged=timed(13.0, 1.30, 1.28, 1.33, noisy_tome, 1.26), loc=3))
    return root


def test_report_md_and_csv_carry_each_speed_ups_interval_and_noisy_mark(tmp_path):
    rows = build_rows(collect_results(sweep(tmp_path)))
    md, csv_path = write_report(rows, tmp_path / "out", [tmp_path / "sweep"])
    text = md.read_text()
    assert "| q1 | q3 | noisy |" in text
    cubist_line = next(line for line in text.splitlines() if line.startswith("| ok | sam_b | cubist"))
    assert "| 1.25x | 1.10x | 1.40x | noisy |" in cubist_line
    tome_line = next(line for line in text.splitlines() if line.startswith("| ok | sam_b | tome"))
    assert "| 1.30x | 1.28x | 1.33x |  |" in tome_line
    with csv_path.open() as handle:
        by_method = {row["method"]: row for row in csv.DictReader(handle)}
    assert float(by_method["cubist"]["speedup_q1"]) == 1.10 and by_method["cubist"]["noisy"] == "True"
    assert float(by_method["tome"]["speedup_q3"]) == 1.33 and by_method["tome"]["noisy"] == "False"


def test_the_pivot_shows_the_interval_and_the_noisy_mark():
    rows = [
        {"status": "ok", "group": "g", "method": "cubist", "schedule": "loc=3 ratio=0.125", "value": 0.99,
         "speedup": 1.25, "speedup_q1": 1.1, "speedup_q3": 1.4, "noisy": True, "run": "0"},
        {"status": "ok", "group": "g", "method": "tome", "schedule": "loc=3 ratio=0.125", "value": 0.98,
         "speedup": 1.3, "speedup_q1": 1.28, "speedup_q3": 1.33, "noisy": False, "run": "1"},
    ]
    pivot = pivot_markdown(rows)
    assert "0.990 / 1.25x (1.10-1.40) noisy" in pivot
    assert "0.980 / 1.30x (1.28-1.33) |" in pivot


def test_the_pareto_plot_draws_intervals_as_error_bars(tmp_path):
    rows = build_rows(collect_results(sweep(tmp_path)))
    ax = Figure().subplots()
    _plot_group(ax, rows, {"cubist": ("C0", "o"), "tome": ("C1", "s")})
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # one per method
    segments = bars[0].lines[2][0].get_segments()  # cubist's horizontal bar: q1 to q3
    (x0, _), (x1, _) = segments[0]
    assert (round(x0, 2), round(x1, 2)) == (1.10, 1.40)
    assert "IQR" in ax.get_xlabel()
    assert plot_pareto(rows, tmp_path / "pareto.png").is_file()


def test_a_group_whose_every_timing_is_noisy_falls_back_to_flop_ideal_and_says_so(tmp_path):
    rows = build_rows(collect_results(sweep(tmp_path, noisy_cubist=True, noisy_tome=True)))
    assert timing_useless(rows)
    md, _ = write_report(rows, tmp_path / "out", [tmp_path / "sweep"])
    assert "Every measured speed-up of 1 of 1 group(s) is noisy" in md.read_text()
    ax = Figure().subplots()
    _plot_group(ax, rows, {"cubist": ("C0", "o"), "tome": ("C1", "s")})
    assert "FLOP-ideal" in ax.get_xlabel()
    xs = sorted(float(x) for c in ax.collections for x, _ in c.get_offsets())
    assert 1.2 in xs and 1.26 in xs and 1.25 not in xs  # FLOP-ideal, not measured, speed-ups
    assert not timing_useless(build_rows(collect_results(sweep(tmp_path / "b", noisy_tome=False))))


def test_old_records_without_quartiles_leave_the_cells_blank(tmp_path):
    root = tmp_path / "old"
    write(root, "0", result("cubist", miou=68.5, merged=speed(12.5, 320.0, 3136, 1.25, 1.25), loc=3))
    md, _ = write_report(build_rows(collect_results(root)), tmp_path / "out", [root])
    line = next(line for line in md.read_text().splitlines() if line.startswith("| ok | sam_b | cubist"))
    assert "| 1.25x |  |  |  |" in line


def test_the_report_judges_recorded_rounds_by_the_one_timing_summary(tmp_path):
    """A record's stored verdict is re-derived from its rounds: the same rule for every run."""
    root = tmp_path / "rounds"
    merged = timed(12.5, 1.25, 1.25, 1.25, noisy=True)  # a stale verdict ...
    merged["times_ms"] = [80.0, 80.0, 80.0, 80.0]  # ... of steady rounds: 100 / 80 = 1.25x
    record = result("cubist", miou=68.5, merged=merged, loc=3)
    record["metrics"]["throughput"]["baseline"]["times_ms"] = [100.0, 100.0, 100.0, 100.0]
    write(root, "0", record)
    (row,) = [r for r in build_rows(collect_results(root)) if r["method"] == "cubist"]
    assert row["speedup"] == 1.25 and row["noisy"] is False and row["noise"] == []
