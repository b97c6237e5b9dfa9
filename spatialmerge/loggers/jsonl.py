"""Metrics as JSON lines in the run directory: greppable, appendable, no account needed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from spatialmerge.loggers.base import RunLogger
from spatialmerge.results import atomic_write


class JsonlLogger(RunLogger):
    """Appends one JSON object per ``log``/``summary``/``finish`` call to ``metrics.jsonl``."""

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        self.filename = filename
        self.path: Path | None = None

    def start(self, run_dir: Path, config: Mapping[str, Any], name: str, group: str | None) -> None:
        self.path = Path(run_dir) / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write({"event": "start", "name": name, "group": group})

    def _write(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"time": time.time(), **record}, default=str) + "\n")

    def rename(self, name: str) -> None:
        self._write({"event": "rename", "name": name})

    def rewind(self, step: int) -> None:
        """Drop the ``log`` rows after ``step`` (written before the kill, replayed by the resume)
        and note the resume, rewriting the file atomically."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut off by the kill
            if record.get("event") == "log" and isinstance(record.get("step"), int) and record["step"] > step:
                continue
            kept.append(json.dumps(record, default=str))
        text = "\n".join(kept) + ("\n" if kept else "")
        atomic_write(self.path, lambda handle: handle.write(text.encode()))
        self._write({"event": "resume", "step": step})

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._write({"event": "log", "step": step, "metrics": dict(metrics)})

    def summary(self, metrics: Mapping[str, Any]) -> None:
        self._write({"event": "summary", "metrics": dict(metrics)})

    def finish(self, status: str) -> None:
        self._write({"event": "finish", "status": status})
        self.path = None
