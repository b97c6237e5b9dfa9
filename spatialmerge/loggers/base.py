"""The logger interface every run uses: start, log, finish (always, even when the job fails)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


class RunLogger:
    """Base class: a logger that records nothing. Subclasses override what they support.

    ``start`` is called once with the run directory, the resolved config and a group name (the
    sweep's directory for multiruns, else None); ``finish`` is called exactly once, with
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
