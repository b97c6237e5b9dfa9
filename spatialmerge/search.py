"""Schedule search: given a model, data and evaluators, find the merge schedules on the
speed / quality Pareto front and the most faithful one at a speed target.

Built on Optuna (multi-objective TPE): each trial proposes a schedule (method and its variant,
one or two merges, where and how much, window alignment where the backbone has windows),
measures it exactly as ``eval.py`` does (every configured evaluator, the throughput one timing
it against the unmerged model in the same process) and records the run as a ``results.json``
under ``trials/<number>/``, so ``scripts/report.py`` reads a study like any sweep. The study
lives in an SQLite database in its directory: a killed search resumes where it stopped, finished
trials are never rerun, and a schedule that cannot run (a ratio too large for its grid, a merge
on a Hiera q-pool block) is recorded as pruned with the reason instead of crashing the search.

Optuna is driven directly on the config ``eval.py`` composes, rather than through Hydra's Optuna
sweeper plugin: hydra-optuna-sweeper 1.2.0 pins optuna < 3, and a sweeper job rebuilds the model
and data for every trial.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import optuna
import torch
from sqlalchemy.exc import SQLAlchemyError
from omegaconf import DictConfig, OmegaConf
from torch import nn

from spatialmerge.adapters import find_adapter
from spatialmerge.adapters.registry import resolve_schedule
from spatialmerge.adapters.schedule import label, schedule_text, variant_parts
from spatialmerge.data import DatasetLayoutError
from spatialmerge.data.images import CorruptImageError, check_readable
from spatialmerge.evaluators.base import DatasetEvaluator
from spatialmerge.evaluators.timing import speedup_text
from spatialmerge.models.checkpoints import CheckpointFormatError, CheckpointMismatchError, CheckpointNotFoundError
from spatialmerge.pipeline import EvalContext, instantiate, record, run_evaluators
from spatialmerge.results import write_json_atomic

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"
# what each trial keeps of its timing row, beside the speed-up itself
TIMING_KEYS = ("speedup_q1", "speedup_q3", "noisy", "noise", "flop_speedup")
# the methods with a search space (oracle and pool are references, not candidates)
SEARCH_METHODS = ("cubist", "tome", "expedite")
# The quality each evaluator's metrics offer, in the order a search prefers them.
QUALITY_KEYS = (
    "miou/miou", "top1/top1", "fidelity/feature_cosine", "fidelity/mask_iou", "fidelity/top1_agreement",
)


@dataclass(frozen=True)
class SearchSpace:
    """What a trial may propose.

    Attributes:
        methods: merge methods to choose from (``cubist``, single-layer ``tome``, ``expedite``).
        max_stages: cubist may merge up to this many times (1 or 2); the others merge once.
        min_ratio / max_ratio: per-axis share of rows and columns removed by one merge.
        variants: also search cubist's ``reduce`` and ``metric``, Expedite's temperature
            (reference or ``auto``) and, for every method, ``prop_attn``; off, each method runs
            its defaults.
    """

    methods: tuple[str, ...] = ("cubist",)
    max_stages: int = 1
    min_ratio: float = 0.02
    max_ratio: float = 0.45
    variants: bool = True

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in SEARCH_METHODS]
        if not self.methods or unknown:
            raise ValueError(
                f"search methods {list(self.methods)}: choose from {', '.join(SEARCH_METHODS)}"
            )
        if self.max_stages not in (1, 2):
            raise ValueError(f"max_stages={self.max_stages} must be 1 or 2")
        if not 0 < self.min_ratio < self.max_ratio < 0.5:
            raise ValueError(
                f"ratios [{self.min_ratio}, {self.max_ratio}] must satisfy 0 < min < max < 0.5"
            )


def suggest_merge(trial: optuna.Trial, space: SearchSpace, depth: int, windows: bool) -> dict[str, Any]:
    """The ``spatialmerge.patch`` options trial ``trial`` proposes for a backbone of ``depth``
    blocks (``windows``: whether it has attention windows to align to)."""
    method = trial.suggest_categorical("method", list(space.methods))
    stages = trial.suggest_int("stages", 1, space.max_stages) if method == "cubist" and space.max_stages > 1 else 1
    schedule = []
    low = 0
    for k in range(stages):
        # a later merge needs a later block; the first leaves room for the others
        loc = trial.suggest_int(f"loc{k}", low, depth - stages + k)
        ratio = trial.suggest_float(f"ratio{k}", space.min_ratio, space.max_ratio, step=0.005)
        schedule.append([loc, round(ratio, 3)])  # the step's float arithmetic, rounded away
        low = loc + 1
    merge: dict[str, Any] = {"method": method}
    if stages == 1:
        merge.update(loc=schedule[0][0], ratio=schedule[0][1])
    else:
        merge["stages"] = schedule
    if windows:
        merge["align"] = trial.suggest_categorical("align", ["none", "window"])
    if space.variants and method == "cubist":
        merge["reduce"] = trial.suggest_categorical("reduce", ["maxmag", "mean", "maxnorm"])
        merge["metric"] = trial.suggest_categorical("metric", ["tokens", "keys", "normed"])
    if space.variants and method == "expedite":
        if trial.suggest_categorical("temperature", ["reference", "auto"]) == "auto":
            merge["temperature"] = "auto"
    if space.variants:
        # every method may use it, so fronts compare like with like
        merge["prop_attn"] = trial.suggest_categorical("prop_attn", [False, True])
    return merge


class QualityMissingError(ValueError):
    """The trial's metrics hold no quality the search can maximise: a setting of the search."""


# Failures of the search's settings rather than of one schedule: the search stops after the
# first trial that meets one instead of failing every trial alike.
SETUP_ERRORS: tuple[type[Exception], ...] = (
    QualityMissingError, DatasetLayoutError, CorruptImageError, CheckpointNotFoundError,
    CheckpointMismatchError, CheckpointFormatError, OSError,
)


def quality_of(
    metrics: Mapping[str, Any], key: str | None = None, qualities: Collection[str] | None = None
) -> tuple[str, float]:
    """(key, value) of the quality a trial is judged by: ``key`` (``evaluator/metric``), or the
    first of ``QUALITY_KEYS`` the metrics hold. ``qualities`` (``evaluator/metric`` names, see
    ``search_qualities``) are what the error offers instead; None offers every number."""
    for candidate in [key] if key else QUALITY_KEYS:
        evaluator, _, name = candidate.partition("/")
        value = metrics.get(evaluator, {}).get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return candidate, float(value)
    offered = sorted(
        f"{e}/{k}" for e, v in metrics.items() if isinstance(v, dict) for k, x in v.items()
        if isinstance(x, (int, float)) and not isinstance(x, bool) and (qualities is None or f"{e}/{k}" in qualities)
    )
    fix = ("name one of those with --quality" if offered else
           "add an evaluator that measures quality, e.g. evaluator=features (fidelity + throughput)")
    raise QualityMissingError(
        f"no quality {key or ' / '.join(QUALITY_KEYS)} in the trial's metrics; on this model the "
        f"evaluators report {', '.join(offered) or 'no quality'}: {fix}"
    )


def search_qualities(evaluators: Mapping[str, Any]) -> set[str]:
    """``evaluator/metric`` of every quality the evaluators (name -> evaluator) may report."""
    return {
        f"{name}/{quality}" for name, evaluator in evaluators.items()
        if hasattr(evaluator, "qualities") for quality in evaluator.qualities()
    }


def check_quality(key: str | None, evaluators: Mapping[str, Any]) -> None:
    """Refuse, before the first trial, a quality the configured evaluators (name -> evaluator)
    cannot report: every trial would be timed and then fail."""
    if key is None:
        if not any(k.partition("/")[0] in evaluators for k in QUALITY_KEYS):
            raise ValueError(
                f"the configured evaluators ({', '.join(evaluators)}) report no quality to maximise "
                f"beside the speed-up (one of {', '.join(QUALITY_KEYS)}); use e.g. evaluator=features "
                "(fidelity + throughput), evaluator=segmentation or evaluator=classification"
            )
        return
    evaluator, _, metric = key.partition("/")
    if not metric or evaluator not in evaluators or evaluator == "throughput":
        quality_evaluators = [e for e in evaluators if e != "throughput"]
        raise ValueError(
            f"--quality {key} must be <evaluator>/<metric> of a configured evaluator other than "
            f"throughput ({', '.join(quality_evaluators) or 'none configured'}), e.g. "
            f"{next((k for k in QUALITY_KEYS if k.partition('/')[0] in evaluators), 'fidelity/feature_cosine')}"
        )
    declared = getattr(evaluators[evaluator], "qualities", None)  # a user's evaluator may not say
    names = declared() if declared is not None else (metric,)
    if metric not in names:
        raise ValueError(
            f"--quality {key}: {metric!r} is no quality the {evaluator} evaluator reports (a count, the "
            f"unmerged model's own number or lower-is-better is none); its qualities are "
            f"{', '.join(f'{evaluator}/{n}' for n in names)}"
        )


def check_inputs(cfg: DictConfig, evaluators: Mapping[str, Any]) -> int:
    """Before trial 0: build the configured dataset (its root and layout) and read every image
    the evaluators (name -> evaluator) will read (the most any of them reads: its
    ``max_images``, every image for top-1), so that data every trial would fail on stops the
    search before any trial is spent. Returns how many images were read."""
    readers = [e for e in evaluators.values() if isinstance(e, DatasetEvaluator)]
    if not readers:
        return 0
    if "dataset" not in cfg:
        raise ValueError(
            f"evaluator {', '.join(n for n, e in evaluators.items() if e in readers)} reads a dataset; "
            "choose one with dataset=..., e.g. dataset=photos"
        )
    dataset = instantiate(cfg.dataset)()
    count = max(e.image_count(len(dataset)) for e in readers)
    log.info("reading the %d image(s) every trial will read, once, before trial 0", count)
    check_readable(dataset, count, max(e.num_workers for e in readers), progress=any(e.progress for e in readers))
    return count


@dataclass
class SearchResult:
    """A finished (or resumed) search: every trial and what it chose."""

    directory: Path
    trials: list[dict[str, Any]] = field(default_factory=list)
    front: list[int] = field(default_factory=list)
    chosen: dict[str, Any] | None = None
    note: str = ""  # how the choice was made, where it needs saying (re-measured, fallbacks)
    remeasured: dict[int, dict[str, Any]] = field(default_factory=dict)  # trial -> its second timing


def choose(
    candidates: list[dict[str, Any]], remeasured: Mapping[int, Mapping[str, Any]], target: float
) -> tuple[dict[str, Any] | None, str]:
    """The most faithful candidate whose re-measured speed-up reaches ``target`` (the choice
    carries the re-measurement as ``remeasured``), and a note: where its interval straddles the
    target, or where every re-measurement was noisy and the FLOP-ideal speed-up (which no load
    changes) decided instead."""
    steady = {n for n, row in remeasured.items() if not row.get("noisy")}
    if remeasured and not steady:
        reaching = [c for c in candidates if (c["timing"].get("flop_speedup") or 0.0) >= target]
        note = (f"every re-measured speed-up was noisy, so the choice is on the FLOP-ideal speed-up "
                f"(>= {target}x); time it again on an idle machine")
    else:
        reaching = [c for c in candidates if c["number"] in steady and remeasured[c["number"]]["speedup"] >= target]
        note = ""
    if not reaching:
        return None, note or f"no candidate's re-measured speed-up reached {target}x"
    best = max(reaching, key=lambda c: (c["quality"], remeasured[c["number"]]["speedup"]))
    row = dict(remeasured[best["number"]])
    if steady and row["speedup_q1"] < target:
        note = (f"its re-measured interval {row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}x straddles the "
                f"{target}x target")
    return {**best, "remeasured": row}, note


class ScheduleSearch:
    """One study: a composed ``eval`` config (model, dataset, evaluators), a space, a directory.

    Args:
        cfg: the ``eval`` config (its ``merge`` is replaced per trial); its evaluators must
            include ``throughput``.
        directory: where the study database, the trials' records and the outputs go; an
            existing study there is resumed, and refused if it was started with other settings.
            Nothing is written there before the settings and the data pass their checks
            (``check_quality``, ``check_inputs``).
        space: what trials may propose.
        quality: ``evaluator/metric`` to maximise beside the speed-up; None picks the first of
            ``QUALITY_KEYS`` the evaluators report.
        seed: the sampler's seed.
    """

    def __init__(
        self, cfg: DictConfig, directory: Path, space: SearchSpace, quality: str | None = None, seed: int = 0
    ) -> None:
        if "throughput" not in cfg.evaluator:
            raise ValueError(
                f"the search measures speed with the throughput evaluator, but the configured "
                f"evaluators are {', '.join(cfg.evaluator) or 'none'}; use e.g. evaluator=features "
                "(fidelity + throughput) or evaluator=segmentation (miou + throughput)"
            )
        evaluators = {name: instantiate(settings) for name, settings in cfg.evaluator.items()}
        check_quality(quality, evaluators)
        check_inputs(cfg, evaluators)
        self.cfg = cfg
        self.directory = Path(directory)
        self.space = space
        self.quality = quality
        self.qualities = search_qualities(evaluators)
        self.setup_error: ValueError | None = None
        self.setup = {
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True) if "dataset" in cfg else None,
            "evaluator": OmegaConf.to_container(cfg.evaluator, resolve=True),
            "device": str(cfg.device),
            "space": asdict(space),
            "quality": quality,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        # the search reports its own trials and their failures in one line each (optuna would add a
        # traceback per failed trial at WARNING)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        storage = f"sqlite:///{(self.directory / STUDY_FILE).resolve()}"
        try:
            self.study = optuna.create_study(
                study_name="schedule_search",
                storage=storage,
                directions=["maximize", "maximize"],
                sampler=optuna.samplers.TPESampler(seed=seed),
                load_if_exists=True,
            )
        except SQLAlchemyError as err:  # a truncated or foreign file where the study should be
            raise ValueError(
                f"{self.directory / STUDY_FILE} is not a readable Optuna study ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:120]}); move it away to start afresh here, or search in "
                "another --dir"
            ) from None
        saved = self.study.user_attrs.get("setup")
        # a study no trial has started in (its first attempt stopped on a missing checkpoint, say)
        # takes the corrected settings
        if saved is None or not self.study.get_trials(deepcopy=False):
            self.study.set_user_attr("setup", self.setup)
        elif saved != _jsonable(self.setup):
            changed = sorted(k for k in self.setup if _jsonable(self.setup[k]) != saved.get(k))
            raise ValueError(
                f"{self.directory} holds a search started with other settings ({', '.join(changed)} "
                "differ); resume it with the same model, data, evaluators and space, or search in a "
                "new directory"
            )
        self._close_interrupted()
        self.model: nn.Module | None = None

    def _close_interrupted(self) -> None:
        """Trials left running by a killed search are marked failed: they are not rerun, and the
        sampler proposes afresh."""
        interrupted = list(self.study.user_attrs.get("interrupted", []))
        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            interrupted.append(trial.number)
            log.warning("trial %d was interrupted by a killed search: recorded as failed", trial.number)
        self.study.set_user_attr("interrupted", interrupted)

    def finished(self) -> int:
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        return len(self.study.get_trials(deepcopy=False, states=done))

    def run(self, trials: int, on_trial: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Run trials until the study holds ``trials`` finished ones (resumed studies count the
        trials they already have); ``on_trial`` receives each finished trial's entry."""
        remaining = trials - self.finished()
        if remaining <= 0:
            log.info("the study already holds %d finished trials", self.finished())
            return
        if self.model is None:
            torch.manual_seed(self.cfg.seed)  # random weights are the same on every resume
            self.model = instantiate(self.cfg.model)
        callbacks = [] if on_trial is None else [lambda study, trial: on_trial(self._entry(trial))]
        self.study.optimize(self._objective, n_trials=remaining, catch=(Exception,), callbacks=callbacks)
        if self.setup_error is not None:  # the search's settings, not one schedule, were at fault
            raise self.setup_error

    def _objective(self, trial: optuna.Trial) -> tuple[float, float]:
        model = self.model
        adapter = find_adapter(model)
        target = adapter.target(model)
        merge = suggest_merge(trial, self.space, adapter.depth(target), adapter.window(target) is not None)
        try:
            resolved = resolve_schedule(model, **merge)
        except ValueError as err:  # a schedule this backbone cannot run: pruned, with the reason
            trial.set_user_attr("merge", merge)
            trial.set_user_attr("schedule", schedule_text(merge))
            trial.set_user_attr("invalid", str(err))
            raise optuna.TrialPruned(str(err)) from None
        merge = resolved.options
        trial.set_user_attr("merge", merge)
        trial.set_user_attr("schedule", schedule_text(merge))
        schedule = resolved.describe()
        run_dir = self.directory / "trials" / str(trial.number)
        cfg = self._trial_config(merge)
        started = time.time()
        ctx = EvalContext(model, merge, str(cfg.device), instantiate(cfg.dataset) if "dataset" in cfg else None)
        metrics: dict[str, Any] = {}
        try:
            metrics = run_evaluators(cfg, ctx)
            key, quality = quality_of(metrics, self.quality, self.qualities)
        except KeyboardInterrupt:
            reason = "interrupted by the user (Ctrl-C)"
            record(run_dir, cfg, {"merge": merge, "schedule": schedule, "metrics": metrics, "notes": []},
                   "interrupted", reason, started)
            trial.set_user_attr("error", reason)
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            record(run_dir, cfg, {"merge": merge, "schedule": schedule, "metrics": metrics, "notes": []},
                   "failed", reason, started)
            trial.set_user_attr("error", reason)
            if isinstance(err, SETUP_ERRORS):  # the data, weights or quality: every trial would fail alike
                self.setup_error = err
                trial.study.stop()
            raise
        outcome = {"merge": merge, "schedule": schedule, "metrics": metrics, "notes": [f"search trial {trial.number}"]}
        record(run_dir, cfg, outcome, "ok", None, started)
        timing = metrics["throughput"][merge["method"]]
        speedup = float(timing["speedup"])
        trial.set_user_attr("timing", {k: timing.get(k) for k in TIMING_KEYS})
        trial.set_user_attr("quality_key", key)
        trial.set_user_attr("tokens_out", schedule.get("tokens_out"))
        log.info("trial %d: %s -> %.2fx, %s %.4f", trial.number, label(merge), speedup, key, quality)
        return speedup, quality

    def _trial_config(self, merge: Mapping[str, Any]) -> DictConfig:
        """The eval config of one trial: the study's, with this trial's merge."""
        cfg = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=True))
        cfg.merge = dict(merge)
        return cfg

    def result(self, target_speedup: float | None = None) -> SearchResult:
        """Every trial, the Pareto front of the completed ones and, with ``target_speedup``, the
        most faithful schedule at or above it (None if none reached it)."""
        from spatialmerge.reporting.pareto import pareto_front

        trials = [self._entry(trial) for trial in self.study.get_trials(deepcopy=False)]
        complete = [t for t in trials if t["state"] == "complete"]
        front = [complete[i]["number"] for i in pareto_front([(t["speedup"], t["quality"]) for t in complete])]
        chosen = None
        if target_speedup is not None:
            reaching = [t for t in complete if t["speedup"] >= target_speedup]
            chosen = max(reaching, key=lambda t: (t["quality"], t["speedup"])) if reaching else None
        return SearchResult(self.directory, trials, front, chosen)


    def _entry(self, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        """One trial as the outputs list it."""
        reason = trial.user_attrs.get("invalid") or trial.user_attrs.get("error")
        if reason is None and trial.number in self.study.user_attrs.get("interrupted", []):
            reason = "interrupted (the search was killed)"
        if reason is None and trial.state == optuna.trial.TrialState.FAIL:
            reason = "failed before its error was recorded (see the search's log)"
        return {
            "number": trial.number,
            "state": trial.state.name.lower(),
            "merge": trial.user_attrs.get("merge"),
            "schedule": trial.user_attrs.get("schedule"),
            "speedup": trial.values[0] if trial.values else None,
            "quality": trial.values[1] if trial.values else None,
            "quality_key": trial.user_attrs.get("quality_key"),
            "timing": trial.user_attrs.get("timing") or {},
            "reason": reason,
        }

    def remeasure(
        self,
        entries: list[dict[str, Any]],
        rounds: int,
        measure: Callable[[dict[str, dict[str, Any]]], dict[str, Any]] | None = None,
    ) -> dict[int, dict[str, Any]]:
        """Time the merge of each of ``entries`` again, alternating with the unmerged model for
        ``rounds`` rounds, one candidate at a time as its trial was timed (several models in one
        round make every round slower and more variable on a small CPU); ``measure`` replaces
        the throughput evaluator, for tests. Returns trial number -> its timing row
        (``timing.summarise_rounds``) with the machine's load."""
        if measure is None:
            settings = OmegaConf.to_container(self.cfg.evaluator.throughput, resolve=True)
            settings.update(iters=rounds, progress=False)
            if self.model is None:
                torch.manual_seed(self.cfg.seed)
                self.model = instantiate(self.cfg.model)
            evaluator = instantiate(settings)

            def measure(merges: dict[str, dict[str, Any]]) -> dict[str, Any]:
                return evaluator.evaluate(self.model, merges, str(self.cfg.device))

        rows = {}
        for entry in entries:
            name = f"trial {entry['number']}"
            timings = measure({name: entry["merge"]})
            rows[entry["number"]] = {**timings[name], "load": (timings.get("setup") or {}).get("load")}
        return rows

    def confirm(
        self,
        result: "SearchResult",
        target_speedup: float,
        rounds: int | None = None,
        measure: Callable[[dict[str, dict[str, Any]]], dict[str, Any]] | None = None,
    ) -> "SearchResult":
        """Choose for ``target_speedup`` on a second, longer measurement rather than on one noisy
        number: the front points that may reach the target (first speed-up within 15% of it, or
        its interval reaching it) are timed again (``remeasure``, twice the configured rounds and
        at least 10) and the most faithful whose re-measured speed-up reaches the
        target is chosen; see ``choose``."""
        by_number = {t["number"]: t for t in result.trials}
        candidates = [
            by_number[n] for n in result.front
            if by_number[n]["speedup"] >= 0.85 * target_speedup
            or (by_number[n]["timing"].get("speedup_q3") or 0.0) >= target_speedup
        ]
        if not candidates:
            return SearchResult(result.directory, result.trials, result.front, None, "no front point came near the target")
        configured = int(OmegaConf.select(self.cfg, "evaluator.throughput.iters", default=5) or 5)
        remeasured = self.remeasure(candidates, rounds or max(10, 2 * configured), measure)
        chosen, note = choose(candidates, remeasured, target_speedup)
        return SearchResult(result.directory, result.trials, result.front, chosen, note, dict(remeasured))


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from the study's storage (JSON)."""
    import json

    return json.loads(json.dumps(value, default=str))


def write_outputs(result: SearchResult, target_speedup: float | None) -> dict[str, Path]:
    """Into the study directory: ``search.json`` (every trial, the front, the choice), one merge
    config per front point (``merge/front_<trial>.yaml``) and ``merge/chosen.yaml`` for the
    target's choice, each loadable with ``hydra.searchpath=[file://<study dir>] merge=<name>``.
    Files of earlier invocations are replaced only by this study's own, never another's."""
    out: dict[str, Path] = {}
    merge_dir = result.directory / "merge"
    merge_dir.mkdir(exist_ok=True)
    by_number = {t["number"]: t for t in result.trials}
    for stale in merge_dir.glob("*.yaml"):  # the front of an earlier call of this same study
        stale.unlink()
    for number in result.front:
        path = merge_dir / f"front_{number}.yaml"
        _write_merge(path, by_number[number], "on the Pareto front")
        out[path.stem] = path
    if result.chosen is not None:
        path = merge_dir / "chosen.yaml"
        _write_merge(path, result.chosen, f"the most faithful at >= {target_speedup}x")
        out["chosen"] = path
    summary = {
        "target_speedup": target_speedup,
        "chosen": result.chosen,
        "choice_note": result.note,
        "remeasured": {str(n): row for n, row in result.remeasured.items()},  # what the choice read
        "front": [by_number[n] for n in result.front],
        "trials": result.trials,
    }
    write_json_atomic(result.directory / "search.json", summary)
    out["search"] = result.directory / "search.json"
    return out


def _write_merge(path: Path, trial: Mapping[str, Any], why: str) -> None:
    header = (
        f"# Trial {trial['number']} of a schedule search, {why}: measured "
        f"{speedup_text({'speedup': trial['speedup'], **trial.get('timing', {})})}, "
        f"{trial['quality_key']} {trial['quality']:.4f}.\n"
    )
    again = trial.get("remeasured")
    if again:
        load = again.get("load") or {}
        busiest = max(load.values(), key=lambda m: m.get("load_1m") or 0.0) if load else {}
        header += (
            f"# Re-measured before choosing: {speedup_text(again)} over {len(again['times_ms'])} rounds"
            + (f", load average {busiest['load_1m']:.1f} on {busiest['cpus']} CPUs" if busiest.get("load_1m") is not None
               else "")
            + ".\n"
        )
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(dict(trial["merge"]))))


def front_table(result: SearchResult) -> str:
    """The front as a markdown table, fastest last."""
    by_number = {t["number"]: t for t in result.trials}
    lines = ["| trial | method | variant | schedule | speed-up (IQR) | quality |", "|---|---|---|---|---|---|"]
    for number in result.front:
        t = by_number[number]
        lines.append(
            f"| {number} | {t['merge']['method']} | {variant_text(t['merge'])} | {t['schedule']} | "
            f"{speedup_text({'speedup': t['speedup'], **t.get('timing', {})})} | "
            f"{t['quality_key']} {t['quality']:.4f} |"
        )
    return "\n".join(lines)


def variant_text(merge: Mapping[str, Any]) -> str:
    """The searched options of a merge that are not its method's defaults, or "-": the
    variants of its label."""
    return ", ".join(variant_parts(merge)) or "-"
