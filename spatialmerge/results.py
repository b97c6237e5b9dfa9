"""results.json: what a run measured, with everything needed to trust and reproduce it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import torch

RESULTS_FILE = "results.json"


def environment(device: str) -> dict[str, Any]:
    """Versions, hardware and code revision a number was measured with."""
    import timm

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file in the same directory, then rename it to ``path``: a
    killed run leaves either the previous file or the complete new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the permissions any other new file would get, so
        # colleagues can read shared results
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """results.json and friends, written with ``atomic_write``."""
    atomic_write(path, lambda handle: handle.write(json.dumps(payload, indent=2, default=str).encode()))


def refuse_existing(path: Path, what: str) -> Path:
    """``path``, which a tool was asked to write (``--out``), unless a file is there already:
    ``what`` ("an export") never overwrites one."""
    if Path(path).exists():
        raise FileExistsError(f"{path} exists; {what} never overwrites a file: choose another --out")
    return Path(path)


def new_run_dir(log_dir: str | os.PathLike[str], tool: str) -> Path:
    """A directory of its own for one run of ``tool``: ``<log_dir>/<tool>/<time>``, created here
    (``<time>_2``, ``<time>_3``, ... when another run took that second), so two runs never
    share one."""
    base = Path(log_dir) / tool
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    path, taken = base / stamp, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            taken += 1
            path = base / f"{stamp}_{taken}"
