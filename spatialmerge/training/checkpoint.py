"""Resumable training checkpoints: written atomically, read back with ``weights_only=True``.

A checkpoint holds everything that decides what the next update does: model, optimizer,
scheduler, grad scaler and EMA states, the update count, and every process's random states
(torch, CUDA, numpy, python). Random states are stored as tensors and plain lists, never as
pickled objects, so a file can be loaded without trusting it. Its ``model`` entry is a plain
state dict, so ``eval.py model.checkpoint=<file>`` evaluates the fine-tuned weights directly.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spatialmerge.results import atomic_write

FORMAT = "spatialmerge-train-1"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.pt$")


class TrainingCheckpointError(ValueError):
    """A training checkpoint cannot be resumed from: unreadable, foreign, or for another run.

    Args:
        path: the file.
        reason: what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(
            f"cannot resume from '{path}': {reason}. Resume with the settings that wrote it, point "
            "trainer.resume at another checkpoint, or start afresh in a new run directory "
            "(trainer.resume=null without hydra.run.dir)"
        )
        self.path = str(path)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def newest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's random states as tensors and lists (``weights_only``-safe)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(words), "gauss": gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    """Put back what :func:`capture_rng` recorded."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` through ``atomic_write``: a kill leaves the previous checkpoint or the
    complete new one, never a truncated file under a checkpoint name."""
    atomic_write(path, lambda handle: torch.save({"format": FORMAT, **payload}, handle))


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    for _, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint without running code from it.

    Raises:
        TrainingCheckpointError: the file is missing, unreadable, refused by ``weights_only``,
            or not a checkpoint this trainer wrote.
    """
    if not path.is_file():
        raise TrainingCheckpointError(path, "no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise TrainingCheckpointError(
            path, f"it holds Python objects that weights_only loading refuses ({str(err).splitlines()[0]})"
        ) from err
    except Exception as err:  # truncated or corrupt files fail anywhere inside torch.load
        raise TrainingCheckpointError(
            path, f"the file is corrupt or not a PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TrainingCheckpointError(
            path,
            f"it is not a training checkpoint written by train.py (no format tag {FORMAT!r}); "
            "to start from a weights file use model.checkpoint=<file> instead",
        )
    return payload


def load_model_state(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """``model.load_state_dict`` that names the file and the first differences on a mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (model {list(expected[k].shape)}, file {list(v.shape)})"
        for k, v in state.items()
        if k in expected and expected[k].shape != v.shape
    ]
    kinds = (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch(es)", shapes))
    problems = [
        f"{len(keys)} {what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for what, keys in kinds
        if keys
    ]
    if problems:
        raise TrainingCheckpointError(path, "its model weights do not fit this model: " + "; ".join(problems))
    model.load_state_dict(state)
