"""What every entry point does around its work: the logger, results.json, one-line errors for
user mistakes, and exit codes that keep multiruns going."""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from spatialmerge import distributed
from spatialmerge.data import DatasetLayoutError
from spatialmerge.loggers import RunLogger, sweep_group
from spatialmerge.models import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from spatialmerge.adapters.schedule import label
from spatialmerge.pipeline import instantiate, record
from spatialmerge.reporting.summary import format_summary
from spatialmerge.results import RESULTS_FILE

# Mistakes a user can fix from the message alone: no traceback for these.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointNotFoundError,
    CheckpointMismatchError,
    CheckpointFormatError,
    DatasetLayoutError,
    ValueError,
    TypeError,
)

Work = Callable[[Path, "RunLogger | None"], dict[str, Any]]


def _one_line(err: BaseException) -> str:
    """``Type: message`` of a user mistake. A DataLoader worker re-raises it with the worker's
    traceback folded into the message; its last line is the original ``Type: message``."""
    text = str(err)
    if "Original Traceback" in text:
        return text.strip().splitlines()[-1]
    return f"{type(err).__name__}: {text}"


def run_name(cfg: DictConfig, merge: Mapping[str, Any] | None = None) -> str:
    """A short, readable run name: model and the merge's label (method, variants, schedule).

    ``merge`` is what ran (results.json's resolved ``merge``); without it, the request in
    ``cfg.merge`` names the run until the job has resolved it (``loc=auto``)."""
    if merge is None and "merge" in cfg:
        merge = OmegaConf.to_container(cfg.merge, resolve=True)
    parts = [str(cfg.model.get("name")), label(merge)]
    if cfg.task_name not in ("eval",):
        parts.insert(0, str(cfg.task_name))
    return " ".join(part for part in parts if part)


def summary_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as a logger's summary: throughput rows under method-independent keys
    (``throughput/unmerged/...``, ``throughput/merged/...``, the method being in the config) so
    a sweep can chart one key across methods; per-round timings and the timing setup, which
    describe how it was measured rather than what, stay in results.json."""
    out = dict(metrics)
    speed = metrics.get("throughput")
    if isinstance(speed, Mapping):
        rows = {k: v for k, v in speed.items() if isinstance(v, Mapping) and k != "setup"}
        renamed: dict[str, Any] = {}
        for name, row in rows.items():
            key = "unmerged" if name == "baseline" else "merged" if len(rows) == 2 else name
            renamed[key] = {k: v for k, v in row.items() if k != "times_ms"}
        if "seconds" in speed:
            renamed["seconds"] = speed["seconds"]
        out["throughput"] = renamed
    return out


class RecordExistsError(FileExistsError):
    """The run directory already holds another job's results.json."""


class RunDirectoryBusyError(FileExistsError):
    """Another live process is writing the run directory."""


# Held by the process writing a run directory (its pid inside), removed when it is done: a
# second process pointed at the same directory is refused instead of mixing two runs' files.
LOCK_FILE = ".running"
_held_locks: set[Path] = set()


def _refuse(err: Exception) -> None:
    print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(1)


def _recorded_status(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("status"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def _refuse_to_replace(run_dir: Path, resuming: bool, directory_key: str = "hydra.run.dir") -> None:
    """Exit with one line when ``run_dir`` already records a run this job may not continue,
    before writing there. Only an unfinished training run (checkpoints, a record whose status
    is not ok) continues, and only with ``trainer.resume`` (of train.py); a finished run, an
    evaluation record, anything else is never rewritten. ``directory_key`` is the setting that
    chose the directory, named in the fix."""
    existing = run_dir / RESULTS_FILE
    if not existing.exists():
        return
    status = _recorded_status(existing)
    unfinished_training = (run_dir / "checkpoints").is_dir() and status != "ok"
    if resuming and unfinished_training:
        return
    fresh = f"choose a new directory (leave {directory_key} unset for a fresh timestamped one)"
    if resuming and (run_dir / "checkpoints").is_dir():
        why = (f"{existing} records a finished training run (status ok): resuming would rewrite its "
               f"record; its weights are in {run_dir / 'checkpoints'}: {fresh}")
    elif resuming:
        why = (f"{existing} records a run without training checkpoints (status {status}); only an "
               f"unfinished training run continues with trainer.resume: {fresh}")
    else:
        why = (f"{existing} already records another run; a job never overwrites another job's record: "
               f"{fresh}" + (", or continue that unfinished training run with train.py and its own "
                             "settings plus trainer.resume=auto" if unfinished_training else ""))
    _refuse(RecordExistsError(why))


def _lock(run_dir: Path) -> None:
    """Hold ``run_dir`` for this process (rank 0 of a torchrun), or exit with one line if a live
    process holds it; a lock left by a killed process is taken over."""
    run_dir = run_dir.resolve()
    if run_dir in _held_locks or int(os.environ.get("RANK", "0")) != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None:
                _refuse(RunDirectoryBusyError(
                    f"{run_dir} is being written by another process (pid {holder}); two runs never share "
                    "a directory: wait for it to finish or leave hydra.run.dir unset for a fresh one"
                ))
            path.unlink(missing_ok=True)  # its process is gone
            continue
        with os.fdopen(handle, "w") as lock:
            lock.write(str(os.getpid()))
        _held_locks.add(run_dir)
        atexit.register(_unlock, run_dir)
        return


def _lock_holder(path: Path) -> int | None:
    """The pid of the live process holding a lock file, None for a stale one."""
    try:
        pid = int(path.read_text().strip() or "0")
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _unlock(run_dir: Path) -> None:
    run_dir = run_dir.resolve()
    if run_dir in _held_locks:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        _held_locks.discard(run_dir)


def run_job(
    cfg: DictConfig,
    work: Work,
    prepare: Callable[[Path], Path] | None = None,
    user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
    continues_run: Callable[[DictConfig], bool] = lambda cfg: False,
) -> None:
    """Run ``work(run_dir, logger)`` as one Hydra job.

    ``prepare(run_dir)`` runs first (e.g. joining torchrun) and may return the directory to use.
    A run directory that already holds a results.json is refused before anything is written
    there, unless ``continues_run(cfg)`` says this job continues that run (a resumed training).
    Whatever happens after, rank 0 writes results.json and finishes the logger (a W&B run left
    open would hang a multirun). A user mistake prints one ``error:`` line (the traceback with
    SPATIALMERGE_DEBUG=1) and exits 1 in a single run; a multirun records it and goes on.
    Ctrl-C is recorded as ``interrupted`` and stops the run (and a multirun) with exit code 130.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    _refuse_to_replace(run_dir, continues_run(cfg))
    _lock(run_dir)
    started, status, error, outcome = time.time(), "failed", None, None
    logger: RunLogger | None = None
    interrupted = False
    try:
        if prepare is not None:
            run_dir = prepare(run_dir)
        if distributed.is_main():
            logger = instantiate(cfg.logger)
            config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            group = sweep_group(hydra_cfg, sys.argv[1:], Path(hydra_cfg.sweep.dir)) if multirun else None
            logger.start(run_dir, config, name=run_name(cfg), group=group)
        outcome = work(run_dir, logger)
        status = "ok"
    except user_errors as err:
        outcome = getattr(err, "partial_outcome", None)  # what was measured before it failed
        if os.environ.get("SPATIALMERGE_DEBUG"):
            raise
        error = _one_line(err)
    except KeyboardInterrupt:
        status, error, interrupted = "interrupted", "interrupted by the user (Ctrl-C)", True
    except Exception as err:  # recorded, then re-raised: a bug deserves its traceback
        outcome = getattr(err, "partial_outcome", None)
        error = f"{type(err).__name__}: {err}"
        if not multirun:
            raise
        traceback.print_exc()  # a multirun records it and goes on to its other jobs
    finally:
        if distributed.is_main():
            payload = record(run_dir, cfg, outcome, status, error, started)
            if logger is not None:
                if payload.get("merge") is not None:  # the name of what ran, loc resolved
                    logger.rename(run_name(cfg, payload["merge"]))
                if payload.get("schedule") is not None:
                    logger.update_config({"schedule": payload["schedule"]})
                logger.summary({"status": status, **summary_metrics(payload["metrics"])})
                logger.finish(status)
            if status == "ok":
                print(format_summary(payload))
            print(f"results: {run_dir / 'results.json'}")
            _unlock(Path(hydra_cfg.runtime.output_dir))
        distributed.cleanup()
    if interrupted:
        print(f"interrupted: {error}; recorded in {run_dir / RESULTS_FILE}", file=sys.stderr)
        sys.exit(130)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        if not multirun:
            sys.exit(1)


class RecordGuard(Callback):
    """Refuses, before Hydra writes anything, a run directory (or a sweep directory) that
    already holds another job's results.json: Hydra saves ``.hydra/config.yaml`` there before
    the job starts, which would already replace the finished run's record of its config.

    Registered in ``configs/hydra/default.yaml`` under ``hydra.callbacks``. An evaluation never
    continues a run (``trainer.resume`` means nothing to it); ``train.yaml`` registers the
    training guard instead, which lets an unfinished training run continue with the settings it
    started with (``check_resume``).
    """

    resumes = False

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guard(Path(config.hydra.run.dir), config, "hydra.run.dir")
        _lock(Path(config.hydra.run.dir))  # before Hydra writes .hydra/ there

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        found = sorted(Path(config.hydra.sweep.dir).glob(f"*/{RESULTS_FILE}"))
        if found:
            self._guard(found[0].parent, config, "hydra.sweep.dir")

    def _guard(self, run_dir: Path, config: DictConfig, directory_key: str) -> None:
        resuming = self.resumes and (config.get("trainer") or {}).get("resume") is not None
        _refuse_to_replace(run_dir, resuming, directory_key)
        if resuming and (run_dir / RESULTS_FILE).exists():
            try:
                self.check_resume(run_dir, config)
            except ValueError as err:
                _refuse(err)

    def check_resume(self, run_dir: Path, config: DictConfig) -> None:
        """Raise ValueError, naming what differs, when ``config`` may not continue the
        unfinished run recorded in ``run_dir``; runs before anything is written there."""


class MultirunSummary(Callback):
    """At the end of a multirun: one line counting the jobs by status, and a non-zero exit when
    any job did not succeed, so a CI step or a shell ``&&`` sees the failure.

    Registered in ``configs/hydra/default.yaml`` under ``hydra.callbacks``.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        statuses = []
        for path in sorted(sweep_dir.rglob(RESULTS_FILE)):
            try:
                statuses.append(json.loads(path.read_text()).get("status", "failed"))
            except (OSError, ValueError, AttributeError):
                statuses.append("unreadable")
        jobs = len(list(sweep_dir.glob("*/.hydra")))
        statuses += ["no results"] * max(0, jobs - len(statuses))
        counts = {status: statuses.count(status) for status in dict.fromkeys(statuses)}
        ok = counts.pop("ok", 0)
        others = ", ".join(f"{n} {status}" for status, n in counts.items())
        print(f"{ok} ok" + (f", {others}" if others else "") + f": run scripts/report.py {sweep_dir}")
        if others:
            sys.exit(1)
