"""Search merge schedules: the speed / quality Pareto front, and the most faithful schedule at a
speed target, for your model, data and evaluators.

    python scripts/search.py --target-speedup 1.5                     # the default eval config: trained DINOv2-S, 12 photos
    python scripts/search.py model=sam_b model.checkpoint=... dataset.root=/data/coco \\
        evaluator.miou.max_images=200 --target-speedup 1.25 --trials 40
    python scripts/search.py --methods tome --dir logs/search/tome  # the same search for a baseline
    python scripts/search.py ... --dir <the same directory>         # resume a killed search

Positional arguments are eval.py overrides (model, dataset, evaluator, device); every trial is
measured as eval.py measures it (the evaluators' quality, the throughput evaluator's in-process
speed-up against the unmerged model). The directory receives study.db (Optuna's SQLite study:
resumable), trials/<n>/results.json, report.md / report.csv / pareto.png, search.json, and
merge/chosen.yaml plus merge/front_<n>.yaml, which eval.py loads with
``hydra.searchpath=[file://<dir>] merge=chosen``.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import optuna
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spatialmerge.evaluators.timing import speedup_text  # noqa: E402
from spatialmerge.jobs import USER_ERRORS  # noqa: E402
from spatialmerge.pipeline import instantiate  # noqa: E402
from spatialmerge.reporting.pareto import plot_pareto  # noqa: E402
from spatialmerge.reporting.table import build_rows, collect_results, write_report  # noqa: E402
from spatialmerge.results import new_run_dir  # noqa: E402
from spatialmerge.search import (  # noqa: E402
    SEARCH_METHODS,
    ScheduleSearch,
    SearchSpace,
    front_table,
    variant_text,
    write_outputs,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="eval.py config overrides, e.g. model=sam_b dataset.root=...")
    parser.add_argument("--trials", type=int, default=30, help="finished trials the study should hold")
    parser.add_argument("--target-speedup", type=float, default=None,
                        help="write merge/chosen.yaml: the most faithful schedule at or above this speed-up")
    parser.add_argument("--methods", default="cubist", help=f"comma-separated, of {', '.join(SEARCH_METHODS)}")
    parser.add_argument("--max-stages", type=int, default=2, help="cubist merges at most this often (1 or 2)")
    parser.add_argument("--min-ratio", type=float, default=0.02, help="smallest per-axis share one merge removes")
    parser.add_argument("--max-ratio", type=float, default=0.45, help="largest per-axis share one merge removes")
    parser.add_argument("--no-variants", action="store_true",
                        help="keep each method's defaults (cubist reduce / metric, Expedite temperature)")
    parser.add_argument("--quality", default=None,
                        help="evaluator/metric to maximise, e.g. fidelity/feature_cosine (default: the first "
                             "of miou/miou, top1/top1, fidelity/feature_cosine, ... the evaluators report)")
    parser.add_argument("--dir", type=Path, default=None, help="study directory (default: <paths.log_dir>/search/<time>, logs/ of the checkout)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials {args.trials} must be >= 1")
    if args.target_speedup is not None and args.target_speedup <= 0:
        parser.error(f"--target-speedup {args.target_speedup} must be > 0, e.g. 1.5")
    search: ScheduleSearch | None = None
    ctrl_c = CtrlC()
    try:
        ctrl_c.install()
        space = SearchSpace(
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
            max_stages=args.max_stages,
            min_ratio=args.min_ratio,
            max_ratio=args.max_ratio,
            variants=not args.no_variants,
        )
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="eval", overrides=args.overrides)
        directory = args.dir or new_run_dir(cfg.paths.log_dir, "search")
        try:
            search = ScheduleSearch(cfg, directory, space, quality=args.quality, seed=args.seed)
        except BaseException:
            if args.dir is None and not any(directory.iterdir()):  # refused before the study began
                directory.rmdir()
            raise
        logger = instantiate(cfg.logger) if "logger" in cfg else None
        if logger is not None:
            logger.start(directory, search.setup, name="schedule search", group=None)
        print(f"study: {directory} ({search.finished()} finished trial(s) so far)", flush=True)

        def report_trial(entry: dict) -> None:
            if entry["state"] == "complete":
                speed = speedup_text({"speedup": entry["speedup"], **entry["timing"]})
                text = f"{speed}, {entry['quality_key']} {entry['quality']:.4f}"
            else:
                text = f"{entry['state']}: {entry['reason']}"
            variant = variant_text(entry["merge"])
            variant = "" if variant == "-" else f" ({variant})"
            print(f"trial {entry['number']}: {entry['merge']['method']}{variant} {entry['schedule'] or ''} -> {text}",
                  flush=True)
            if logger is not None and entry["state"] == "complete":
                logger.log({"search/speedup": entry["speedup"], "search/quality": entry["quality"]}, step=entry["number"])
            ctrl_c.check()  # a Ctrl-C that Python swallowed during the trial stops the search here

        search.run(args.trials, on_trial=report_trial)
        result = search.result(args.target_speedup)
        if args.target_speedup is not None:
            print(f"re-measuring the front points near {args.target_speedup}x before choosing ...", flush=True)
            result = search.confirm(result, args.target_speedup)
        ctrl_c.check()
    except BaseException as err:
        if ctrl_c.pressed:  # also when the press cut an Optuna commit short and surfaced as its error
            return _report_interrupted(search)
        if not isinstance(err, (HydraException, *USER_ERRORS)):
            raise
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        ctrl_c.uninstall()
    outputs = write_outputs(result, args.target_speedup)
    rows = build_rows(collect_results(directory / "trials")) if (directory / "trials").is_dir() else []
    if rows:
        plot = plot_pareto(rows, directory / "pareto.png")
        write_report(rows, directory, [directory / "trials"], plot=plot.name if plot else None)
    pruned = sum(t["state"] == "pruned" for t in result.trials)
    failed = sum(t["state"] == "fail" for t in result.trials)
    print(f"\n{len(result.trials)} trials: {len(result.trials) - pruned - failed} measured, {pruned} pruned "
          f"(schedules the backbone cannot run), {failed} failed; Pareto front:")
    print(front_table(result))
    if failed and len(result.trials) - pruned - failed == 0:
        reason = next(t["reason"] for t in result.trials if t["state"] == "fail")
        print(f"error: every trial failed (trial 0: {reason}); the records are in {directory / 'trials'}",
              file=sys.stderr)
        return 1
    command = ["python", "eval.py", *args.overrides, f"hydra.searchpath=[file://{Path(directory).resolve()}]"]
    if args.target_speedup is not None:
        if result.note:
            print(f"note: {result.note}")
        if result.chosen is None:
            print(f"no measured schedule reached {args.target_speedup}x; the front above is what the "
                  "search found (more --trials, or a lower target)")
        else:
            chosen = result.chosen
            print(f"chosen for >= {args.target_speedup}x: trial {chosen['number']}, {chosen['merge']['method']} "
                  f"{chosen['schedule']}: {speedup_text(chosen['remeasured'])} re-measured (first "
                  f"{chosen['speedup']:.2f}x), {chosen['quality_key']} {chosen['quality']:.4f}")
            print("evaluate it again: " + shlex.join([*command, "merge=chosen"]))
    if logger is not None:
        summary = {"search/trials": len(result.trials), "search/front": len(result.front)}
        if result.chosen is not None:
            again = result.chosen["remeasured"]
            summary.update({"search/chosen_speedup": again["speedup"], "search/chosen_speedup_q1": again["speedup_q1"],
                            "search/chosen_speedup_q3": again["speedup_q3"], "search/chosen_noisy": again["noisy"],
                            "search/chosen_quality": result.chosen["quality"]})
        logger.summary(summary)
        logger.finish("ok")
    print("wrote " + ", ".join(str(p) for p in outputs.values()))
    return 0


class CtrlC:
    """Ctrl-C during a search: Python's KeyboardInterrupt, remembered. Raised inside Optuna's
    storage commit it surfaces as the error of the code it cut short, and inside a
    garbage-collection hook (SQLAlchemy's, just after a trial is recorded) Python only prints
    it and carries on; the remembered press tells both apart from real errors and stops the
    search (``check`` after each trial)."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGINT, self._press)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _press(self, signum: int, frame: Any) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt


def _report_interrupted(search: ScheduleSearch | None) -> int:
    trials = search.study.trials if search is not None else []
    if not trials:
        which = "no trial had started"
    elif trials[-1].state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        which = f"stopped after trial {trials[-1].number}"
    else:
        which = f"trial {trials[-1].number} recorded as interrupted"
    print(f"interrupted: {which}; the same command (with --dir {search.directory if search else '...'}) "
          "continues the study", file=sys.stderr)
    return 130

if __name__ == "__main__":
    sys.exit(main())
