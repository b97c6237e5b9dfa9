"""MIoUEvaluator: the SAM COCO protocol end to end on a tiny SAM, and its IoU path with fakes."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from spatialmerge.data import CocoInstances
from spatialmerge.evaluators import MIoUEvaluator
from spatialmerge.evaluators.prompting import PromptPredictor
from spatialmerge.pipeline import EvalContext
from tests.evaluators.conftest import miou_by_hand


@pytest.mark.parametrize("prompt", ["box", "point"])
def test_runs_end_to_end_on_a_tiny_sam(coco_root: Path, tiny_sam: Sam, prompt: str) -> None:
    dataset = CocoInstances(str(coco_root), prompt=prompt)
    result = MIoUEvaluator(prompt=prompt, num_workers=2, progress=False).evaluate(tiny_sam, dataset)
    assert (result["instances"], result["images"]) == (4, 2)
    # by hand: SamPredictor's own predict, one prompt at a time, against each instance's mask
    assert (result["miou"], result["miou_per_image"]) == pytest.approx(
        miou_by_hand(SamPredictor(tiny_sam), dataset, prompt), abs=1e-4
    )


def test_encoder_once_per_image_and_one_decoder_batch_per_image(
    coco_root: Path, tiny_sam: Sam
) -> None:
    calls: dict[str, list[tuple[int, ...]]] = {"encoder": [], "decoder": []}
    tiny_sam.image_encoder.register_forward_hook(
        lambda module, args, out: calls["encoder"].append(tuple(args[0].shape[:1]))
    )
    tiny_sam.mask_decoder.register_forward_hook(
        lambda module, args, kwargs, out: calls["decoder"].append(tuple(out[0].shape[:2])),
        with_kwargs=True,
    )
    evaluator = MIoUEvaluator(num_workers=0, progress=False)
    evaluator.evaluate(tiny_sam, CocoInstances(str(coco_root)))
    assert calls["encoder"] == [(1,), (1,)]  # one image per encoder pass, two images
    # Both prompts of an image in one decoder pass, one mask each (multimask_output=False).
    assert calls["decoder"] == [(2, 1), (2, 1)]


def test_predicted_masks_have_the_original_resolution(coco_root: Path, tiny_sam: Sam) -> None:
    item = CocoInstances(str(coco_root), prompt="point")[1]
    masks = MIoUEvaluator(prompt="point").predict_masks(
        PromptPredictor(tiny_sam), item["image"], item["prompts"]
    )
    assert masks.shape == (2, 40, 56) and masks.dtype == torch.bool


def _gt_lookup(dataset: CocoInstances) -> dict[bytes, np.ndarray]:
    """Ground-truth masks keyed by the prompts that ask for them (unique per image)."""
    return {item["prompts"].tobytes(): item["masks"] for item in dataset}


def test_perfect_predictions_score_100(
    coco_root: Path, tiny_sam: Sam, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = CocoInstances(str(coco_root))
    gt = _gt_lookup(dataset)

    def perfect(predictor: PromptPredictor, image: np.ndarray, prompts: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(gt[prompts.tobytes()])

    evaluator = MIoUEvaluator(num_workers=2, progress=False)  # items come from worker processes
    monkeypatch.setattr(evaluator, "predict_masks", perfect)
    result = evaluator.evaluate(tiny_sam, dataset)
    assert result == {"miou": 100.0, "miou_per_image": 100.0, "instances": 4, "images": 2}


def test_one_missed_instance_of_four_scores_75(
    coco_root: Path, tiny_sam: Sam, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = CocoInstances(str(coco_root))
    gt = _gt_lookup(dataset)

    def miss_the_last_instance_of_image_2(
        predictor: PromptPredictor, image: np.ndarray, prompts: np.ndarray
    ) -> torch.Tensor:
        masks = torch.from_numpy(gt[prompts.tobytes()].copy())
        if image.shape[:2] == (40, 56):
            masks[-1] = False  # IoU 0 for ann 203
        return masks

    evaluator = MIoUEvaluator(num_workers=0, progress=False)
    monkeypatch.setattr(evaluator, "predict_masks", miss_the_last_instance_of_image_2)
    result = evaluator.evaluate(tiny_sam, dataset)
    assert result["miou"] == pytest.approx(100 * 3 / 4)
    assert result["miou_per_image"] == pytest.approx(100 * (1.0 + 0.5) / 2)


def test_max_images_limits_the_evaluation(coco_root: Path, tiny_sam: Sam) -> None:
    evaluator = MIoUEvaluator(max_images=1, num_workers=0, progress=False)
    result = evaluator.evaluate(tiny_sam, CocoInstances(str(coco_root)))
    assert (result["images"], result["instances"]) == (1, 2)


def test_prompt_mismatch_with_the_dataset_raises(coco_root: Path, tiny_sam: Sam) -> None:
    dataset = CocoInstances(str(coco_root), prompt="box")
    with pytest.raises(ValueError, match="dataset.prompt and evaluator.miou.prompt"):
        MIoUEvaluator(prompt="point", progress=False).evaluate(tiny_sam, dataset)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "mask"}, "evaluator.miou.prompt"),
        ({"max_images": 0}, "evaluator.miou.max_images"),
        ({"num_workers": -1}, "evaluator.miou.num_workers"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MIoUEvaluator(**kwargs)


def test_pipeline_entry_point_runs_the_merged_model_on_the_configured_dataset(
    coco_root: Path, tiny_sam: Sam
) -> None:
    factory = partial(CocoInstances, str(coco_root))
    ctx = EvalContext(tiny_sam, merge=None, device="cpu", dataset_factory=factory)
    result = MIoUEvaluator(num_workers=0, progress=False).run(ctx)
    assert (result["instances"], result["images"]) == (4, 2)


def test_the_merged_miou_comes_with_the_unmerged_one_on_the_same_images(
    coco_root: Path, tiny_sam: Sam
) -> None:
    factory = partial(CocoInstances, str(coco_root))
    merge = {"method": "cubist", "loc": 1, "ratio": 0.25}
    both = MIoUEvaluator(num_workers=0, progress=False).run(
        EvalContext(tiny_sam, merge=merge, device="cpu", dataset_factory=factory)
    )
    alone = MIoUEvaluator(num_workers=0, progress=False).run(
        EvalContext(tiny_sam, merge=None, device="cpu", dataset_factory=factory)
    )
    assert both["unmerged_miou"] == pytest.approx(alone["miou"])
    assert both["delta_miou"] == pytest.approx(both["miou"] - alone["miou"])
    assert both["unmerged_miou_per_image"] == pytest.approx(alone["miou_per_image"])
    # what a search's --quality is checked against before its first trial
    counts = {"instances", "images", "skipped_annotations"}
    assert set(both) - counts - {"unmerged_miou", "unmerged_miou_per_image"} == set(MIoUEvaluator().qualities())
    assert set(alone) - counts == set(MIoUEvaluator(baseline=False).qualities())


@pytest.mark.parametrize(
    "broken, what",
    [("image_encoder.neck", "the image embedding's values"), ("mask_decoder.output_upscaling", "the mask decoder's logits")],
)
def test_non_finite_outputs_are_refused_not_scored_as_empty_masks(
    coco_root: Path, tiny_sam: Sam, broken: str, what: str
) -> None:
    """A NaN mask logit is below the threshold, so its mask would be empty: an mIoU near 0
    instead of an error."""
    with torch.no_grad():
        for parameter in tiny_sam.get_submodule(broken).parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(ValueError, match=rf"{what} are not finite \(NaN or inf\) on \d+ of \d+ .*so mIoU would mean nothing"):
        MIoUEvaluator(num_workers=0, progress=False).evaluate(tiny_sam, CocoInstances(str(coco_root)))
