"""The logger interface every run uses: start, log, finish (always, even when the job fails)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


class RunLogger:
    """Base class: a logger that records nothing. Subclasses override what they support.

    ``start`` is called once with the run directory, the resolved config and a group name (for
    a multirun's jobs :func:`sweep_group`, else None); ``finish`` is called exactly once, with
    ``status`` ``"ok"`` or ``"failed"``, also when the job raised.
    """

    def start(self, run_dir: Path, config: Mapping[str, Any], name: str, group: str | None) -> None:
        pass

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def update_config(self, values: Mapping[str, Any]) -> None:
        """Add what is only known once the job ran (e.g. the resolved merge schedule)."""

    def rename(self, name: str) -> None:
        """The run's name once the job resolved what it ran (``start`` only knew the request)."""

    def rewind(self, step: int) -> None:
        """A resumed run continues from ``step``: history logged after it (by the run that was
        killed after its last checkpoint) is about to be logged again and must not count twice."""

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_image(self, name: str, path: Path) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class NullLogger(RunLogger):
    """Logs nothing; results.json is still written by the run itself."""


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a/b": 1}: the key style W&B charts and tables expect."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def sweep_group(hydra_cfg: Any, overrides: list[str], sweep_dir: Path) -> str:
    """The logger group of a multirun's jobs, named after the sweep: its sweep config (or the
    task), the keys it sweeps (``overrides`` as the command line gave them, and the sweep
    config's ``hydra.sweeper.params``) and its directory, named when it started, e.g. ``sam_schedules: merge.ratio,
    merge (2026-12-03_16-45-29)``; the time keeps two runs of one sweep apart."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    name = hydra_cfg.runtime.choices.get("sweep") or str(hydra_cfg.job.name)
    given = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    keys = [o.key_or_group for o in given if o.is_sweep_override()]
    keys += [str(k) for k in (hydra_cfg.sweeper.get("params") or {}) if str(k) not in keys]
    return f"{name}: {', '.join(keys) or 'no swept key'} ({Path(sweep_dir).name})"
