"""Hand-computed mask IoU, mean IoU (per instance vs per image) and top-k accuracy."""

from __future__ import annotations

import pytest
import torch

from spatialmerge.distributed import all_reduce_sum
from spatialmerge.evaluators import Accuracy, MeanIoU, mask_iou, topk_correct
from spatialmerge.evaluators.metrics import Means, beside_baseline, kmeans, segment_agreement


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


def test_mask_iou_of_a_single_pixel_union_is_not_halved() -> None:
    # a one-pixel mask predicted exactly: intersection 1 over union 1; only an empty union
    # (0 / 0) needs the guard, a union of one must divide by one
    pred = _rect(slice(2, 3), slice(3, 4))[None]
    gt = _rect(slice(2, 3), slice(3, 4))[None]
    miss = _rect(slice(0, 1), slice(0, 1))[None]  # union 2, intersection 0
    assert mask_iou(pred, gt).tolist() == [1.0]
    assert mask_iou(pred, miss).tolist() == [0.0]


def test_mean_iou_shards_merge_into_a_partly_filled_accumulator() -> None:
    """DDP-style: two ranks each accumulate half the images; rank 0 merges rank 1's state into
    its own (not into a fresh one): the result equals one accumulator over all the images and
    the hand computation."""
    images = [[1.0, 0.5], [0.25], [0.0, 0.5, 1.0], [0.75]]
    whole, rank0, rank1 = MeanIoU(), MeanIoU(), MeanIoU()
    for i, ious in enumerate(images):
        whole.update(torch.tensor(ious))
        (rank0 if i < 2 else rank1).update(torch.tensor(ious))
    rank0.merge(rank1.state())
    # by hand: 2 + 1 + 3 + 1 = 7 instances summing to 1.5 + 0.25 + 1.5 + 0.75 = 4.0; image
    # means 0.75, 0.25, 0.5, 0.75 sum to 2.25 over 4 images
    expected = {"miou": 100 * 4.0 / 7, "miou_per_image": 100 * 2.25 / 4, "instances": 7, "images": 4}
    assert rank0.compute() == pytest.approx(expected)
    assert whole.compute() == pytest.approx(expected)


def test_mean_iou_sums_in_float64_whatever_the_input_dtype() -> None:
    # 1 + 2**-30 is 1.0 in float32 (24-bit mantissa) but exact in float64: the accumulator
    # must not sum in the dtype mask_iou hands it (float32), or COCO's ~36k instances drift
    tiny = 2.0**-30
    meter = MeanIoU()
    meter.update(torch.tensor([1.0, tiny], dtype=torch.float32))  # tiny is exact in float32
    assert meter.state().dtype == torch.float64  # what all_reduce_sum reduces, on every rank
    result = meter.compute()
    assert result["miou"] == pytest.approx(100.0 * (1.0 + tiny) / 2, rel=1e-12, abs=0)
    assert result["miou"] != 50.0  # the float32 sum


def test_mean_iou_refuses_a_state_of_the_wrong_shape() -> None:
    meter = MeanIoU()
    with pytest.raises(ValueError, match=r"state must have shape \(4,\), got \(3,\)"):
        meter.merge(torch.zeros(3, dtype=torch.float64))


def test_accuracy_shards_merge_into_a_partly_filled_accumulator() -> None:
    """DDP-style merge of two ranks' partial counts equals one accumulator over every sample and
    the hand count (the hand logits: ranks 1, 1, 3 and 6 among 6 classes)."""
    logits, target = _hand_logits()
    whole, rank0, rank1 = Accuracy(ks=(1, 3)), Accuracy(ks=(1, 3)), Accuracy(ks=(1, 3))
    whole.update(logits, target)
    rank0.update(logits[:2], target[:2])  # ranks 1 and 1
    rank1.update(logits[2:], target[2:])  # ranks 3 and 6
    rank0.merge(rank1.state())
    expected = {"top1": 100.0 * 2 / 4, "top3": 100.0 * 3 / 4, "images": 4}
    assert rank0.compute() == expected
    assert whole.compute() == expected


def test_accuracy_uses_its_own_ks() -> None:
    # ks=(2,) on 3 classes: not the default (1, 5), which 3 classes could not even hold
    logits = torch.tensor([[3.0, 2, 1], [3.0, 2, 1], [3.0, 2, 1]])
    target = torch.tensor([0, 1, 2])  # ranks 1, 2 and 3
    meter = Accuracy(ks=(2,))
    meter.update(logits, target)
    assert meter.compute() == {"top2": 100.0 * 2 / 3, "images": 3}


def test_accuracy_counts_stay_exact_integers_beyond_float32() -> None:
    # 2**24 + 1 samples is not a float32 number: counts must stay int64, and "images" an int
    count = 2**24 + 1
    meter = Accuracy(ks=(1,))
    meter.merge(torch.tensor([count - 1, count]))
    assert meter.state().dtype == torch.int64
    result = meter.compute()
    assert result["images"] == count and isinstance(result["images"], int)
    assert result["top1"] == pytest.approx(100.0 * (count - 1) / count, rel=1e-12)


def test_accuracy_merges_a_float64_reduction_of_its_counts() -> None:
    # all_reduce_sum of a sequence of numbers returns float64 (exact for counts below 2**53):
    # merge must take such a reduction of counts, not only an int64 state
    logits, target = _hand_logits()
    meter = Accuracy(ks=(1, 5))
    meter.update(logits, target)
    reduced = all_reduce_sum(meter.state().tolist())
    assert reduced.dtype == torch.float64
    total = Accuracy(ks=(1, 5))
    total.merge(reduced)
    assert total.compute() == {"top1": 50.0, "top5": 75.0, "images": 4}


def test_accuracy_of_a_single_sample_and_of_none() -> None:
    meter = Accuracy(ks=(1,))
    with pytest.raises(ValueError, match="no samples"):
        meter.compute()
    meter.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    assert meter.compute() == {"top1": 100.0, "images": 1}


def test_accuracy_refuses_bad_ks_and_bad_states() -> None:
    with pytest.raises(ValueError, match="must be non-empty positive ints"):
        Accuracy(ks=(0, 1))
    with pytest.raises(ValueError, match="must be non-empty positive ints"):
        Accuracy(ks=())
    meter = Accuracy(ks=(1, 5))
    with pytest.raises(ValueError, match=r"state must have shape \(3,\), got \(2,\)"):
        meter.merge(torch.zeros(2, dtype=torch.int64))


def test_topk_with_k_equal_to_the_number_of_classes_counts_every_sample() -> None:
    # top-3 of 3 classes always holds the target: the largest k allowed, not refused
    logits = torch.tensor([[1.0, 2, 3], [3.0, 1, 2]])
    assert topk_correct(logits, torch.tensor([0, 1]), ks=(1, 3)) == {1: 0, 3: 2}


def test_topk_refuses_ks_below_one_and_mismatched_targets() -> None:
    with pytest.raises(ValueError, match=r"every k in \[1, 3\]"):
        topk_correct(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), ks=(0, 1))
    # a 2-D logits tensor with one target too many: refused, not broadcast
    with pytest.raises(ValueError, match=r"logits must be \(N, classes\) and target \(N,\), got \(2, 3\) and \(3,\)"):
        topk_correct(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def _unit(degrees: list[float]) -> torch.Tensor:
    """Unit vectors in the plane at the given angles."""
    rad = torch.tensor(degrees, dtype=torch.float64) * torch.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


def test_kmeans_accepts_k_from_one_to_n_and_refuses_the_rest() -> None:
    features = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.5], [1.0, 1.0, 0.0]])
    # k = 1: one cluster, its centroid the mean direction of the four unit vectors
    labels, centroids = kmeans(features, 1)
    assert labels.tolist() == [0, 0, 0, 0]
    unit = torch.nn.functional.normalize(features, dim=1)
    torch.testing.assert_close(centroids[0], torch.nn.functional.normalize(unit.sum(0), dim=0))
    # k = N = 4 (more clusters than the 3 channels): every point its own cluster and centroid
    labels, centroids = kmeans(features, 4)
    assert sorted(labels.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(centroids[labels], unit)
    for k in (0, 5):
        with pytest.raises(ValueError, match=r"1 <= k <= N, got \(4, 3\), k=" + str(k)):
            kmeans(features, k)
    with pytest.raises(ValueError, match="1 <= k <= N"):  # 2 points, 4 channels: k=3 > N
        kmeans(torch.eye(4)[:2], 3)


def test_kmeans_groups_directions_whatever_each_feature_norm() -> None:
    # the features are normalised first: scaling every row by its own positive factor changes
    # neither the clusters nor the centroids
    features = _unit([-155, -115, -35, -10, 50, 160])
    scales = torch.tensor([10.0, 0.1, 3.0, 0.5, 7.0, 1.0])[:, None]
    labels, centroids = kmeans(features, 3)
    scaled_labels, scaled_centroids = kmeans(features * scales, 3)
    assert torch.equal(labels, scaled_labels)
    torch.testing.assert_close(centroids, scaled_centroids)


def test_kmeans_ends_at_a_lloyd_fixed_point_even_when_a_cluster_shrinks_to_one() -> None:
    """Points at -155, -115, -35, -10, 50 and 160 degrees, k = 3. The seeds are -115 (nearest the
    mean direction), 50 and 160. The -115 cluster first takes -155 and -35 too (centroid near
    -102), then loses them to 160 and to 50's cluster: a single member, and its centroid must
    move back onto it. At the end every centroid is the normalised sum of its members, unit
    norm, and every point sits with its nearest centroid."""
    x = _unit([-155, -115, -35, -10, 50, 160])
    labels, centroids = kmeans(x, 3)
    groups = {frozenset(torch.nonzero(labels == c).flatten().tolist()) for c in range(3)}
    assert groups == {frozenset({0, 5}), frozenset({1}), frozenset({2, 3, 4})}
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))
    for c in range(3):
        members = x[labels == c]
        torch.testing.assert_close(centroids[c], torch.nn.functional.normalize(members.sum(0), dim=0))
    assert torch.equal(labels, (x @ centroids.T).argmax(1))


def test_kmeans_with_more_clusters_than_directions_keeps_the_empty_ones_in_place() -> None:
    """Two directions, k = 3: seeding picks x (index 0), then y (index 2), then, every point now
    equal to a seed, index 0 again. The third cluster ties with the first and loses every member
    (argmax keeps the first): it keeps its seed, unit norm, instead of collapsing to zero. A flat
    image region with fewer distinct features than segments does this."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels, centroids = kmeans(x, 3)
    assert labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(centroids, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))


def _crowded_arc(n: int = 300) -> torch.Tensor:
    """n unit vectors on a quarter circle, crowded towards its start (angle ~ t**2): Lloyd's
    boundaries creep one point at a time on them, so 6-means is still moving after 20 steps."""
    t = torch.linspace(0, 1, n) ** 2 * (torch.pi / 2)
    return torch.stack([t.cos(), t.sin()], dim=1)


def test_kmeans_runs_a_fixed_twenty_iterations_by_default() -> None:
    # the recorded segment metric must not depend on when Lloyd happens to converge: the
    # default is 20 iterations, also on an input whose labels still change in a 21st
    features = _crowded_arc()
    twenty, twenty_one = kmeans(features, 6, iters=20), kmeans(features, 6, iters=21)
    assert not torch.equal(twenty[0], twenty_one[0]), "the input must still move after 20 iterations"
    default = kmeans(features, 6)
    assert torch.equal(default[0], twenty[0]) and torch.equal(default[1], twenty[1])


def test_segment_agreement_caps_k_at_the_number_of_patches() -> None:
    # a 1x2 grid of 4-channel features has 2 patches: k=6 segments become 2, one per patch
    grid = torch.zeros(1, 4, 1, 2)
    grid[0, 0, 0, 0] = 1.0
    grid[0, 1, 0, 1] = 1.0
    assert segment_agreement(grid, grid.clone(), k=6).tolist() == [1.0]
    swapped = grid.flip(-1)  # each patch now points where the other one did
    assert segment_agreement(grid, swapped, k=6).tolist() == [0.0]


def test_segment_agreement_defaults_to_six_segments() -> None:
    """Seven orthogonal directions on a 7x1 grid: with 6 segments two of them must share one, so
    moving a patch between those two keeps agreement at 1; with 7 it would not."""
    grid = torch.eye(7).reshape(1, 7, 7, 1)  # patch i points along channel i
    labels, _ = kmeans(grid.flatten(2).transpose(1, 2)[0], 6)
    shared = [i for i in range(7) if (labels == labels[i]).sum() == 2]  # the two in one segment
    assert len(shared) == 2
    moved = grid.clone()
    moved[0, :, shared[0], 0] = grid[0, :, shared[1], 0]
    assert segment_agreement(grid, moved).tolist() == [1.0]
    assert segment_agreement(grid, moved, k=7).tolist() == [pytest.approx(6 / 7)]


def test_beside_baseline_adds_the_unmerged_value_and_the_difference() -> None:
    merged = {"top1": 70.0, "top5": 90.0, "images": 10}
    unmerged = {"top1": 75.5, "top5": 89.0, "images": 10}
    out = beside_baseline(merged, unmerged, ("top1", "top5"))
    assert out == {"top1": 70.0, "top5": 90.0, "images": 10, "unmerged_top1": 75.5, "unmerged_top5": 89.0,
                   "delta_top1": 70.0 - 75.5, "delta_top5": 90.0 - 89.0}
    assert merged == {"top1": 70.0, "top5": 90.0, "images": 10}  # the input is not modified


def test_means_are_per_item_in_the_order_of_first_appearance_with_percent_names() -> None:
    means = Means(percent=["agreement"])
    means.update({"cosine": torch.tensor(1.5), "agreement": torch.tensor(2.0)}, count=2)
    means.update({"cosine": 0.5, "agreement": 1.0, "kl": 0.25}, count=2)
    # cosine (1.5 + 0.5) / 4, agreement 100 * 3 / 4, kl only added by the second update: 0.25 / 4
    assert means.compute() == {"cosine": 0.5, "agreement": 75.0, "kl": 0.0625}
    assert list(means.compute()) == means.names == ["cosine", "agreement", "kl"]


def test_means_shards_merge_into_the_single_process_result() -> None:
    batches = [({"kl": 0.3, "top1": 2.0}, 2), ({"kl": 0.1, "top1": 1.0}, 1), ({"kl": 0.6, "top1": 0.0}, 3)]
    whole = Means(percent=["top1"])
    shards = [Means(percent=["top1"]), Means(percent=["top1"])]
    for i, (sums, count) in enumerate(batches):
        whole.update(sums, count)
        shards[i % 2].update(sums, count)
    total = Means(whole.names, percent=["top1"])
    for shard in shards:
        total.merge(all_reduce_sum(shard.state()))
    assert total.compute() == pytest.approx(whole.compute(), rel=1e-15)
    assert whole.state().dtype == torch.float64 and whole.state().tolist()[-1] == 6


def test_means_refuse_empty_input_and_a_state_of_other_metrics() -> None:
    with pytest.raises(ValueError, match="call update"):
        Means(["kl"]).compute()
    with pytest.raises(ValueError, match=r"state must have shape \(2,\)"):
        Means(["kl"]).merge(torch.zeros(3, dtype=torch.float64))
