"""Glue between a composed config and the components: build, patch, evaluate, record.

``eval.py`` stays short by calling ``run_evaluation``; tests call it too, on composed configs.
"""

from __future__ import annotations

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
from spatialmerge.adapters import find_adapter
from spatialmerge.adapters.config import VARIANT_DEFAULTS, default_prop_attn
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


def model_default_loc(model: nn.Module) -> int:
    """The block a single merge goes before when ``merge.loc`` is null: a quarter of the depth
    (Hiera: the start of its third stage)."""
    adapter = find_adapter(model)
    return adapter.default_loc(adapter.target(model))


def merge_options(merge: Mapping[str, Any], default_loc: int) -> dict[str, Any] | None:
    """Turn a ``merge`` config into ``spatialmerge.patch`` keyword arguments.

    Precedence, so sweeps can set every key for every method: ``r`` (per-layer ToMe) >
    ``stages`` > ``r_h``/``r_w`` > ``ratio``; ``loc: null`` means ``default_loc``
    (:func:`model_default_loc`). Returns None for ``method: none``.
    """
    options = dict(OmegaConf.to_container(OmegaConf.create(dict(merge)), resolve=True))
    method = options.pop("method")
    if method == "none":
        return None
    schedule_keys = ("loc", "ratio", "r_h", "r_w", "stages", "r")
    schedule = {k: options.pop(k, None) for k in schedule_keys}
    if schedule["r"] is not None:
        # ratio is every tome config's default; an explicit grid schedule beside r is a config
        # that would not run as written
        clash = [k for k in ("loc", "r_h", "r_w", "stages") if schedule[k] not in (None, [], ())]
        if clash:
            raise ValueError(
                f"merge.r={schedule['r']} is per-layer ToMe, which has no grid schedule, but "
                f"{', '.join(f'merge.{k}={schedule[k]}' for k in clash)} "
                f"{'is' if len(clash) == 1 else 'are'} set too; unset "
                f"{'it' if len(clash) == 1 else 'them'} ({' '.join(f'merge.{k}=null' for k in clash)}) "
                "or drop merge.r for single-layer ToMe on the grid"
            )
        chosen: dict[str, Any] = {"r": schedule["r"]}
    elif schedule["stages"]:
        chosen = {"stages": schedule["stages"]}
    else:
        loc = schedule["loc"] if schedule["loc"] is not None else default_loc
        if schedule["r_h"] is not None or schedule["r_w"] is not None:
            chosen = {"loc": loc, "r_h": schedule["r_h"], "r_w": schedule["r_w"]}
        else:
            chosen = {"loc": loc, "ratio": schedule["ratio"]}
    # what runs, not only what was asked: null is the method's own default
    if options.get("prop_attn") is None:
        options["prop_attn"] = default_prop_attn(method, "r" in chosen)
    return {"method": method, **chosen, **options}


def with_backbone_defaults(model: nn.Module, merge: dict[str, Any] | None) -> dict[str, Any] | None:
    """``merge`` with the Expedite options it leaves unset filled in from the backbone's reference
    settings, so a record (or a picture's title) says what runs, not only what was asked."""
    if merge is None or merge["method"] != "expedite":
        return merge
    defaults = find_adapter(model).expedite_defaults
    return {**merge, **{k: v for k, v in defaults.items() if merge.get(k) is None}}


@dataclass
class EvalContext:
    """Everything an evaluator may need; the dataset is built on first use only.

    Attributes:
        model: the unmerged model.
        merge: ``patch`` keyword arguments, or None for the unmerged baseline.
        device: where to run.
        dataset_factory: builds the configured dataset; takes ``transform`` for ImageNet.
    """

    model: nn.Module
    merge: dict[str, Any] | None
    device: str
    dataset_factory: Callable[..., Any] | None = None
    _dataset: Any = field(default=None, repr=False)

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
        return spatialmerge.unpatch(self.model)

    def merged_model(self) -> nn.Module:
        """The model with the configured merge applied (unmerged when ``merge`` is None)."""
        spatialmerge.unpatch(self.model)
        if self.merge is not None:
            spatialmerge.patch(self.model, **self.merge)
        return self.model


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Build the model, apply the merge and run every configured evaluator.

    Returns ``{"merge": resolved patch kwargs, "metrics": {evaluator: {...}}, "notes": [...]}``.
    """
    distributed.resolve_device(str(cfg.device))  # before seconds go into building a model
    torch.manual_seed(cfg.seed)
    model: nn.Module = instantiate(cfg.model)
    merge = with_backbone_defaults(model, merge_options(cfg.merge, model_default_loc(model)))
    # what the merge resolves to on this model (loc, rows and columns, grids, tokens), checked
    # before any evaluator spends time
    schedule = None if merge is None else spatialmerge.describe_schedule(model, **merge)
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
    return {"merge": merge, "schedule": schedule, "metrics": run_evaluators(cfg, ctx), "notes": notes}


def run_evaluators(cfg: DictConfig, ctx: EvalContext) -> dict[str, Any]:
    """Every evaluator of ``cfg.evaluator`` on ``ctx``, in order: ``{name: metrics}``, each
    with the seconds it took."""
    metrics: dict[str, Any] = {}
    for name, evaluator_cfg in dict(cfg.evaluator).items():
        evaluator = instantiate(evaluator_cfg)
        if name == "throughput" and not distributed.is_main():
            continue  # timing is per device; rank 0's is the one reported
        log.info("running evaluator %s", name)
        start = time.perf_counter()
        metrics[name] = evaluator.run(ctx)
        metrics[name]["seconds"] = time.perf_counter() - start
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


def format_summary(payload: Mapping[str, Any]) -> str:
    """A readable text table of a run's results, for the terminal."""
    lines = [f"model: {payload['model']}   merge: {_merge_text(payload['merge'])}"]
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
            f"{setup['iters']} rounds; img/s: median round, speed-up: median of per-round ratios):"
        )
        header = (
            f"  {'variant':<10} {'tokens':>7} {'GFLOPs':>9} {'img/s':>9} {'speed-up':>9} "
            f"{'(IQR over rounds)':>18} {'FLOP-ideal':>11}"
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
                + ("  noisy" if row.get("noisy") else "")
            )
            if row.get("noisy"):
                noisy.append(f"{name}: {'; '.join(row.get('noise') or ['spread'])}")
        for text in noisy:
            lines.append(
                f"  warning: noisy timing, {text}; time on an idle machine or raise "
                "evaluator.throughput.iters (the FLOP-ideal column does not depend on the machine)"
            )
    for name, values in metrics.items():
        if name == "throughput":
            continue
        shown = ", ".join(  # lists (e.g. skipped file names) stay in results.json
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in values.items()
            if k != "seconds" and not isinstance(v, list)
        )
        lines.append(f"{name}: {shown}")
    lines.extend(f"note: {note}" for note in payload.get("notes", []))
    return "\n".join(lines)


def _merge_text(merge: Mapping[str, Any] | None) -> str:
    if merge is None:
        return "none"
    keys = ("loc", "ratio", "r_h", "r_w", "stages", "r")
    text = merge["method"] + " " + " ".join(f"{k}={merge[k]}" for k in keys if merge.get(k) is not None)
    # the variants that change what ran, where they are not the defaults
    text += "".join(
        f" {k}={merge[k]}" for k, default in VARIANT_DEFAULTS.items() if merge.get(k) not in (None, default)
    )
    return text + (" prop_attn" if merge.get("prop_attn") else "")
