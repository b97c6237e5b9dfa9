"""SAM's COCO mIoU protocol: one ground-truth prompt per instance, IoU at the original resolution.

Per image: the predictor's pre-processing (SamPredictor: longest side to the encoder size,
normalise, pad; SAM 2's SAM2ImagePredictor: resize to 1024 x 1024), the image encoder once, then
all of the image's prompts as one batch through the prompt encoder and mask decoder with
`multimask_output=False`; a pixel is foreground where its mask logit is > 0 (both predictors
threshold at `mask_threshold` = 0.0), after upsampling to the original size. SAM and SAM 2 run
through :class:`~spatialmerge.evaluators.prompting.PromptPredictor`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from spatialmerge.data.coco import PROMPTS, CocoInstances, Prompt, collate_list
from spatialmerge.distributed import all_reduce_sum, shard_indices
from spatialmerge.evaluators.base import DatasetEvaluator
from spatialmerge.evaluators.metrics import MeanIoU, beside_baseline, mask_iou
from spatialmerge.evaluators.prompting import PromptPredictor

if TYPE_CHECKING:
    from spatialmerge.pipeline import EvalContext


class MIoUEvaluator(DatasetEvaluator):
    """Mean IoU of SAM's (or SAM 2's) masks against COCO instance masks, from box or point prompts.

    Args:
        prompt: "box" or "point"; must match the dataset's `prompt`.
        max_images: evaluate at most the dataset's first `max_images` images; None for all.
        num_workers: DataLoader processes decoding images and masks while the model runs.
        progress: show a tqdm bar (on rank 0 only).
        baseline: in the pipeline, also evaluate the unmerged model on the same images and
            report ``unmerged_miou`` and ``delta_miou`` (merged - unmerged) beside ``miou``;
            false skips it (e.g. sweeps that share one ``merge=none`` job).

    Under torch.distributed each rank evaluates a disjoint shard of the images and the sums are
    all-reduced, so every rank returns the numbers one process would.
    """

    def __init__(
        self,
        prompt: Prompt = "box",
        max_images: int | None = None,
        num_workers: int = 2,
        progress: bool = True,
        baseline: bool = True,
    ) -> None:
        if prompt not in PROMPTS:
            raise ValueError(
                f"evaluator.miou.prompt={prompt!r} is not one of {PROMPTS}; set "
                "evaluator.miou.prompt=box or evaluator.miou.prompt=point"
            )
        super().__init__(max_images, num_workers, progress, config_key="evaluator.miou")
        self.prompt = prompt
        self.baseline = baseline

    def qualities(self) -> tuple[str, ...]:
        names = ("miou", "miou_per_image")
        return names + (tuple(f"delta_{name}" for name in names) if self.baseline else ())

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        """The pipeline's entry point: the merged model on the configured dataset, and with
        ``baseline`` the unmerged one on the same images."""
        dataset = ctx.dataset()
        merged = self.evaluate(ctx.merged_model(), dataset, ctx.device)
        # annotations the dataset could not evaluate, so a changed count is visible in the record
        merged["skipped_annotations"] = len(getattr(dataset, "skipped", {}))
        if not self.baseline or ctx.merge is None:
            return merged
        unmerged = self.evaluate(ctx.unmerged_model(), dataset, ctx.device)
        return beside_baseline(merged, unmerged, ("miou", "miou_per_image"))

    def evaluate(
        self, sam: nn.Module, dataset: CocoInstances, device: str | torch.device = "cpu"
    ) -> dict[str, float | int]:
        """Run the protocol on a segment-anything ``Sam`` or a sam2 ``SAM2Base``; returns
        {"miou": % over instances, "miou_per_image": % over images, "instances", "images"}.
        Puts `sam` in eval mode on `device`."""
        if dataset.prompt != self.prompt:
            raise ValueError(
                f"the evaluator uses {self.prompt!r} prompts but the dataset provides "
                f"{dataset.prompt!r} prompts; set dataset.prompt and evaluator.miou.prompt to the "
                "same value"
            )
        sam.to(device).eval()
        predictor = PromptPredictor(sam)
        count = self.image_count(len(dataset))
        shard = Subset(dataset, shard_indices(count))
        loader = DataLoader(
            shard, batch_size=1, num_workers=self.num_workers, collate_fn=collate_list
        )
        meter = MeanIoU()
        with torch.inference_mode():
            for (item,) in self.bar(loader, "COCO mIoU", "img"):
                masks = self.predict_masks(predictor, item["image"], item["prompts"])
                gt = torch.from_numpy(item["masks"]).to(masks.device)  # (K, H, W)
                meter.update(mask_iou(masks, gt))
        predictor.reset()
        total = MeanIoU()
        total.merge(all_reduce_sum(meter.state()))
        return total.compute()

    def predict_masks(
        self, predictor: PromptPredictor, image: np.ndarray, prompts: np.ndarray
    ) -> Tensor:
        """The model's masks for all prompts of one image: the encoder once, the decoder on the batch.

        image: (H, W, 3) uint8 RGB. prompts: (K, 4) xyxy boxes or (K, 2) (x, y) points, in
        original-image pixels. Returns (K, H, W) bool on the predictor's device.
        """
        predictor.set_image(image)
        if self.prompt == "box":
            return predictor.masks(boxes=prompts)
        return predictor.masks(points=prompts)  # one foreground click per instance
