"""Deploy a merged encoder: an ONNX file for onnxruntime, or a ``torch.export`` program.

A grid merge keeps every shape static (the grid after a merge depends only on the schedule),
so the merged forward traces to one graph: the exporters see plain tensor code, the merge
included. What is exported is the part of the model merging speeds up, the module the
throughput evaluator times (SAM: the image encoder ``SamPredictor`` runs; SAM 2: the trunk and
neck ``SAM2ImagePredictor`` runs; ViT / DeiT / DINOv2 / DINOv3 and ``transformers`` models:
their own forward).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from spatialmerge.adapters import find_adapter

Format = Literal["onnx", "export"]
FORMATS: tuple[str, ...] = ("onnx", "export")
SUFFIX = {"onnx": ".onnx", "export": ".pt2"}


class Exported(nn.Module):
    """The module an exporter traces: the model's encoder called on one image batch."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Any:
        return self.encoder(images)


def export_target(model: nn.Module) -> nn.Module:
    """The part of ``model`` a deployment runs and merging speeds up (see the module doc)."""
    return find_adapter(model).timed_module(model)


def check_exportable(model: nn.Module, fmt: str) -> None:
    """Refuse, before any tracing, what an exporter cannot convert, naming the fix."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    if fmt == "onnx" and isinstance(export_target(model), VisionTransformerSAM):
        raise ValueError(
            "timm's samvit calls scaled_dot_product_attention on 3D tensors, which the ONNX "
            "exporter cannot convert (merged or not); export segment-anything's SAM instead "
            "(model=sam_b), or a torch.export program (--format export)"
        )


def export(model: nn.Module, images: Tensor, path: Path, fmt: Format = "onnx") -> Path:
    """Write the encoder of ``model`` (merged or not, as it is patched) traced on ``images``
    (B, 3, H, W) to ``path``: an ONNX file (``fmt="onnx"``, the dynamo exporter) or a
    ``torch.export`` program (``"export"``, ``.pt2``). Shapes are static, as the merge's are."""
    check_exportable(model, fmt)
    module = Exported(export_target(model)).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "onnx":
            # the exporter logs every decomposition it tries at INFO
            logging.getLogger("torch.onnx").setLevel(logging.WARNING)
            program = torch.onnx.export(module, (images,), dynamo=True, verbose=False)
            program.save(str(path))
        else:
            torch.export.save(torch.export.export(module, (images,)), str(path))
    return path


def outputs(run: Any, images: Tensor) -> list[Tensor]:
    """The tensors ``run(images)`` returns (an encoder, an onnxruntime session, a loaded
    program), flattened in the order the exporters flatten them."""
    with torch.no_grad():
        return [t for t in tree_leaves(run(images)) if isinstance(t, Tensor)]


def eager_outputs(model: nn.Module, images: Tensor) -> list[Tensor]:
    """What the exported file must reproduce: the encoder's outputs, flattened."""
    return outputs(Exported(export_target(model)).eval(), images)


class OnnxRunner:
    """An onnxruntime session of an exported file on CPU, called like the encoder on a batch."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: Tensor) -> list[Tensor]:
        outputs = self.session.run(None, {self.input: images.cpu().numpy()})
        return [torch.from_numpy(np.asarray(out)) for out in outputs]


def load_program(path: Path) -> Any:
    """A saved ``torch.export`` program's module, called like the encoder."""
    return torch.export.load(str(path)).module()


def max_difference(expected: list[Tensor], actual: list[Tensor]) -> float:
    """Largest absolute difference over every output; the outputs must match in number and
    shape (a mismatch is an error, never a small number)."""
    if len(expected) != len(actual):
        raise ValueError(f"the exported file returns {len(actual)} outputs, the model {len(expected)}")
    worst = 0.0
    for e, a in zip(expected, actual):
        if tuple(e.shape) != tuple(a.shape):
            raise ValueError(f"an exported output has shape {tuple(a.shape)}, the model's {tuple(e.shape)}")
        worst = max(worst, float((e.float() - a.float()).abs().max()) if e.numel() else 0.0)
    return worst


class OnnxImageEncoder(nn.Module):
    """An exported SAM image encoder in onnxruntime, in place of ``sam.image_encoder``, so
    segment-anything's ``SamPredictor`` (and the mask decoder after it) runs on the deployed
    file unchanged: ``sam.image_encoder = OnnxImageEncoder(path, sam.image_encoder.img_size)``.

    forward: (B, 3, img_size, img_size) normalised, padded images -> (B, C, H', W') embeddings.
    """

    def __init__(self, path: Path, img_size: int, threads: int | None = None) -> None:
        super().__init__()
        self.img_size = img_size  # SamPredictor resizes and pads to it
        self.runner = OnnxRunner(path, threads)

    def forward(self, images: Tensor) -> Tensor:
        return self.runner(images)[0].to(images.device)
