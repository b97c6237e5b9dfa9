"""ImageNet-style classification accuracy (top-1 / top-5) of a model's logits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from spatialmerge.adapters import find_adapter
from spatialmerge.distributed import all_reduce_sum, shard_indices
from spatialmerge.evaluators.base import DatasetEvaluator
from spatialmerge.evaluators.metrics import Accuracy, beside_baseline, check_finite

if TYPE_CHECKING:
    from spatialmerge.pipeline import EvalContext


class Top1Evaluator(DatasetEvaluator):
    """Top-k accuracy of `model` over a dataset of (image (3, H, W) tensor, label) pairs.

    Args:
        batch_size: images per forward pass (per process).
        num_workers: DataLoader processes decoding and transforming images.
        progress: show a tqdm bar (on rank 0 only).
        ks: which top-k accuracies to report; each k must not exceed the number of classes.
        baseline: in the pipeline, also evaluate the unmerged model on the same images and
            report ``unmerged_top<k>`` and ``delta_top<k>`` (merged - unmerged) beside each
            ``top<k>``; false skips it (e.g. sweeps that share one ``merge=none`` job).

    The model is run in eval mode under inference_mode; distilled DeiT models then return the
    average of their two heads' logits, which is what DeiT reports. Under torch.distributed each
    rank evaluates a disjoint shard and the counts are all-reduced, so every rank returns the
    numbers one process would.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 4,
        progress: bool = True,
        ks: Sequence[int] = (1, 5),
        baseline: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"evaluator.top1.batch_size={batch_size} must be >= 1")
        # every image of the split: ImageNet's protocol (``max_images`` is not one of its options)
        super().__init__(None, num_workers, progress, config_key="evaluator.top1")
        if not ks or min(ks) < 1:
            raise ValueError(
                f"evaluator.top1.ks={list(ks)} must be non-empty positive ints, e.g. [1,5]"
            )
        self.batch_size = batch_size
        self.ks = tuple(ks)
        self.baseline = baseline

    def qualities(self) -> tuple[str, ...]:
        tops = tuple(f"top{k}" for k in self.ks)
        return tops + (tuple(f"delta_{top}" for top in tops) if self.baseline else ())

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        """The pipeline's entry point: the merged model on the configured dataset, read with the
        model's own timm evaluation transform, and with ``baseline`` the unmerged one on the
        same images (``unmerged_top1``, ``delta_top1``, ... beside ``top1``)."""
        model = ctx.merged_model()
        classes = getattr(model, "num_classes", None)
        if isinstance(classes, int) and classes > 0 and max(self.ks) > classes:  # before any image
            raise ValueError(
                f"evaluator.top1.ks={list(self.ks)} asks for top-{max(self.ks)} of the model's "
                f"{classes} classes; use ks up to {classes}, e.g. evaluator.top1.ks=[1,{min(5, classes)}]"
            )
        dataset = ctx.dataset(transform=find_adapter(model).eval_transform(model))
        merged = self.evaluate(model, dataset, ctx.device)
        if not self.baseline or ctx.merge is None:
            return merged
        unmerged = self.evaluate(ctx.unmerged_model(), dataset, ctx.device)
        return beside_baseline(merged, unmerged, tuple(f"top{k}" for k in self.ks))

    def evaluate(
        self, model: nn.Module, dataset: Dataset, device: str | torch.device = "cpu"
    ) -> dict[str, float | int]:
        """Returns {"top1": %, "top5": % (one key per k), "images"}. Puts `model` in eval mode
        on `device`."""
        device = torch.device(device)
        model.to(device).eval()
        # An ImageFolder whose class folders differ from the model's classes gives labels that
        # mean other classes: every number would be silently wrong.
        classes = getattr(dataset, "classes", None)
        shard = Subset(dataset, shard_indices(len(dataset)))
        loader = DataLoader(
            shard,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
        )
        meter = Accuracy(self.ks)
        with torch.inference_mode():
            for images, target in self.bar(loader, "top-1", "batch"):
                logits = model(images.to(device, non_blocking=True))  # (B, classes)
                if not isinstance(logits, Tensor):
                    raise TypeError(
                        f"the model returned {type(logits).__name__}, expected a (B, classes) "
                        "logits tensor; evaluate the model in eval mode or wrap it to return logits"
                    )
                if classes is not None and logits.shape[-1] != len(classes):
                    raise ValueError(
                        f"the model has {logits.shape[-1]} classes but the dataset has "
                        f"{len(classes)} class folders; point dataset.root at the full ImageNet "
                        "(1000 classes) or use a model with matching num_classes"
                    )
                check_finite(logits, "the model's logits", "images of a batch", "top-1")
                meter.update(logits.float(), target)
        total = Accuracy(self.ks)
        total.merge(all_reduce_sum(meter.state()))
        return total.compute()
