"""Glue between a composed config and the components: build, patch, evaluate, record.

``eval.py`` stays short by calling ``run_evaluation``; tests call it too, on composed configs.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

import spatialmerge
from spatialmerge import distributed
from spatialmerge.adapters.config import merge_options
from spatialmerge.adapters.registry import resolve_schedule
from spatialmerge.adapters.schedule import Schedule
from spatialmerge.models import model_info
from spatialmerge.results import RESULTS_FILE, environment, write_json_atomic

log = logging.getLogger(__name__)

# Evaluators whose numbers mean nothing with random weights.
ACCURACY_EVALUATORS = ("miou", "top1")


class AccuracyNeedsWeightsError(ValueError):
    """An accuracy evaluator was asked to run on a randomly initialised model."""


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets the component's own error through: Hydra wraps it
    in an InstantiationException whose text buries the message a user needs."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def resolve_merge(model: nn.Module, merge: Mapping[str, Any]) -> Schedule | None:
    """A ``merge`` config resolved on ``model``: what eval, train, search and pictures run and
    record. None for ``method: none``."""
    request = merge_options(merge)
    return None if request is None else resolve_schedule(model, **request)


@dataclass
class EvalContext:
    """Everything an evaluator may need; the dataset is built on first use only.

    The context hands out models and never changes one an evaluator holds: ``unmerged_model``
    is the model without any patch, ``merged_model`` a patched copy of it (built once), so an
    evaluator may keep both side by side.

    Attributes:
        model: the model to evaluate (a patch it carries, e.g. from fine-tuning with merging,
            is taken off: ``merge`` says what the merged copy runs).
        merge: ``patch`` keyword arguments, or None for the unmerged baseline.
        device: where to run.
        dataset_factory: builds the configured dataset; takes ``transform`` for ImageNet.
    """

    model: nn.Module
    merge: dict[str, Any] | None
    device: str
    dataset_factory: Callable[..., Any] | None = None
    _dataset: Any = field(default=None, repr=False)
    _merged: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        spatialmerge.unpatch(self.model)

    def dataset(self, transform: Callable[..., Any] | None = None) -> Any:
        """The configured dataset, built once; ``transform`` (e.g. the model's own eval
        transforms) goes to datasets that take one."""
        if self._dataset is None:
            if self.dataset_factory is None:
                raise ValueError("this evaluator needs a dataset; choose one with dataset=...")
            takes_transform = "transform" in inspect.signature(self.dataset_factory).parameters
            self._dataset = (
                self.dataset_factory(transform=transform) if takes_transform else self.dataset_factory()
            )
        return self._dataset

    def unmerged_model(self) -> nn.Module:
        """The model without any merge: the reference an accuracy is reported beside."""
        return self.model

    def merged_model(self) -> nn.Module:
        """The model with the configured merge applied: a patched copy, built on first use (the
        unmerged model itself when ``merge`` is None)."""
        if self.merge is None:
            return self.model
        if self._merged is None:
            self._merged = spatialmerge.patch(copy.deepcopy(self.model), **self.merge)
        return self._merged


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Build the model, apply the merge and run every configured evaluator.

    Returns ``{"merge": resolved patch kwargs, "metrics": {evaluator: {...}}, "notes": [...]}``.
    """
    distributed.resolve_device(str(cfg.device))  # before seconds go into building a model
    torch.manual_seed(cfg.seed)
    model: nn.Module = instantiate(cfg.model)
    # what the merge resolves to on this model (loc, rows and columns, grids, tokens), checked
    # before any evaluator spends time
    schedule = resolve_merge(model, cfg.merge)
    merge = None if schedule is None else schedule.options
    notes: list[str] = []
    evaluators = dict(cfg.evaluator)
    if cfg.model.get("checkpoint") is None:
        info = model_info(cfg.model.name)
        asked = [name for name in evaluators if name in ACCURACY_EVALUATORS]
        if asked:
            raise AccuracyNeedsWeightsError(
                f"evaluator {', '.join(asked)} measures accuracy and needs trained weights, but "
                f"model.checkpoint is null (random weights); set model.checkpoint=/path/to/"
                f"{info.checkpoint_file} ({info.where_to_get()})"
            )
        notes.append(
            "random weights: speed and FLOPs are real, accuracy needs a checkpoint "
            f"(model={cfg.model.name} model.checkpoint=/path/to/{info.checkpoint_file})"
        )
    ctx = EvalContext(model, merge, str(cfg.device), instantiate(cfg.dataset) if "dataset" in cfg else None)
    described = None if schedule is None else schedule.describe()
    return {"merge": merge, "schedule": described, "metrics": run_evaluators(cfg, ctx), "notes": notes}


def run_evaluators(
    cfg: DictConfig, ctx: EvalContext, suffix: str = "", timing: bool = True, into: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every evaluator of ``cfg.evaluator`` on ``ctx``, in order: ``{name + suffix: metrics}``,
    each with the seconds it took, for eval, train and search alike.

    Throughput runs on rank 0 only (timing is per device) and not at all with ``timing=False``
    (e.g. a second set of weights of the same model: timing does not depend on weights).
    ``into`` collects the metrics as they finish, so a caller keeps what was measured before an
    evaluator failed."""
    metrics: dict[str, Any] = {} if into is None else into
    evaluators = {
        name: instantiate(evaluator_cfg) for name, evaluator_cfg in dict(cfg.evaluator).items()
        if not (name == "throughput" and (not timing or not distributed.is_main()))
    }
    for evaluator in evaluators.values():  # settings that cannot run on this model, before any evaluator runs
        if hasattr(evaluator, "check"):
            evaluator.check(ctx.unmerged_model())
    for name, evaluator in evaluators.items():
        log.info("running evaluator %s%s", name, suffix)
        start = time.perf_counter()
        metrics[name + suffix] = evaluator.run(ctx)
        metrics[name + suffix]["seconds"] = time.perf_counter() - start
    return metrics


def record(
    run_dir: Path,
    cfg: DictConfig,
    outcome: Mapping[str, Any] | None,
    status: str,
    error: str | None,
    started: float,
) -> dict[str, Any]:
    """Write results.json (atomically) and return what was written."""
    payload = {
        "status": status,
        "error": error,
        "model": cfg.model.get("name"),
        "merge": None if outcome is None else outcome["merge"],
        "schedule": None if outcome is None else outcome.get("schedule"),
        "metrics": {} if outcome is None else outcome["metrics"],
        "notes": [] if outcome is None else outcome["notes"],
        "config": OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False),
        "environment": environment(str(cfg.device)),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": time.time() - started,
    }
    write_json_atomic(Path(run_dir) / RESULTS_FILE, payload)
    return payload
