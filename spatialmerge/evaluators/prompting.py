"""One prompt-to-mask interface over segment-anything's ``SamPredictor`` and sam2's
``SAM2ImagePredictor``, so the COCO mIoU and fidelity protocols run both families the same way:
the encoder once per image, then every prompt of the image as one batch, one mask per prompt
(``multimask_output=False``), thresholded at the predictor's own ``mask_threshold`` (0.0) at the
original resolution. Each predictor does its own pre-processing (SAM: longest side to 1024 and
pad; SAM 2: resize to 1024 x 1024)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from segment_anything import SamPredictor
from torch import Tensor, nn

from spatialmerge.adapters import find_adapter
from spatialmerge.evaluators.metrics import check_finite


class PromptPredictor:
    """Masks for a batch of box or point prompts on one image, from a SAM or SAM 2 model.

    Args:
        model: a segment-anything ``Sam`` or a sam2 ``SAM2Base`` (patched or not); its adapter
            supplies the family's own predictor, whose two call conventions this class hides.
        metric: what the masks are for ("mIoU", "fidelity"), named when the model's image
            embedding or mask logits are NaN or inf (thresholded, they would be empty masks).
    """

    def __init__(self, model: nn.Module, metric: str = "mIoU") -> None:
        self.predictor: Any = find_adapter(model).prompt_predictor(model)
        self.size: tuple[int, int] = (0, 0)
        self.metric = metric

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    def set_image(self, image: np.ndarray) -> None:
        """Run the image encoder on ``image``, (H, W, 3) uint8 RGB."""
        self.predictor.set_image(image)
        self.size = image.shape[:2]
        check_finite(self.image_embedding(), "the image embedding's values", "images", self.metric)

    def image_embedding(self) -> Tensor:
        """(1, C, h, w) image embedding the mask decoder reads."""
        return self.predictor.get_image_embedding()

    def masks(self, boxes: np.ndarray | None = None, points: np.ndarray | None = None) -> Tensor:
        """One mask per prompt: ``boxes`` (K, 4) xyxy or ``points`` (K, 2) (x, y) foreground
        clicks, in original-image pixels. Returns (K, H, W) bool on the predictor's device."""
        if (boxes is None) == (points is None):
            raise ValueError("give either boxes or points")
        if isinstance(self.predictor, SamPredictor):
            return self._sam_masks(boxes, points)
        count = len(boxes if boxes is not None else points)
        if points is not None:
            masks, _, logits = self.predictor.predict(
                point_coords=points[:, None, :], point_labels=np.ones((count, 1)), multimask_output=False
            )
        else:
            masks, _, logits = self.predictor.predict(box=boxes, multimask_output=False)
        self._check_logits(torch.from_numpy(logits).reshape(count, -1))
        # predict squeezes the prompt axis away when there is one prompt
        masks = masks.reshape(count, *self.size)
        return torch.from_numpy(masks > 0.5).to(self.device)

    def _sam_masks(self, boxes: np.ndarray | None, points: np.ndarray | None) -> Tensor:
        predictor = self.predictor
        if boxes is not None:
            boxes_t = torch.as_tensor(boxes, dtype=torch.float32, device=predictor.device)
            boxes_t = predictor.transform.apply_boxes_torch(boxes_t, self.size)  # (K, 4)
            masks, _, logits = predictor.predict_torch(None, None, boxes=boxes_t, multimask_output=False)
        else:
            points_t = torch.as_tensor(points, dtype=torch.float32, device=predictor.device)
            coords = predictor.transform.apply_coords_torch(points_t[:, None], self.size)  # (K, 1, 2)
            labels = torch.ones(coords.shape[:2], dtype=torch.int, device=predictor.device)
            masks, _, logits = predictor.predict_torch(coords, labels, multimask_output=False)
        self._check_logits(logits)  # (K, 1, 256, 256)
        return masks[:, 0]  # (K, 1, H, W) -> (K, H, W)

    def _check_logits(self, logits: Tensor) -> None:
        """(K, ...) low-resolution mask logits of K prompts: a NaN is below the threshold, so
        its mask would be empty and count as a miss instead of an error."""
        check_finite(logits, "the mask decoder's logits", "prompts of an image", self.metric)

    def reset(self) -> None:
        if isinstance(self.predictor, SamPredictor):
            self.predictor.reset_image()
        else:
            self.predictor.reset_predictor()
