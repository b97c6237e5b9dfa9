"""reduce_grid: every method shrinks a grid to the asked size and recovers it."""

import pytest
import torch

from spatialmerge.merging import reduce_grid


@pytest.mark.parametrize("method", ["cubist", "tome", "expedite", "oracle"])
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
        reduce_grid("pool", x, (2, 2))
    with pytest.raises(ValueError, match="does not take option"):
        reduce_grid("oracle", x, (2, 2), k=3)
    with pytest.raises(ValueError, match="separate metric"):
        reduce_grid("expedite", x, (2, 2), metric=x, k=3)
