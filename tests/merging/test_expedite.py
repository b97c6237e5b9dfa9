"""Expedite clustering and reconstruction: shapes, hand-checked updates, masking, errors, dtypes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spatialmerge.merging.expedite import (
    ExpediteRecord,
    expedite_cluster,
    expedite_reconstruct,
)


@pytest.mark.parametrize(
    ("hw", "out_hw"),
    [((8, 8), (4, 4)), ((6, 10), (3, 5)), ((7, 5), (7, 5)), ((9, 4), (2, 1)), ((5, 7), (1, 1))],
)
def test_shapes_for_square_and_non_square_grids(hw, out_hw):
    torch.manual_seed(0)
    x = torch.randn(2, *hw, 3)
    k = min(20, out_hw[0] * out_hw[1])
    y, record = expedite_cluster(x, out_hw, k=k)
    assert y.shape == (2, *out_hw, 3) and y.dtype == x.dtype
    assert record.in_hw == hw and record.out_hw == out_hw and record.k == k
    assert record.tokens.shape == (2, hw[0] * hw[1], 3)
    assert record.centroids.shape == (2, out_hw[0] * out_hw[1], 3)
    assert record.labels.shape == (2, hw[0] * hw[1])
    assert expedite_reconstruct(y, record).shape == (2, *hw, 3)


def _two_regions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # squared distance between a and b is 2312, so exp(-2312 * 0.01) ~ 1e-10: no leakage
    a = torch.tensor([20.0, -5.0, 3.0, 12.0])
    b = -a
    x = torch.empty(2, 4, 6, 4)
    x[:, :, :3] = a
    x[:, :, 3:] = b
    return x, a, b


def test_two_flat_regions_cluster_to_their_values_and_reconstruct():
    x, a, b = _two_regions()
    y, record = expedite_cluster(x, (4, 2), k=4)
    assert torch.allclose(y[:, :, 0], a.expand(2, 4, 4), atol=1e-4)
    assert torch.allclose(y[:, :, 1], b.expand(2, 4, 4), atol=1e-4)
    # left-half tokens belong to left-column centroids (even flat index), right half to odd
    labels = record.labels.view(2, 4, 6)
    assert (labels[:, :, :3] % 2 == 0).all() and (labels[:, :, 3:] % 2 == 1).all()
    assert torch.allclose(expedite_reconstruct(y, record), x, atol=1e-4)


def test_reconstruction_mixes_the_recorded_similar_centroids():
    # a left-half token's 4 nearest centroids are the 4 left-column ones, all at distance 0,
    # so it receives the plain mean of whatever those centroids hold now
    x, _, _ = _two_regions()
    _, record = expedite_cluster(x, (4, 2), k=4)
    y = torch.randn(2, 4, 2, 5)
    out = expedite_reconstruct(y, record)
    assert out.shape == (2, 4, 6, 5)
    assert torch.allclose(out[:, :, :3], y[:, :, 0].mean(1)[:, None, None], atol=1e-5)
    assert torch.allclose(out[:, :, 3:], y[:, :, 1].mean(1)[:, None, None], atol=1e-5)


def test_reconstruction_weights_by_hand():
    # one token at 0, centroids at 1, 2, 3 (squared distances 1, 4, 9), temperature 1, k=2:
    # weights softmax(-1, -4) on the two nearest centroids, the third gets 0
    record = ExpediteRecord(
        tokens=torch.zeros(1, 1, 1),
        centroids=torch.tensor([[[1.0], [2.0], [3.0]]]),
        labels=torch.zeros(1, 1, dtype=torch.long),
        in_hw=(1, 1),
        out_hw=(1, 3),
        k=2,
        temperature=1.0,
    )
    y = torch.tensor([10.0, 20.0, 30.0]).view(1, 1, 3, 1)
    w1, w2 = math.exp(-1.0), math.exp(-4.0)
    expected = (w1 * 10 + w2 * 20) / (w1 + w2)
    assert torch.allclose(expedite_reconstruct(y, record).view(()), torch.tensor(expected))


def test_one_iteration_by_hand():
    # tokens 0 and 1 start as their own centroids; each token's affinity is a softmax over
    # (0, -t) of -squared distance * t, so centroid 0 moves to e^-t / (1 + e^-t) = sigmoid(-t)
    x = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1)
    y, _ = expedite_cluster(x, (1, 2), n_iters=1, temperature=1.0, k=None)
    c0 = 1 / (1 + math.e)
    assert torch.allclose(y.view(-1), torch.tensor([c0, 1 - c0]))


def test_window_limits_which_centroids_a_token_can_join():
    x = torch.arange(8.0).view(1, 1, 8, 1)
    # radius 0: each token only joins its own centroid, which therefore never moves
    y, record = expedite_cluster(x, (1, 8), window_size=1, k=None)
    assert torch.equal(y, x)
    assert torch.equal(record.labels, torch.arange(8)[None])
    # radius 1 with a near-zero temperature (uniform weights inside the window): centroid 0
    # is joined by token 0 (weight 1/2 over centroids 0, 1) and token 1 (1/3 over 0, 1, 2);
    # (0 * 1/2 + 1 * 1/3) / (1/2 + 1/3) = 0.4, while a full window would give the mean 3.5
    y, _ = expedite_cluster(x, (1, 8), n_iters=1, temperature=1e-9, window_size=3, k=None)
    assert torch.allclose(y[0, 0, 0, 0], torch.tensor(0.4), atol=1e-5)


def test_constant_grid_reconstructs_exactly():
    value = torch.randn(6)
    x = value.expand(2, 7, 9, 6).clone()
    y, record = expedite_cluster(x, (3, 4), k=None)
    assert torch.allclose(y, value.expand(2, 3, 4, 6), atol=1e-5)
    assert torch.allclose(expedite_reconstruct(y, record), x, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_and_keeps_dtype(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 4)
    y32, record32 = expedite_cluster(x, (4, 3), k=6)
    y, record = expedite_cluster(x.to(dtype), (4, 3), k=6)
    out = expedite_reconstruct(y, record)
    assert y.dtype == dtype and out.dtype == dtype and out.shape == x.shape
    assert torch.allclose(y.float(), y32, atol=0.05)
    assert torch.allclose(out.float(), expedite_reconstruct(y32, record32), atol=0.05)


def test_gradients_reach_the_input_through_both_steps():
    x = torch.randn(1, 6, 6, 3, requires_grad=True)
    y, record = expedite_cluster(x, (3, 3), k=4)
    expedite_reconstruct(y, record).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"out_hw": (0, 2)}, r"out_hw=\(0, 2\).*1 <= H' <= 5"),
        ({"out_hw": (6, 2)}, r"out_hw=\(6, 2\).*1 <= H' <= 5"),
        ({"out_hw": (2, 7)}, r"1 <= W' <= 6"),
        ({"out_hw": (2,)}, "two ints"),
        ({"window_size": 4}, "window_size=4.*odd"),
        ({"window_size": 0}, "window_size=0.*odd"),
        ({"n_iters": 0}, "n_iters=0"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"k": 0}, "k=0"),
        ({"k": 7}, "k=7 exceeds the 6 centroids.*k <= 6.*k=None"),
    ],
)
def test_bad_arguments_name_value_limit_and_fix(kwargs, match):
    args = {"out_hw": (2, 3)} | kwargs
    with pytest.raises(ValueError, match=match):
        expedite_cluster(torch.randn(1, 5, 6, 2), **args)


def test_reconstruct_rejects_a_grid_of_another_size():
    y, record = expedite_cluster(torch.randn(1, 5, 6, 2), (2, 3), k=None)
    with pytest.raises(ValueError, match="H'=2, W'=3"):
        expedite_reconstruct(y[:, :, :2], record)


@st.composite
def grids(draw):
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 8))
    w = draw(st.integers(1, 8))
    out_h = draw(st.integers(1, h))
    out_w = draw(st.integers(1, w))
    c = draw(st.integers(1, 4))
    window = draw(st.sampled_from([1, 3, 5]))
    k = draw(st.one_of(st.none(), st.integers(1, out_h * out_w)))
    seed = draw(st.integers(0, 2**16))
    return b, h, w, out_h, out_w, c, window, k, seed


@settings(max_examples=40, deadline=None)
@given(grids())
def test_any_grid_gives_shapes_and_labels_inside_the_window(case):
    b, h, w, out_h, out_w, c, window, k, seed = case
    x = torch.randn(b, h, w, c, generator=torch.Generator().manual_seed(seed))
    y, record = expedite_cluster(x, (out_h, out_w), window_size=window, k=k)
    assert y.shape == (b, out_h, out_w, c) and torch.isfinite(y).all()
    out = expedite_reconstruct(y, record)
    assert out.shape == x.shape and torch.isfinite(out).all()

    # a token's label cell lies within window // 2 of its nearest-interpolated cell
    labels = record.labels.view(b, h, w)
    own_row = (torch.arange(h) * out_h // h)[:, None]
    own_col = (torch.arange(w) * out_w // w)[None, :]
    assert ((labels // out_w - own_row).abs() <= window // 2).all()
    assert ((labels % out_w - own_col).abs() <= window // 2).all()
