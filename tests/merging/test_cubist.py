"""CubistMerge core: shapes, spatial order, max-magnitude, recovery, gradients and errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spatialmerge.merging import (
    CubistRecord,
    cubist_merge,
    cubist_recover,
    merge_1d,
    ratio_to_r,
    window_aligned_r,
)
from tests.merging.helpers import cell_sizes, compose

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def grids(draw):
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    c = draw(st.integers(1, 6))
    r_h = draw(st.integers(0, h // 2))
    r_w = draw(st.integers(0, w // 2))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    return b, h, w, c, r_h, r_w, dtype, seed


@settings(max_examples=60, deadline=None)
@given(grids())
def test_shapes_dtypes_and_recovery_for_any_grid(case):
    b, h, w, c, r_h, r_w, dtype, seed = case
    x = torch.randn(b, h, w, c, generator=torch.Generator().manual_seed(seed)).to(dtype)
    y, record = cubist_merge(x, r_h, r_w)
    assert y.shape == (b, h - r_h, w - r_w, c) and y.dtype == dtype
    assert record.out_hw == (h - r_h, w - r_w)
    # Every original cell is held by exactly one reduced token and every token holds >= 1 cell.
    sizes = cell_sizes(record)
    assert sizes.sum().item() == b * h * w
    assert sizes.min().item() >= 1
    recovered = cubist_recover(y, record)
    assert recovered.shape == x.shape and recovered.dtype == dtype
    # Recovery copies tokens: each recovered cell is one of the reduced tokens of its image.
    flat = y.reshape(b, -1, c)
    held = flat.gather(1, record.index.unsqueeze(-1).expand(-1, -1, c)).view_as(x)
    assert torch.equal(recovered, held)


def test_merged_value_is_max_magnitude_of_its_cells_values():
    # Every output channel must equal the value of largest magnitude among the original cells
    # the token holds (max-magnitude composes across the row and column passes).
    torch.manual_seed(0)
    x = torch.randn(2, 9, 11, 4)
    y, record = cubist_merge(x, 4, 5)
    b, c = x.shape[0], x.shape[-1]
    flat_x = x.reshape(b, -1, c)
    for i in range(b):
        for token in range(y.shape[1] * y.shape[2]):
            cells = flat_x[i, record.index[i] == token]  # (k, C)
            expected = cells.gather(0, cells.abs().argmax(0, keepdim=True))[0]
            assert torch.equal(y[i].reshape(-1, c)[token], expected)


def _coordinate_grid(h: int, w: int, c: int = 4, seed: int = 0) -> torch.Tensor:
    """Random features plus two channels holding each cell's (row, col), 1-based and positive,
    so max-magnitude keeps the largest coordinate of the cells a token holds."""
    feats = torch.randn(1, h, w, c, generator=torch.Generator().manual_seed(seed))
    rows, cols = torch.meshgrid(torch.arange(h) + 1.0, torch.arange(w) + 1.0, indexing="ij")
    return torch.cat([feats, rows[None, ..., None], cols[None, ..., None]], dim=-1)


@pytest.mark.parametrize("seed", range(10))
def test_row_pass_keeps_order_and_merges_only_into_immediate_neighbours(seed):
    x = _coordinate_grid(7, 13, seed=seed)
    y, _, _, index = merge_1d(x, 5)  # rows of length 13 lose 5 tokens
    cols = y[0, ..., -1]
    assert (cols[:, 1:] > cols[:, :-1]).all(), "column coordinates must increase along every row"
    # Each slot holds a contiguous run of cells: the index never decreases and steps by <= 1,
    # so a removed token only ever joins an immediate neighbour.
    steps = index[..., 1:] - index[..., :-1]
    assert ((steps == 0) | (steps == 1)).all()
    for row in index[0]:
        runs = torch.bincount(row, minlength=8)
        assert runs.min() >= 1 and runs.max() <= 3
        # A run of three is odd-even-odd: the even destination between its two sources,
        # so no two adjacent tokens were removed together.
        for slot in (runs == 3).nonzero().flatten():
            middle = (row == slot).nonzero().flatten()[1]
            assert middle % 2 == 0


@pytest.mark.parametrize("seed", range(10))
def test_2d_merge_keeps_spatial_order_per_pass(seed):
    h, w, r_h, r_w = 9, 12, 4, 5
    x = _coordinate_grid(h, w, seed=seed)
    y, record = cubist_merge(x, r_h, r_w)
    rows = y[0, ..., -2]
    assert (rows[1:] > rows[:-1]).all(), "row coordinates must increase down every column"
    index = record.index.view(h, w)
    w2 = w - r_w
    slot_row, slot_col = index // w2, index % w2
    # Every original row keeps its left-right order: column slots never decrease along it ...
    assert (slot_col[:, 1:] >= slot_col[:, :-1]).all()
    # ... and every original column keeps its top-bottom order across the row slots it joins.
    for col in range(w2):
        for row in range(h):
            cells = (slot_col[row] == col).nonzero().flatten()
            assert len(cells) >= 1 and (cells[1:] - cells[:-1] == 1).all(), "cells are contiguous"
    assert (slot_row[1:] >= slot_row[:-1]).all()
    # A cell's row slot differs from the cell above by at most one step (immediate neighbours).
    assert ((slot_row[1:] - slot_row[:-1]) <= 1).all()


def test_two_sources_collide_into_one_destination_exact_rule():
    # metric makes token 1 match right (into 2) and token 3 match left (into 2): a collision.
    metric = torch.tensor([[1.0, 0], [0, 1], [0, 1], [0, 1], [1, 0]])[None]
    x0, x4 = torch.full((5,), 7.0), torch.full((5,), -7.0)
    dest = torch.tensor([1.0, -2, 3, 0.5, 1])
    left = torch.tensor([-4.0, 1, 3, 0.5, -2])
    right = torch.tensor([2.0, 5, -3, -0.25, 2])
    x = torch.stack([x0, left, dest, right, x4])[None]
    y, _, _, index = merge_1d(x, 2, metric=metric)
    # Written out by hand, channel by channel:
    #   ch0 |1| |-4| |2|       -> -4 (left source largest)
    #   ch1 |-2| |1| |5|       -> 5  (right source largest)
    #   ch2 3, 3, -3 all tie   -> 3  (destination wins ties)
    #   ch3 0.5, 0.5, -0.25    -> 0.5 (destination wins the tie with the left source)
    #   ch4 1, -2, 2           -> -2 (left source wins the tie with the right source)
    expected = torch.tensor([-4.0, 5, 3, 0.5, -2])
    assert torch.equal(y[0], torch.stack([x0, expected, x4]))
    assert index[0].tolist() == [0, 1, 1, 1, 2]


def test_reference_collisions_keep_only_the_later_written_source():
    metric = torch.tensor([[1.0, 0], [0, 1], [0, 1], [0, 1], [1, 0]])[None]
    dest = torch.tensor([1.0, -2, 3, 0.5, 1])
    left = torch.tensor([-4.0, 1, 3, 0.5, -2])
    right = torch.tensor([2.0, 5, -3, -0.25, 2])
    x = torch.stack([torch.zeros(5), left, dest, right, torch.zeros(5)])[None]
    y, _, _, _ = merge_1d(x, 2, metric=metric, collisions="reference")
    # Equal scores rank token 1 first (rank 0), token 3 second (rank 1); the reference writes
    # odd ranks last, so only the right source is merged: max-magnitude of dest and right.
    assert torch.equal(y[0, 1], torch.tensor([2.0, 5, 3, 0.5, 2]))


def test_matching_picks_most_similar_odd_tokens_and_left_on_ties():
    # 6 tokens; only odd ones (1, 3, 5) may go. Token 5 has no right neighbour.
    metric = torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 1], [1, 0], [-1, 0]])[None]
    x = torch.arange(6.0)[None, :, None] + 1
    y, _, _, index = merge_1d(x, 1, metric=metric)
    # scores: token1 = max(cos(t0,t1)=1, cos(t1,t2)=0) = 1 (left);
    #         token3 = max(cos(t2,t3)=.71, cos(t3,t4)=.71) = .71 (tie -> left);
    #         token5 = cos(t4,t5) = -1. Token 1 goes, into token 0; max-magnitude(1, 2) = 2.
    assert y[0, :, 0].tolist() == [2.0, 3, 4, 5, 6]
    assert index[0].tolist() == [0, 0, 1, 2, 3, 4]
    y, _, _, index = merge_1d(x, 2, metric=metric)
    assert index[0].tolist() == [0, 0, 1, 1, 2, 3], "token 3 ties and must merge left into 2"


def test_recover_keeps_kept_slots_and_copies_destination_into_removed_slots():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 8, 3)
    y, record = cubist_merge(x, 2, 3)
    updated = y * 10 + 1  # what later blocks might do
    recovered = cubist_recover(updated, record)
    flat = updated.reshape(2, -1, 3)
    for b in range(2):
        for cell in range(48):
            assert torch.equal(recovered[b].reshape(-1, 3)[cell], flat[b, record.index[b, cell]])
    # Each reduced token appears in the recovered grid at least once, unchanged.
    for b in range(2):
        assert set(record.index[b].tolist()) == set(range(y.shape[1] * y.shape[2]))


def test_zero_reduction_is_identity_bit_for_bit():
    x = torch.randn(2, 5, 7, 3)
    y, record = cubist_merge(x, 0, 0)
    assert y is x
    assert torch.equal(cubist_recover(y, record), x)


def test_gradients_flow_to_the_selected_values_only():
    torch.manual_seed(2)
    x = torch.randn(1, 6, 6, 4, requires_grad=True)
    y, record = cubist_merge(x, 2, 2)
    y.sum().backward()
    grad = x.grad
    # Each output value comes from exactly one input value, so the gradient is a 0/1 mask
    # with exactly one 1 per output element.
    assert set(grad.unique().tolist()) <= {0.0, 1.0}
    assert grad.sum().item() == y.numel()
    flat_x, flat_g = x.detach().reshape(-1, 4), grad.reshape(-1, 4)
    for token in range(16):
        cells = record.index[0] == token
        chosen = flat_x[cells].abs().argmax(0)
        assert torch.equal(flat_g[cells].argmax(0), chosen)


def test_stages_compose_and_recover_in_reverse():
    torch.manual_seed(3)
    x = torch.randn(2, 12, 10, 3)
    y1, rec1 = cubist_merge(x, 3, 2)
    y2, rec2 = cubist_merge(y1, 2, 3)
    assert y2.shape == (2, 7, 5, 3)
    step_by_step = cubist_recover(cubist_recover(y2, rec2), rec1)
    composed = compose(rec1, rec2)
    assert composed.in_hw == (12, 10) and composed.out_hw == (7, 5)
    assert torch.equal(cubist_recover(y2, composed), step_by_step)
    with pytest.raises(ValueError, match="compose"):
        compose(rec2, rec1)


def test_mean_reduce_weights_by_sizes():
    metric = torch.tensor([[1.0, 0], [1, 0], [0, 1]])[None]
    x = torch.tensor([[2.0], [8.0], [5.0]])[None]
    size = torch.tensor([[3.0, 1.0, 1.0]])
    y, _, new_size, _ = merge_1d(x, 1, metric=metric, size=size, reduce="mean")
    # token 1 joins token 0: (3 * 2 + 1 * 8) / 4 = 3.5, sizes 4 and 1
    assert y[0, :, 0].tolist() == [3.5, 5.0]
    assert new_size[0].tolist() == [4.0, 1.0]


def test_maxnorm_keeps_the_whole_largest_norm_token():
    metric = torch.tensor([[1.0, 0], [1, 0], [0, 1]])[None]
    x = torch.tensor([[3.0, 0.0], [-2.0, 2.5], [1.0, 1.0]])[None]  # norms 3, 3.2, 1.4
    y, _, _, _ = merge_1d(x, 1, metric=metric, reduce="maxnorm")
    assert y[0].tolist() == [[-2.0, 2.5], [1.0, 1.0]]


@pytest.mark.parametrize(
    ("r_h", "r_w", "match"),
    [
        (0, 4, r"r_w=4 .* side of 7 .* floor\(7/2\)=3 tokens"),
        (5, 0, r"r_h=5 .* side of 9"),
        (-1, 0, "r_h=-1"),
        (True, 0, "r_h=True must be an int"),
        (0, 1.5, "r_w=1.5 must be an int"),
    ],
)
def test_bad_r_raises_naming_value_limit_and_grid(r_h, r_w, match):
    with pytest.raises(ValueError, match=match):
        cubist_merge(torch.randn(1, 9, 7, 2), r_h, r_w)


@pytest.mark.parametrize("ratio", [0.5, 0.7, -0.1])
def test_bad_ratio_raises(ratio):
    with pytest.raises(ValueError, match=rf"ratio={ratio} .* 0 <= ratio < 0.5"):
        ratio_to_r((64, 64), ratio)


def test_bad_rule_and_shape_raise():
    with pytest.raises(ValueError, match="reduce='avg' .* maxmag, mean, maxnorm"):
        cubist_merge(torch.randn(1, 4, 4, 2), 1, 1, reduce="avg")
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        cubist_merge(torch.randn(4, 4, 2), 1, 1)
    _, record = cubist_merge(torch.randn(1, 4, 4, 2), 1, 1)
    with pytest.raises(ValueError, match=r"record expects \(B=1, 3, 3, C\)"):
        cubist_recover(torch.randn(1, 4, 4, 2), record)
    _, record = cubist_merge(torch.randn(2, 4, 5, 2), 1, 1)
    with pytest.raises(ValueError, match=r"record expects \(B=2, 3, 4, C\); pass the record of the merge"):
        cubist_recover(torch.randn(3, 3, 3, 2), record)
    with pytest.raises(ValueError, match="r=1.5 must be an int"):
        merge_1d(torch.randn(1, 6, 2), 1.5)
    with pytest.raises(ValueError, match="collisions='first' .* exact, reference"):
        merge_1d(torch.randn(1, 6, 2), 1, collisions="first")
    with pytest.raises(ValueError, match="collisions='first' .* exact, reference"):
        cubist_merge(torch.randn(1, 4, 4, 2), 1, 1, collisions="first")
    with pytest.raises(ValueError, match="reduce='avg' .* maxmag, mean, maxnorm"):
        merge_1d(torch.randn(1, 6, 2), 1, reduce="avg")


def test_ratio_to_r_rounds_per_axis():
    assert ratio_to_r((64, 48), 0.125) == (8, 6)
    assert ratio_to_r((14, 14), 0.1) == (1, 1)


@pytest.mark.parametrize(
    ("ratio", "side"),
    [(0.125, 56), (0.1, 56), (0.3, 42), (0.35, 42), (0.0, 64), (0.04, 64), (0.49, 42)],
)
def test_window_aligned_r_lands_on_window_multiples(ratio, side):
    r_h, r_w = window_aligned_r((64, 64), ratio, 14)
    assert 64 - r_h == side and 64 - r_w == side


def test_window_aligned_r_stays_reachable():
    # 20 can reach 14 (asked 11). 30 asks for 16 but can only reach 15..30: 28 is the nearest
    # multiple of 14 there. 10 can reach no multiple of 14, so it is left unmerged.
    assert window_aligned_r((20, 30), 0.45, 14) == (6, 2)
    assert window_aligned_r((10, 10), 0.2, 14) == (0, 0)


def test_window_aligned_r_edges_by_hand():
    # 15 with windows of 7: 14 is reachable (asked 15 - round(0.75) = 14), 7 is not (7 < 15 / 2)
    assert window_aligned_r((15, 15), 0.05, 7) == (1, 1)
    # exactly half is reachable: 28 -> 14 (asked 28 - round(13.72) = 14)
    assert window_aligned_r((28, 28), 0.49, 14) == (14, 14)
    # asked 29 of 30, equally far from 28 and 30: the tie keeps more tokens
    assert window_aligned_r((30, 30), 0.04, 14) == (0, 0)
    # a window of 1 reaches every side: the plain per-axis rounding
    assert window_aligned_r((10, 12), 0.2, 1) == ratio_to_r((10, 12), 0.2) == (2, 2)
    with pytest.raises(ValueError, match="window=0 must be >= 1"):
        window_aligned_r((10, 10), 0.2, 0)


def test_record_is_a_plain_value():
    record = CubistRecord(torch.zeros(1, 4, dtype=torch.long), (2, 2), (1, 1))
    assert cell_sizes(record).tolist() == [[[4.0]]]


def test_equal_similarities_pick_the_leftmost_odd_tokens_and_their_left_neighbours():
    """All tokens alike: every score ties, so the stable sort takes the first odd tokens and
    each goes to its left neighbour (the rule that makes ties the same on every device)."""
    same = torch.ones(1, 6, 4)
    assert merge_1d(same, 1)[3].tolist() == [[0, 0, 1, 2, 3, 4]]
    assert merge_1d(same, 2)[3].tolist() == [[0, 0, 1, 1, 2, 3]]


def test_the_metric_decides_the_matching_of_both_passes():
    torch.manual_seed(0)
    x, metric = torch.randn(2, 5, 7, 8), torch.randn(2, 5, 7, 3)
    by_metric = cubist_merge(x, 2, 3, metric=metric)[1].index
    assert torch.equal(by_metric, cubist_merge(metric, 2, 3)[1].index)
    assert not torch.equal(by_metric, cubist_merge(x, 2, 3)[1].index)


def test_removing_nothing_maps_every_position_to_itself():
    x = torch.randn(3, 2, 5, 4)
    y, metric, size, index = merge_1d(x, 0)
    assert y is x and metric is None and size is None
    assert torch.equal(index, torch.arange(5).expand(3, 2, 5))


def test_float64_tokens_are_matched_in_float64():
    """Token 1's cosine with token 0 is 1 - 5e-11, token 3's with token 2 exactly 1: float64
    tells them apart and removes token 3; in float32 both round to 1 and the tie rule would
    remove token 1."""
    metric = torch.tensor([[1.0, 0.0], [1.0, 1e-5], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)[None]
    x = torch.arange(4, dtype=torch.float64)[None, :, None]
    assert merge_1d(x, 1, metric=metric)[3].tolist() == [[0, 1, 2, 2]]
    assert merge_1d(x.float(), 1, metric=metric.float())[3].tolist() == [[0, 0, 1, 2]]


@pytest.mark.parametrize("n", [1, 2, 5, 16, 33])
def test_the_sort_free_ordering_is_a_stable_sorts_ties_included(n):
    from spatialmerge.merging.cubist import _descending_rank, _true_positions

    generator = torch.Generator().manual_seed(n)
    for _ in range(50):
        score = torch.randint(0, 3, (2, 4, n), generator=generator).float()  # many ties
        score[0, 0, -1] = float("-inf")  # a last odd token without a right neighbour
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n).expand_as(order))
        assert torch.equal(_descending_rank(score), rank)
        for r in range(n + 1):
            assert torch.equal(_true_positions(rank < r, r), order[..., :r].sort(dim=-1).values)
        kept = torch.zeros(2, 4, n, dtype=torch.bool).scatter_(
            -1, torch.rand(2, 4, n, generator=generator).argsort(-1)[..., : n // 2 + 1], True
        )
        stable = torch.sort((~kept).to(torch.uint8), dim=-1, stable=True).indices[..., : n // 2 + 1]
        assert torch.equal(_true_positions(kept, n // 2 + 1), stable)
