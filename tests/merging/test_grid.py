"""reduce_grid: every method shrinks a grid to the asked size and recovers it."""

import pytest
import torch

from segment_anything.modeling.image_encoder import window_partition as sam_window_partition
from segment_anything.modeling.image_encoder import window_unpartition as sam_window_unpartition

from spatialmerge.merging import reduce_grid
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
    with pytest.raises(ValueError, match=r"out_window=5 must be an int in \[1, 4\]"):
        reduce_windows("pool", torch.randn(1, 8, 8, 2), 4, 5)


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
