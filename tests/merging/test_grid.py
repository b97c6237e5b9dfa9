"""reduce_grid: every method shrinks a grid to the asked size and recovers it."""

import pytest
import torch

from segment_anything.modeling.image_encoder import window_partition as sam_window_partition
from segment_anything.modeling.image_encoder import window_unpartition as sam_window_unpartition

from spatialmerge.merging import cubist_merge, reduce_grid
from spatialmerge.merging.grid import reduce_windows, window_partition, window_unpartition


@pytest.mark.parametrize("method", ["cubist", "tome", "expedite", "oracle", "pool"])
@pytest.mark.parametrize("out_hw", [(7, 6), (5, 5), (4, 4)])  # all within one cubist pass
def test_every_method_reaches_the_grid_and_recovers(method, out_hw):
    x = torch.randn(2, 8, 7, 4)
    options = {"k": 4} if method == "expedite" else {}
    y, record = reduce_grid(method, x, out_hw, **options)
    assert y.shape == (2, *out_hw, 4)
    assert record.recover(y).shape == x.shape
    assert record.assignment.shape == (2, 56)
    assert 0 <= record.assignment.min() and record.assignment.max() < out_hw[0] * out_hw[1]


def test_single_layer_tome_past_half_the_tokens_keeps_size_weighted_means():
    # 8x8 -> 3x3 removes 55 of 64 tokens: more than one bipartite step can.
    x = torch.randn(1, 8, 8, 3)
    y, record = reduce_grid("tome", x, (3, 3))
    flat = x.reshape(64, 3)
    for token in range(9):
        cells = record.assignment[0] == token
        assert cells.any()
        torch.testing.assert_close(y.reshape(9, 3)[token], flat[cells].mean(0), rtol=1e-5, atol=1e-5)


def test_oracle_keeps_the_top_left_tokens_and_recovers_by_nearest():
    x = torch.arange(16.0).reshape(1, 4, 4, 1)
    y, record = reduce_grid("oracle", x, (2, 2))
    assert y.flatten().tolist() == [0.0, 1.0, 4.0, 5.0]
    assert record.recover(y)[0, :, :, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [4, 4, 5, 5], [4, 4, 5, 5]]


def test_bad_method_and_options_raise():
    x = torch.randn(1, 4, 4, 2)
    with pytest.raises(ValueError, match="not a grid method"):
        reduce_grid("median", x, (2, 2))
    with pytest.raises(ValueError, match="does not take option"):
        reduce_grid("oracle", x, (2, 2), k=3)
    with pytest.raises(ValueError, match="separate metric"):
        reduce_grid("expedite", x, (2, 2), metric=x, k=3)


def test_pool_averages_each_cell_and_recovers_by_nearest():
    x = torch.arange(16.0).reshape(1, 4, 4, 1)
    y, record = reduce_grid("pool", x, (2, 2))
    assert y.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert record.recover(y)[0, :, :, 0].tolist() == [
        [2.5, 2.5, 4.5, 4.5], [2.5, 2.5, 4.5, 4.5], [10.5, 10.5, 12.5, 12.5], [10.5, 10.5, 12.5, 12.5]
    ]


@pytest.mark.parametrize(("hw", "window"), [((64, 64), 14), ((9, 12), 4), ((8, 8), 4)])
def test_window_partition_equals_segment_anythings(hw, window):
    x = torch.randn(2, *hw, 3)
    windows, counts = window_partition(x, window)
    expected, pad_hw = sam_window_partition(x, window)
    assert torch.equal(windows, expected)
    assert counts == (pad_hw[0] // window, pad_hw[1] // window)
    assert torch.equal(window_unpartition(windows, counts)[:, : hw[0], : hw[1]],
                       sam_window_unpartition(expected, window, pad_hw, hw))


def test_per_window_reduction_reduces_each_window_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 12, 3)  # pads to 12x12: 3x3 windows of 4
    y, record = reduce_windows("expedite", x, 4, 3, k=4)
    assert y.shape == (2, 9, 9, 3) and record.out_hw == (9, 9) and record.block_window == 3
    # window (1, 2) of the reduced grid is the clustering of window (1, 2) of the padded input
    windows, _ = window_partition(x, 4)
    alone, alone_record = reduce_grid("expedite", windows[5:6], (3, 3), k=4)
    torch.testing.assert_close(y[:1, 3:6, 6:9], alone)
    # the assignment points each cell into its own window's centroids
    cells = record.assignment.view(2, 9, 12)[0, 4:8, 8:12]
    expected = alone_record.assignment.view(4, 4)
    assert torch.equal(cells, (3 + expected // 3) * 9 + 6 + expected % 3)
    recovered = record.recover(y)
    assert recovered.shape == x.shape
    torch.testing.assert_close(recovered[:1, 4:8, 8:12], alone_record.recover(alone)[0][None])


def test_per_window_reduction_refuses_a_side_outside_the_window():
    for bad in (5, 0, True, 2.0):
        with pytest.raises(ValueError, match=rf"out_window={bad!r} must be an int in \[1, 4\]: each 4x4"):
            reduce_windows("pool", torch.randn(1, 8, 8, 2), 4, bad)


@pytest.mark.parametrize("out_window", [1, 4])  # one token per window; windows kept whole
def test_per_window_reduction_accepts_both_ends_and_records_what_ran(out_window):
    y, record = reduce_windows("pool", torch.randn(1, 6, 8, 2), 4, out_window)
    side = 2 * out_window  # 6x8 pads to 8x8: 2x2 windows
    assert y.shape == (1, side, side, 2)
    assert (record.method, record.in_hw, record.out_hw, record.block_window) == ("pool", (6, 8), (side, side), out_window)


@pytest.mark.parametrize("out_hw", [(26, 26), (24, 25)])
def test_cubist_2d_merge_reduces_exactly_the_cells_its_assignment_names(out_hw):
    # Over both passes (rows, then columns) each output token must be the rule applied to the
    # original cells mapped to it: the size-weighted mean for "mean" (a cell merged in both
    # passes counts every patch once), the signed value of largest magnitude per channel for
    # "maxmag". Checked cell by cell from the assignment, not from the merge's own arithmetic.
    torch.manual_seed(0)
    x = torch.randn(2, 32, 32, 8)
    flat = x.flatten(1, 2)  # (B, HW, C)
    for reduce in ("mean", "maxmag"):
        y, record = reduce_grid("cubist", x, out_hw, reduce=reduce)
        y = y.flatten(1, 2)
        for b in range(2):
            for token in range(out_hw[0] * out_hw[1]):
                cells = flat[b, record.assignment[b] == token]  # (n, C)
                assert len(cells) >= 1
                if reduce == "mean":
                    expected = cells.mean(0)
                else:
                    expected = cells.gather(0, cells.abs().argmax(0, keepdim=True))[0]
                torch.testing.assert_close(y[b, token], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["cubist", "tome", "expedite", "oracle", "pool"])
def test_record_names_its_method_and_both_grids(method):
    options = {"k": 4} if method == "expedite" else {}
    _, record = reduce_grid(method, torch.randn(2, 8, 7, 4), (5, 6), **options)
    assert (record.method, record.in_hw, record.out_hw) == (method, (8, 7), (5, 6))


# one cubist pass removes at most half of each side; the others reach any grid
RECOVERY_CASES = [("cubist", hw) for hw in [(4, 4), (8, 5), (6, 7)]] + [
    (method, hw) for method in ("tome", "oracle", "pool") for hw in [(4, 3), (8, 5), (6, 7), (1, 7), (8, 1)]
]


@pytest.mark.parametrize("method,out_hw", RECOVERY_CASES)
def test_recovery_gives_every_cell_the_token_its_assignment_names(method, out_hw):
    """The assignment (source maps, positions) and the recovery (dense outputs) describe the same
    map, including sides that are kept whole, reduced to one, or do not divide evenly."""
    x = torch.randn(2, 8, 7, 4)
    y, record = reduce_grid(method, x, out_hw)
    gathered = y.reshape(2, -1, 4).gather(1, record.assignment[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(record.recover(y), gathered.view(2, 8, 7, 4))


def test_pool_and_oracle_assign_cells_by_floor_of_their_scaled_position():
    # (7, 5) -> (3, 2): row i goes to floor(3 i / 7), column j to floor(2 j / 5)
    rows, cols = [0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1]
    expected = [[row * 2 + col for col in cols] for row in rows]
    for method in ("pool", "oracle"):
        _, record = reduce_grid(method, torch.randn(1, 7, 5, 2), (3, 2))
        assert record.assignment.view(7, 5).tolist() == expected


@pytest.mark.parametrize("method", ["tome", "expedite", "oracle", "pool"])
@pytest.mark.parametrize("out_hw", [(0, 3), (3, 0), (7, 3), (3, 8)])
def test_a_target_grid_outside_the_input_is_refused(method, out_hw):
    with pytest.raises(ValueError, match=r"must fit inside|1 <= [HW]' <="):
        reduce_grid(method, torch.randn(1, 6, 7, 2), out_hw)


def test_an_option_a_method_does_not_take_says_it_takes_none():
    with pytest.raises(ValueError, match=r"pool does not take option\(s\) \['k'\]; it takes none"):
        reduce_grid("pool", torch.randn(1, 4, 4, 2), (2, 2), k=3)


def test_cubist_through_reduce_grid_matches_on_the_metric_it_is_given():
    x, metric = torch.randn(2, 8, 9, 4), torch.randn(2, 8, 9, 3)
    y, record = reduce_grid("cubist", x, (5, 6), metric=metric)
    expected, expected_record = cubist_merge(x, 3, 3, metric=metric)
    assert torch.equal(y, expected) and torch.equal(record.assignment, expected_record.index)
    _, unguided = reduce_grid("cubist", x, (5, 6))
    assert not torch.equal(record.assignment, unguided.assignment), "the metric must decide"


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("out_hw", [(6, 6), (3, 3), (2, 1)])  # one bipartite step; several steps
def test_single_layer_tome_matches_on_the_metric_and_averages_the_tokens(out_hw, seed):
    """ToMe's matching sees only the features it matches on and the sizes, so merging x with
    metric m groups cells exactly as merging m itself (its later steps on size-weighted means of
    m); the output is each group's mean of x."""
    torch.manual_seed(seed)
    x, metric = torch.randn(2, 8, 8, 4), torch.randn(2, 8, 8, 3)
    y, record = reduce_grid("tome", x, out_hw, metric=metric)
    _, on_metric = reduce_grid("tome", metric, out_hw)
    assert torch.equal(record.assignment, on_metric.assignment)
    groups = record.assignment
    for i in range(2):
        for slot in range(out_hw[0] * out_hw[1]):
            members = x[i].reshape(64, 4)[groups[i] == slot]
            torch.testing.assert_close(y[i].reshape(-1, 4)[slot], members.mean(0), rtol=1e-5, atol=1e-5)
    _, unguided = reduce_grid("tome", x, out_hw)
    assert not torch.equal(record.assignment, unguided.assignment), "the metric must decide"


@pytest.mark.parametrize("method,options", [("cubist", {}), ("pool", {}), ("expedite", {"k": 4, "temperature": 1.0})])
def test_per_window_assignment_points_every_cell_into_its_own_windows_tokens(method, options):
    torch.manual_seed(0)
    x = 3 * torch.randn(2, 9, 12, 3)  # pads to 12x12: 3x3 windows of 4, reduced to 3x3 each
    _, record = reduce_windows(method, x, 4, 3, **options)
    windows, _ = window_partition(x, 4)
    flat = record.assignment.view(2, 9, 12)
    for i in range(2):
        for wr in range(3):
            for wc in range(3):
                _, alone = reduce_grid(method, windows[i * 9 + wr * 3 + wc][None], (3, 3), **options)
                local = alone.assignment.view(4, 4)[: 9 - 4 * wr]  # the padding rows are cropped
                expected = (3 * wr + local // 3) * 9 + 3 * wc + local % 3
                assert torch.equal(flat[i, 4 * wr : 4 * wr + 4, 4 * wc : 4 * wc + 4], expected)
    assert len(record.assignment.unique()) > 30, "a collapsed clustering would not test the map"


def test_single_layer_tome_one_token_past_a_full_bipartite_step():
    # 9x8 -> 5x7 removes 37 tokens: one step removes at most 36 (set A of 72), so a second
    # step removes the last one
    x = torch.randn(1, 9, 8, 3)
    y, record = reduce_grid("tome", x, (5, 7))
    assert y.shape == (1, 5, 7, 3)
    assert sorted(record.assignment.unique().tolist()) == list(range(35))
