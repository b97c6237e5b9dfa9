"""PromptPredictor's batched masks against the predictors' own one-prompt-at-a-time ``predict``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from spatialmerge.evaluators.prompting import PromptPredictor
from tests.evaluators.conftest import build_tiny_sam, build_tiny_sam2

BOXES = np.array([[4.0, 3.0, 30.0, 20.0], [20.0, 10.0, 60.0, 44.0], [0.0, 0.0, 63.0, 47.0]])
POINTS = np.array([[8.0, 6.0], [40.0, 30.0], [60.0, 2.0]])


def photo(height: int = 48, width: int = 64) -> np.ndarray:
    """(H, W, 3) uint8 noise, a size unlike the encoders' 1024 px so the prompt mapping matters."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def one_at_a_time(predictor, boxes=None, points=None) -> torch.Tensor:
    """(K, H, W) bool: the predictor's public ``predict`` called once per prompt."""
    masks = []
    for k in range(len(boxes if boxes is not None else points)):
        if boxes is not None:
            mask, _, _ = predictor.predict(box=boxes[k], multimask_output=False)
        else:
            mask, _, _ = predictor.predict(
                point_coords=points[k : k + 1], point_labels=np.ones(1), multimask_output=False
            )
        masks.append(torch.from_numpy(np.asarray(mask[0]) > 0.5))
    return torch.stack(masks)


@pytest.mark.parametrize("prompt", ["boxes", "points"])
def test_sam_batched_masks_equal_sam_predictors_own_predict(prompt):
    image = photo()
    model = build_tiny_sam()
    ours = PromptPredictor(model)
    ours.set_image(image)
    reference = SamPredictor(model)
    reference.set_image(image)
    prompts = {"boxes": BOXES} if prompt == "boxes" else {"points": POINTS}
    expected = one_at_a_time(reference, **prompts)
    masks = ours.masks(**prompts)
    assert masks.shape == (3, 48, 64) and masks.dtype == torch.bool
    assert torch.equal(masks, expected)
    assert not torch.equal(expected[0], expected[1]), "prompts must change the masks for this check to bite"


@pytest.mark.parametrize("prompt", ["boxes", "points"])
def test_sam2_batched_masks_equal_sam2_image_predictors_own_predict(prompt):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    image = photo()
    model = build_tiny_sam2()
    ours = PromptPredictor(model)
    ours.set_image(image)
    reference = SAM2ImagePredictor(model)
    reference.set_image(image)
    prompts = {"boxes": BOXES} if prompt == "boxes" else {"points": POINTS}
    expected = one_at_a_time(reference, **prompts)
    masks = ours.masks(**prompts)
    assert masks.shape == (3, 48, 64) and masks.dtype == torch.bool
    assert torch.equal(masks, expected)
    assert not torch.equal(expected[0], expected[1]), "prompts must change the masks for this check to bite"
