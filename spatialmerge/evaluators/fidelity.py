"""Label-free fidelity: how much merging changes a model's output, on any folder of images.

The unmerged model and a merged copy see the same inputs and their outputs are compared, so no
labels are needed and users can run ablations on their own photos. What is compared depends on
what the model produces:

- ``"sam"`` (segment-anything ``Sam`` or sam2 ``SAM2Base``): per image, the masks both models predict for the same
  regular grid of point prompts (as ``SamAutomaticMaskGenerator`` lays them out, label 1,
  ``multimask_output=False``, thresholded at original resolution), and the image embeddings.
- ``"classifier"`` (timm ``VisionTransformer`` / DeiT with a head): top-1 agreement, KL of the
  softmax outputs and top-5 overlap.
- ``"features"`` (timm ``Eva`` / DINOv3, ``VisionTransformerSAM`` and headless ViTs such as
  DINOv2): cosine similarity of the dense patch features, recovered to the full grid, and of the
  CLS token (or pooled output), and how many patches keep their segment in a k-means
  segmentation of the unmerged features.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import build_point_grid
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

import spatialmerge
from spatialmerge.adapters import Adapter, find_adapter
from spatialmerge.adapters.adapter import OutputKind
from spatialmerge.data.coco import collate_list
from spatialmerge.distributed import all_reduce_sum, shard_indices
from spatialmerge.evaluators.base import DatasetEvaluator
from spatialmerge.evaluators.metrics import (
    FIDELITY_PERCENT,
    Means,
    check_finite,
    mask_iou,
    segment_agreement,
)
from spatialmerge.evaluators.prompting import PromptPredictor

if TYPE_CHECKING:
    from spatialmerge.pipeline import EvalContext

log = logging.getLogger(__name__)

# the metrics reported in percent
PERCENT = FIDELITY_PERCENT

_SUPPORTED = (
    "segment_anything.modeling.Sam, sam2 SAM2Base, transformers ViT / DeiT / DINOv2 / DINOv3 "
    "models, timm VisionTransformer (DeiT; a classifier when "
    "num_classes > 0, else a feature backbone), timm Eva (DINOv3) and timm VisionTransformerSAM"
)


def model_kind(model: nn.Module) -> OutputKind:
    """Which comparison fits ``model``: ``"sam"``, ``"classifier"`` or ``"features"``."""
    return _comparison(model)[1]


def _comparison(model: nn.Module) -> tuple[Adapter, OutputKind]:
    """The adapter of ``model`` and the kind of output it compares; TypeError, with what to pass
    instead where the adapter knows, for a model whose output fidelity cannot compare."""
    try:
        adapter: Adapter | None = find_adapter(model)
    except TypeError:  # no family of spatialmerge's: refused below with what fidelity supports
        adapter = None
    kind = adapter.kind(model) if adapter is not None else None
    if adapter is None or kind is None:
        hint = f"; {adapter.whole_model_hint}" if adapter is not None and adapter.whole_model_hint else ""
        raise TypeError(
            f"the fidelity evaluator does not support {type(model).__module__}."
            f"{type(model).__qualname__}; supported: {_SUPPORTED}{hint}"
        )
    return adapter, kind


def fidelity_map(
    unmerged: Tensor, merged: Tensor, layout: Literal["NCHW", "NHWC"] = "NCHW"
) -> Tensor:
    """Cosine similarity of merged vs unmerged features at every grid position.

    Args:
        unmerged, merged: dense features of the same shape, (B, C, H, W) for ``layout="NCHW"``
            or (B, H, W, C) for ``"NHWC"``.

    Returns:
        (B, H, W) float32 in [-1, 1]: 1 where merging left the feature's direction unchanged.
    """
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout={layout!r} is not supported; choose NCHW or NHWC")
    if unmerged.shape != merged.shape or unmerged.dim() != 4:
        raise ValueError(
            f"unmerged and merged must be dense features of one shape, (B, C, H, W) or "
            f"(B, H, W, C); got {tuple(unmerged.shape)} and {tuple(merged.shape)}"
        )
    return _cosine(unmerged, merged, dim=1 if layout == "NCHW" else -1)  # (B, H, W)


def _cosine(a: Tensor, b: Tensor, dim: int) -> Tensor:
    # Rounding can put the cosine of (nearly) parallel float32 vectors a hair above 1.
    return F.cosine_similarity(a.float(), b.float(), dim=dim).clamp(-1.0, 1.0)


def logit_fidelity(unmerged: Tensor, merged: Tensor) -> dict[str, Tensor]:
    """Per-sample agreement of two classifiers' logits (N, classes).

    Returns (N,) float tensors: ``top1_agreement`` (1 where the argmax is the same) and ``kl``
    (KL(softmax(unmerged) || softmax(merged)) in nats: the information the merged model loses
    about the unmerged model's prediction).
    """
    _check_logits(unmerged, merged)
    log_p = F.log_softmax(unmerged.float(), dim=1)  # (N, classes)
    log_q = F.log_softmax(merged.float(), dim=1)
    return {
        "top1_agreement": (log_p.argmax(1) == log_q.argmax(1)).float(),
        "kl": (log_p.exp() * (log_p - log_q)).sum(1),
    }


def topk_overlap(unmerged: Tensor, merged: Tensor, k: int = 5) -> Tensor:
    """Share of the unmerged top-k classes that are also in the merged top-k: (N,) in [0, 1].

    k must be below the number of classes: with k equal to it the overlap is 1 by construction.
    """
    _check_logits(unmerged, merged)
    if not 1 <= k < unmerged.shape[1]:
        raise ValueError(
            f"k={k} must be in [1, {unmerged.shape[1] - 1}] (below the number of classes)"
        )
    top_p = unmerged.topk(k, dim=1).indices  # (N, k)
    top_q = merged.topk(k, dim=1).indices
    return (top_p[:, :, None] == top_q[:, None, :]).any(2).sum(1).float() / k  # (N,)


def _check_logits(unmerged: Tensor, merged: Tensor) -> None:
    if unmerged.shape != merged.shape or unmerged.dim() != 2:
        raise ValueError(
            f"logits must both be (N, classes) of one shape, got {tuple(unmerged.shape)} and "
            f"{tuple(merged.shape)}"
        )


class FidelityEvaluator(DatasetEvaluator):
    """Compares a merged model's outputs with the same model unmerged; needs no labels.

    Args:
        max_images: use at most the dataset's first ``max_images`` images; None for all.
        points_per_side: SAM only: prompts are a ``points_per_side`` x ``points_per_side`` grid.
        segments: feature backbones: k of the k-means segmentation whose agreement is reported.
        batch_size: images per forward for timm models (SAM runs one image at a time).
        num_workers: DataLoader processes decoding and transforming images.
        progress: show a tqdm bar (on rank 0 only).

    Under torch.distributed each rank compares a disjoint shard and the sums are all-reduced, so
    every rank returns the numbers one process would.
    """

    def __init__(
        self,
        max_images: int | None = None,
        points_per_side: int = 4,
        segments: int = 6,
        batch_size: int = 8,
        num_workers: int = 2,
        progress: bool = True,
    ) -> None:
        super().__init__(max_images, num_workers, progress, config_key="evaluator")
        if points_per_side < 1 or batch_size < 1 or segments < 1:
            raise ValueError(
                f"evaluator.points_per_side={points_per_side}, evaluator.segments={segments} and "
                f"evaluator.batch_size={batch_size} must be >= 1"
            )
        self.points_per_side = points_per_side
        self.segments = segments
        self.batch_size = batch_size

    def evaluate(
        self,
        model: nn.Module,
        merge: dict[str, Any] | None,
        dataset: Dataset,
        device: str | torch.device = "cpu",
    ) -> dict[str, Any]:
        """Compare ``model`` unmerged with a copy patched by ``spatialmerge.patch(**merge)``.

        ``model`` is unpatched in place, put in eval mode on ``device`` and otherwise left
        alone. The dataset yields (H, W, 3) uint8 images for SAM and (3, H, W) tensors for timm
        models (an (image, label) pair or a dict with an "image" also works).

        Returns ``{"kind", "images", ...}`` with, for ``"sam"``: ``mask_iou`` (%, mean over all
        prompts) and ``embedding_cosine``; ``"classifier"``: ``top1_agreement`` (%), ``kl``
        (nats) and, with more than 5 classes, ``top5_overlap`` (%); ``"features"``:
        ``feature_cosine`` (mean over patch positions), ``cls_cosine`` (models pooled by their
        CLS token) or ``pooled_cosine`` (other pooling), and ``segment_agreement`` (%). With ``merge`` None the model is compared with itself: perfect by construction.
        """
        adapter, kind = _comparison(model)
        device = torch.device(device)
        total = len(dataset)
        if total == 0:
            where = getattr(dataset, "root", repr(dataset))
            raise ValueError(
                f"the dataset at {where} holds no images; point dataset.root at a folder of images"
            )
        model = spatialmerge.unpatch(model).to(device).eval()
        if merge is None:
            log.info("no merge configured: the model is compared with itself (perfect fidelity)")
            merged = model
        else:
            options = dict(merge)
            if kind == "features":
                # Dense features must line up with the unmerged grid token for token.
                options["recover"] = True
            merged = spatialmerge.patch(copy.deepcopy(model), **options)
        count = self.image_count(total)
        shard = Subset(dataset, shard_indices(count))
        with torch.inference_mode():
            if kind == "sam":
                sums = self._compare_sam(model, merged, shard)
            else:
                sums = self._compare_batches(adapter, model, merged, shard, device, kind)
        reduced = Means(sums.names, PERCENT)
        reduced.merge(all_reduce_sum(sums.state()))
        return {"kind": kind, **reduced.compute(), "images": count}

    def qualities(self) -> tuple[str, ...]:
        """Every kind's agreements; one model reports those of its kind (see ``evaluate``). The
        KL divergence falls as agreement grows, so it is not one."""
        return (
            "mask_iou", "embedding_cosine", "top1_agreement", "top5_overlap",
            "feature_cosine", "cls_cosine", "pooled_cosine", "segment_agreement",
        )

    def run(self, ctx: "EvalContext") -> dict[str, Any]:
        """Pipeline entry: SAM gets raw images, other models their own eval transforms."""
        adapter, kind = _comparison(ctx.model)
        transform = None if kind == "sam" else adapter.eval_transform(ctx.model)
        return self.evaluate(ctx.model, ctx.merge, ctx.dataset(transform=transform), ctx.device)

    def _compare_sam(self, sam: nn.Module, merged: nn.Module, shard: Subset) -> Means:
        unmerged_predictor = PromptPredictor(sam, metric="fidelity")
        merged_predictor = unmerged_predictor if merged is sam else PromptPredictor(merged, metric="fidelity")
        loader = DataLoader(
            shard, batch_size=1, num_workers=self.num_workers, collate_fn=collate_list
        )
        sums = Means(percent=PERCENT)
        for (item,) in self.bar(loader, "fidelity (sam)", "img"):
            image = np.asarray(_image(item))  # (H, W, 3) uint8
            embedding, masks = self._sam_outputs(unmerged_predictor, image)
            if merged_predictor is not unmerged_predictor:
                merged_embedding, merged_masks = self._sam_outputs(merged_predictor, image)
            else:
                merged_embedding, merged_masks = embedding, masks
            # Every image has the same number of prompts, so this per-prompt sum over images
            # is also the per-image mean.
            sums.update(
                {
                    "mask_iou": mask_iou(merged_masks, masks).mean(),
                    "embedding_cosine": fidelity_map(embedding, merged_embedding).mean(),
                },
                count=1,
            )
        unmerged_predictor.reset()
        merged_predictor.reset()
        return sums

    def _sam_outputs(self, predictor: PromptPredictor, image: np.ndarray) -> tuple[Tensor, Tensor]:
        """The image embedding (1, C, h, w) and the (K, H, W) bool masks of the point grid."""
        predictor.set_image(image)
        height, width = image.shape[:2]
        # As SamAutomaticMaskGenerator: cell centres of a regular grid, scaled to (x, y) pixels.
        points = build_point_grid(self.points_per_side) * np.array([[width, height]])  # (K, 2)
        masks = predictor.masks(points=points)  # one foreground click per prompt
        return predictor.image_embedding(), masks

    def _compare_batches(
        self,
        adapter: Adapter,
        model: nn.Module,
        merged: nn.Module,
        shard: Subset,
        device: torch.device,
        kind: OutputKind,
    ) -> Means:
        loader = DataLoader(
            shard,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
        )
        sums = Means(percent=PERCENT)
        for batch in self.bar(loader, f"fidelity ({kind})", "batch"):
            images = _image(batch).to(device, non_blocking=True)  # (B, 3, H, W)
            if kind == "classifier":
                values = self._compare_logits(model, merged, images)
            else:
                values = self._compare_features(adapter, model, merged, images, self.segments)
            sums.update(values, count=images.shape[0])
        return sums

    @staticmethod
    def _compare_logits(model: nn.Module, merged: nn.Module, images: Tensor) -> dict[str, Tensor]:
        logits = model(images)  # (B, classes)
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"the model returned {type(logits).__name__}, expected a (B, classes) logits "
                "tensor; evaluate the model in eval mode"
            )
        merged_logits = logits if merged is model else merged(images)
        check_finite(logits, "the unmerged model's logits", "images of a batch", "fidelity")
        check_finite(merged_logits, "the merged model's logits", "images of a batch", "fidelity")
        sums = {name: value.sum() for name, value in logit_fidelity(logits, merged_logits).items()}
        if logits.shape[1] > 5:
            sums["top5_overlap"] = topk_overlap(logits, merged_logits, 5).sum()
        return sums

    @staticmethod
    def _compare_features(
        adapter: Adapter, model: nn.Module, merged: nn.Module, images: Tensor, segments: int
    ) -> dict[str, Tensor]:
        grid, pooled = adapter.dense_features(model, images)  # (B, C, H, W), (B, C') or None
        if merged is model:
            merged_grid, merged_pooled = grid, pooled
        else:
            merged_grid, merged_pooled = adapter.dense_features(merged, images)
        check_finite(grid, "the unmerged model's features", "images of a batch", "fidelity")
        check_finite(merged_grid, "the merged model's features", "images of a batch", "fidelity")
        sums = {
            "feature_cosine": fidelity_map(grid, merged_grid).mean((1, 2)).sum(),
            "segment_agreement": segment_agreement(grid, merged_grid, segments).sum(),
        }
        if pooled is not None and merged_pooled is not None:
            name = "cls_cosine" if adapter.pools_cls_token(model) else "pooled_cosine"
            sums[name] = _cosine(pooled, merged_pooled, dim=1).sum()
        return sums


def _image(item: Any) -> Any:
    """The image of a dataset item (or batch): the item itself, an (image, label) pair's first
    element, or a COCO-style dict's "image"."""
    if isinstance(item, dict):
        return item["image"]
    if isinstance(item, (tuple, list)):
        return item[0]
    return item
