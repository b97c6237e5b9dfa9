"""Summarise a run or sweep directory of eval.py: report.md, report.csv and pareto.png.

    python scripts/report.py logs/eval/multiruns/2025-01-01_12-00-00_cpu_throughput
    python scripts/report.py SWEEP_DIR BASELINE_RUN_DIR --out reports/sam_b   # several sources
    python scripts/report.py SWEEP_DIR --wandb off                            # never touch W&B

Every results.json below the directories becomes a row, failed jobs included. With
``--wandb auto`` (the default) the table and plot also go to W&B when the sweep logged there
(logger=wandb), as a run named ``report`` in the sweep's group, in the sweep's W&B mode.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spatialmerge.reporting import build_rows, collect_results, plot_pareto, write_report  # noqa: E402
from spatialmerge.reporting.publish import log_report, sweep_group, wandb_config  # noqa: E402
from spatialmerge.reporting.table import check_report_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories of eval.py")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first directory)")
    parser.add_argument("--wandb", choices=("auto", "on", "off"), default="auto",
                        help="log the report to W&B: auto = when the sweep used logger=wandb")
    args = parser.parse_args(argv)
    out = args.out or args.dirs[0]
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file; the report is a directory (report.md, report.csv, pareto.png): "
              "choose a directory", file=sys.stderr)
        return 1
    try:
        check_report_dir(out, args.dirs)
        results = collect_results(args.dirs)
    except (FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not results:
        print(f"error: no results.json below {', '.join(map(str, args.dirs))}; is this an eval.py "
              "run or sweep directory (logs/eval/runs/... or logs/eval/multiruns/...)?", file=sys.stderr)
        return 1
    rows = build_rows(results)
    plot = plot_pareto(rows, out / "pareto.png")
    md, csv = write_report(rows, out, args.dirs, plot=plot.name if plot else None)
    print(md.read_text())
    print(f"wrote {md}, {csv}" + (f", {plot}" if plot else " (no speed-up to plot)"))
    logger = wandb_config(results)
    if args.wandb == "on" and logger is None:
        logger = {"_target_": "spatialmerge.loggers.WandbLogger"}
    if args.wandb != "off" and logger is not None:
        log_report(rows, logger, sweep_group(results, args.dirs), out, plot)
        print("logged the report to W&B (run 'report')")
    failed = sum(row["status"] != "ok" for row in rows)
    if failed:
        print(f"{failed} job(s) not ok: see the status and error columns", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
