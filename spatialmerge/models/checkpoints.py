"""Load weights files safely, and say exactly what is wrong when a file does not fit.

Checkpoints are data, never code: ``.pth`` / ``.pt`` / ``.bin`` go through
``torch.load(weights_only=True)``, which refuses any pickle that would build arbitrary Python
objects, and ``.safetensors`` cannot hold code at all.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import Tensor, nn

from spatialmerge.models.info import model_info

StateDict = dict[str, Tensor]
FilterFn = Callable[[StateDict, nn.Module], StateDict]
PathLike = str | os.PathLike[str]

# Keys the message lists per kind of problem: enough to recognise the file, short enough to read.
_MAX_LISTED = 5
# Wrappers that trainers put around a state dict ("model" DeiT / timm, "state_dict" Lightning,
# "module" some DDP savers) and the prefixes DDP (``module.``) and torch.compile
# (``_orig_mod.``) put in front of every key.
_CONTAINER_KEYS = ("model", "state_dict", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _config_hint(model_name: str | None) -> str:
    if model_name is None:
        return "set model.checkpoint=/path/to/<weights file>"
    info = model_info(model_name)
    return (
        f"the official weights for {model_name!r} are {info.where_to_get()}; download that file "
        f"and set model.checkpoint=/path/to/{info.checkpoint_file}"
    )


def missing_checkpoint_message(path: PathLike, model_name: str | None = None) -> str:
    """The message for a checkpoint path that holds no file.

    Args:
        path: the path that was looked at.
        model_name: registry name of the model being loaded; lets the message name the official
            file and where it comes from.
    """
    target = f" for model {model_name!r}" if model_name else ""
    return f"no checkpoint file at '{path}'{target}: {_config_hint(model_name)}"


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint path holds no file.

    Args:
        path: the path that was looked at.
        model_name: registry name of the model being loaded, if known.
    """

    def __init__(self, path: PathLike, model_name: str | None = None) -> None:
        super().__init__(missing_checkpoint_message(path, model_name))
        self.path = str(path)
        self.model_name = model_name


class CheckpointFormatError(ValueError):
    """The file exists but is not a readable, code-free checkpoint.

    Args:
        path: the file.
        reason: what is wrong with it.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(f"cannot load checkpoint '{path}': {reason}")
        self.path = str(path)


class CheckpointMismatchError(ValueError):
    """The file is a checkpoint, but its keys or shapes do not fit the model.

    Args:
        path: the file.
        missing: model keys the file lacks.
        unexpected: file keys the model lacks.
        shapes: ``(key, model shape, file shape)`` for keys present in both with different shapes.
        model_name: registry name of the model, if known; lets the message name the right file.
        reason: a problem found while converting the file's keys, instead of the lists above.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        shapes: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
        model_name: str | None = None,
        reason: str = "",
    ) -> None:
        problems = [reason] if reason else []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if shapes:
            listed = _listing([f"{k} (model {list(m)}, file {list(f)})" for k, m, f in shapes])
            problems.append(f"{len(shapes)} shape mismatch(es): {listed}")
        target = f"model {model_name!r}" if model_name else "the model"
        super().__init__(
            f"checkpoint '{path}' does not fit {target}: {'; '.join(problems)}. "
            f"Is it the right file? {_config_hint(model_name)}"
        )
        self.path = str(path)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.shapes = list(shapes)


def _listing(keys: Sequence[str]) -> str:
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _unpickling_refusal(err: pickle.UnpicklingError) -> str:
    # torch's own text suggests retrying with weights_only=False, the one thing we must not do;
    # keep only its diagnosis (e.g. "Unsupported global: GLOBAL posix.system").
    text = str(err)
    marker = "WeightsUnpickler error:"
    detail = ""
    if marker in text:
        detail = " ".join(text.split(marker, 1)[1].split("Check the documentation", 1)[0].split())
    return (
        "it is a pickle holding Python objects other than tensors and plain containers, and "
        "unpickling it could run code, so it is refused (torch.load(weights_only=True))"
        + (f" [{detail}]" if detail else "")
        + ". Re-save only its tensors (torch.save(model.state_dict(), ...) or safetensors) "
        "in a session where you trust the file"
    )


def _read_file(path: Path) -> object:
    if path.suffix.lower() == ".safetensors":
        try:
            return load_safetensors(path, device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError, among others
            raise CheckpointFormatError(path, f"not a valid safetensors file ({err})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointFormatError(path, _unpickling_refusal(err)) from err
    except Exception as err:
        # A text file, a truncated download or a foreign format fails deep inside torch.load
        # with whatever the unpickler tripped on (KeyError, EOFError, RuntimeError, ...).
        raise CheckpointFormatError(
            path,
            f"not a PyTorch weights file ({type(err).__name__}: {err}); "
            "expected .pth / .pt / .bin saved by torch.save, or .safetensors",
        ) from err


def _unwrap(obj: object, path: Path) -> StateDict:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            path, f"it holds a {type(obj).__name__}, not a state dict (a mapping of name -> tensor)"
        )
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointFormatError(
            path,
            f"expected a state dict of tensors, but {_listing([str(k) for k in not_tensors])} "
            "are not tensors",
        )
    state = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: PathLike, *, model_name: str | None = None) -> StateDict:
    """Read a weights file into a plain state dict, without running any code from it.

    Common containers are unwrapped (``{"model": sd}``, ``{"state_dict": sd}``) and a prefix
    that every key shares from DDP (``module.``) or torch.compile (``_orig_mod.``) is removed.

    Args:
        path: ``.pth`` / ``.pt`` / ``.bin`` (read by ``torch.load(weights_only=True)``) or
            ``.safetensors``. Any other suffix is read as a torch file.
        model_name: registry name of the model the file is for; only improves error messages.

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        CheckpointFormatError: the file is corrupt, not a checkpoint, or would run code.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointNotFoundError(file, model_name)
    return _unwrap(_read_file(file), file)


def load_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    filter_fn: FilterFn | None = None,
    strict: bool = True,
    model_name: str | None = None,
) -> None:
    """Load a weights file into ``model`` in place.

    Args:
        model: the module to fill.
        path: the weights file; see :func:`read_state_dict` for the formats.
        filter_fn: converts the file's keys to the model's, ``filter_fn(state_dict, model)``
            (e.g. timm's ``checkpoint_filter_fn`` for official SAM / DINOv3 files). A ValueError
            it raises is reported as a mismatch.
        strict: if True, every model key must be in the file and every file key in the model.
            If False, missing and unexpected keys only warn. Shapes must always match.
        model_name: registry name of the model; lets errors name the official file.

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        CheckpointFormatError: the file is corrupt, not a checkpoint, or would run code.
        CheckpointMismatchError: the file's keys or shapes do not fit ``model``.
    """
    file = Path(path).expanduser()
    state = read_state_dict(file, model_name=model_name)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except ValueError as err:
            raise CheckpointMismatchError(file, model_name=model_name, reason=str(err)) from err

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        (k, tuple(expected[k].shape), tuple(v.shape))
        for k, v in state.items()
        if k in expected and expected[k].shape != v.shape
    ]
    if shapes or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(
            file,
            missing=missing if strict else (),
            unexpected=unexpected if strict else (),
            shapes=shapes,
            model_name=model_name,
        )
    if missing or unexpected:
        warnings.warn(
            f"non-strict load of '{file}': {len(missing)} model key(s) left as initialised "
            f"({_listing(missing)}), {len(unexpected)} file key(s) ignored "
            f"({_listing(unexpected)})",
            stacklevel=2,
        )
    model.load_state_dict(state, strict=strict)
