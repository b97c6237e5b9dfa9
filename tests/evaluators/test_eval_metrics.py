"""Hand-computed mask IoU, mean IoU (per instance vs per image) and top-k accuracy."""

from __future__ import annotations

import pytest
import torch

from spatialmerge.evaluators import Accuracy, MeanIoU, mask_iou, topk_correct
from spatialmerge.evaluators.metrics import kmeans, segment_agreement


def _rect(rows: slice, cols: slice, size: tuple[int, int] = (4, 5)) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def test_mask_iou_hand_examples() -> None:
    pred = torch.stack(
        [
            _rect(slice(0, 2), slice(0, 2)),  # 2x2 inside a 2x3: 4 / 6
            _rect(slice(0, 1), slice(0, 1)),  # disjoint: 0
            _rect(slice(0, 0), slice(0, 0)),  # both empty: defined as 1
            _rect(slice(1, 3), slice(1, 4)),  # identical: 1
        ]
    )
    gt = torch.stack(
        [
            _rect(slice(0, 2), slice(0, 3)),
            _rect(slice(3, 4), slice(4, 5)),
            _rect(slice(0, 0), slice(0, 0)),
            _rect(slice(1, 3), slice(1, 4)),
        ]
    )
    torch.testing.assert_close(mask_iou(pred, gt), torch.tensor([4 / 6, 0.0, 1.0, 1.0]))


def test_mask_iou_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="K, H, W"):
        mask_iou(torch.zeros(2, 4, 5, dtype=torch.bool), torch.zeros(2, 4, 6, dtype=torch.bool))


def test_mean_iou_per_instance_and_per_image_differ() -> None:
    meter = MeanIoU()
    meter.update(torch.tensor([1.0, 0.5, 0.0]))  # image mean 0.5
    meter.update(torch.tensor([1.0]))  # image mean 1.0
    result = meter.compute()
    assert result["miou"] == pytest.approx(100 * 2.5 / 4)  # 62.5: crowded image weighs more
    assert result["miou_per_image"] == pytest.approx(100 * (0.5 + 1.0) / 2)  # 75.0
    assert (result["instances"], result["images"]) == (4, 2)


def test_mean_iou_states_merge_into_the_single_process_result() -> None:
    single, first, second = MeanIoU(), MeanIoU(), MeanIoU()
    for meter, ious in [(first, [0.2, 0.4]), (second, [0.9]), (first, [0.7, 0.1, 0.3])]:
        meter.update(torch.tensor(ious))
        single.update(torch.tensor(ious))
    merged = MeanIoU()
    merged.merge(first.state() + second.state())  # what an all-reduce of the states gives
    assert merged.compute() == pytest.approx(single.compute())


def test_mean_iou_refuses_empty_input() -> None:
    meter = MeanIoU()
    with pytest.raises(ValueError, match="K >= 1"):
        meter.update(torch.zeros(0))
    with pytest.raises(ValueError, match="no instances"):
        meter.compute()


def _hand_logits() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],  # target 0 ranks 1st
            [0.0, 9, 1, 2, 3, 4],  # target 1 ranks 1st
            [9.0, 8, 7, 6, 5, 0],  # target 2 ranks 3rd
            [9.0, 8, 7, 6, 5, 0],  # target 5 ranks 6th
        ]
    )
    return logits, torch.tensor([0, 1, 2, 5])


def test_topk_correct_hand_example() -> None:
    logits, target = _hand_logits()
    assert topk_correct(logits, target, ks=(1, 3, 5)) == {1: 2, 3: 3, 5: 3}


def test_topk_refuses_k_above_the_number_of_classes() -> None:
    with pytest.raises(ValueError, match="evaluator.top1.ks"):
        topk_correct(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), ks=(1, 5))


def test_topk_refuses_targets_outside_the_classes() -> None:
    with pytest.raises(ValueError, match="disagree"):
        topk_correct(torch.zeros(2, 6), torch.tensor([0, 6]))


def test_accuracy_accumulates_batches_in_percent() -> None:
    logits, target = _hand_logits()
    meter = Accuracy(ks=(1, 5))
    meter.update(logits[:3], target[:3])
    meter.update(logits[3:], target[3:])
    assert meter.compute() == {"top1": 50.0, "top5": 75.0, "images": 4}
    merged = Accuracy(ks=(1, 5))
    merged.merge(meter.state())
    assert merged.compute() == meter.compute()


def test_kmeans_finds_separated_directions_deterministically():
    torch.manual_seed(0)
    centres = torch.eye(3) * 5
    features = torch.cat([c + 0.1 * torch.randn(20, 3) for c in centres])  # (60, 3)
    labels, centroids = kmeans(features, 3)
    assert labels.shape == (60,) and centroids.shape == (3, 3)
    for group in labels.view(3, 20):
        assert (group == group[0]).all()
    assert len(set(labels.view(3, 20)[:, 0].tolist())) == 3
    again, _ = kmeans(features, 3)
    assert torch.equal(labels, again)


def test_segment_agreement_counts_patches_that_change_segment():
    grid = torch.zeros(1, 2, 4, 4)
    grid[0, 0, :, :2] = 1.0  # left half points along x, right half along y
    grid[0, 1, :, 2:] = 1.0
    assert segment_agreement(grid, grid.clone(), k=2).tolist() == [1.0]
    moved = grid.clone()
    moved[0, :, 0, 0] = torch.tensor([0.0, 1.0])  # one left patch turns to the right segment
    assert segment_agreement(grid, moved, k=2).item() == pytest.approx(15 / 16)
    with pytest.raises(ValueError, match="of one shape"):
        segment_agreement(grid, grid[:, :, :2], k=2)
