"""Expedite clustering and reconstruction: shapes, hand-checked updates, masking, errors, dtypes,
and equality with the public references' formulas (written here from their description)."""

import math

import torch.nn.functional as F

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spatialmerge.merging.expedite import (
    AUTO_TEMPERATURE_SCALE,
    ExpediteRecord,
    auto_temperature,
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
    y, record = expedite_cluster(x, (4, 2), k=4, reconstruct="softmax")
    assert torch.allclose(y[:, :, 0], a.expand(2, 4, 4), atol=1e-4)
    assert torch.allclose(y[:, :, 1], b.expand(2, 4, 4), atol=1e-4)
    # left-half tokens belong to left-column centroids (even flat index), right half to odd
    labels = record.labels.view(2, 4, 6)
    assert (labels[:, :, :3] % 2 == 0).all() and (labels[:, :, 3:] % 2 == 1).all()
    assert torch.allclose(expedite_reconstruct(y, record), x, atol=1e-4)
    # the references' L2-normalised weights: four equal weights of 1/2 each, so a token gets
    # twice the (equal) centroid value, the sqrt(k) scaling the softmax rule avoids
    _, l2_record = expedite_cluster(x, (4, 2), k=4)
    assert torch.allclose(expedite_reconstruct(y, l2_record), 2 * x, atol=1e-3)


def test_reconstruction_mixes_the_recorded_similar_centroids():
    # a left-half token's 4 nearest centroids are the 4 left-column ones, all at distance 0,
    # so it receives the plain mean of whatever those centroids hold now
    x, _, _ = _two_regions()
    _, record = expedite_cluster(x, (4, 2), k=4, reconstruct="softmax")
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
        temperature=torch.ones(1, 1, 1),
        reconstruct="softmax",
    )
    y = torch.tensor([10.0, 20.0, 30.0]).view(1, 1, 3, 1)
    w1, w2 = math.exp(-1.0), math.exp(-4.0)
    expected = (w1 * 10 + w2 * 20) / (w1 + w2)
    assert torch.allclose(expedite_reconstruct(y, record).view(()), torch.tensor(expected))
    # the references' rule: the same two weights divided by their L2 norm
    l2 = ExpediteRecord(**{**record.__dict__, "reconstruct": "l2"})
    expected_l2 = (w1 * 10 + w2 * 20) / math.hypot(w1, w2)
    assert torch.allclose(expedite_reconstruct(y, l2).view(()), torch.tensor(expected_l2))


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
    y, record = expedite_cluster(x, (3, 4), k=None, reconstruct="softmax")
    assert torch.allclose(y, value.expand(2, 3, 4, 6), atol=1e-5)
    assert torch.allclose(expedite_reconstruct(y, record), x, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_and_keeps_dtype(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 4)
    y32, record32 = expedite_cluster(x, (4, 3), k=6, reconstruct="softmax")
    y, record = expedite_cluster(x.to(dtype), (4, 3), k=6, reconstruct="softmax")
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
        ({"temperature": "hot"}, "temperature='hot'.*or 'auto'"),
        ({"reconstruct": "sum"}, "reconstruct='sum'.*l2, softmax"),
        ({"k": 0}, "k=0"),
        ({"k": 7}, "k=7 exceeds the 6 centroids.*k <= 6.*k=None"),
        ({"out_hw": (2.0, 3)}, r"out_hw=\(2.0, 3\) must be two ints"),
        ({"n_iters": True}, "n_iters=True must be an int"),
        ({"window_size": True}, "window_size=True must be a positive odd int"),
        ({"k": True}, "k=True must be an int"),
        ({"temperature": math.inf}, "temperature=inf must be a finite number"),
        ({"window_size": 3.0}, "window_size=3.0 must be a positive odd int"),
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
def test_any_grid_gives_finite_shapes_and_nearest_centroid_labels(case):
    b, h, w, out_h, out_w, c, window, k, seed = case
    x = torch.randn(b, h, w, c, generator=torch.Generator().manual_seed(seed))
    y, record = expedite_cluster(x, (out_h, out_w), window_size=window, k=k)
    assert y.shape == (b, out_h, out_w, c) and torch.isfinite(y).all()
    out = expedite_reconstruct(y, record)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # as the references: hard labels are the nearest centroid over all of them, unmasked
    dist = torch.cdist(x.reshape(b, h * w, c), record.centroids) ** 2
    assert (dist.gather(2, record.labels[..., None]) <= dist.min(2, keepdim=True).values + 1e-4).all()


# Reference formulas, written from the description of Expedit-SAM's TokenClusteringBlock and
# TokenReconstructionBlock (channels-first distances, a 1e16 penalty outside the window, a
# softmax over centroids, the clamp(1e-16) division, unmasked argmin labels; exp weights, top k
# with ties, F.normalize).
def _reference_cluster(x, out_hw, n_iters, temperature, window_size):
    b, h, w, c = x.shape
    feats = x.permute(0, 3, 1, 2)  # (B, C, H, W)
    centroids = F.adaptive_avg_pool2d(feats, out_hw).reshape(b, c, -1)  # (B, C, K)
    num = out_hw[0] * out_hw[1]
    labels = torch.arange(num, dtype=torch.float32).reshape(1, 1, *out_hw)
    init = F.interpolate(labels, size=(h, w), mode="nearest").reshape(1, -1)  # (1, N)
    spix = torch.arange(num)[None, :, None]  # (1, K, 1)
    rel_w = init[:, None] % out_hw[1] - spix % out_hw[1]
    rel_h = torch.div(init[:, None], out_hw[1], rounding_mode="trunc") - torch.div(
        spix, out_hw[1], rounding_mode="trunc"
    )
    radius = window_size // 2
    outside = ~((rel_w.abs() <= radius) & (rel_h.abs() <= radius))  # (1, K, N)
    pixels = feats.reshape(b, c, -1)  # (B, C, N)

    def dist(f1, f2):  # (B, C, N), (B, C, K) -> (B, K, N)
        return (f1 * f1).sum(1)[:, None] + (f2 * f2).sum(1)[:, :, None] - 2 * torch.einsum(
            "bcm,bcn->bmn", f2, f1
        )

    for _ in range(n_iters):
        affinity = (-(dist(pixels, centroids) + outside * 1e16) * temperature).softmax(1)
        centroids = affinity @ pixels.transpose(1, 2)  # (B, K, C)
        centroids = centroids / affinity.sum(2, keepdim=True).clamp(min=1e-16)
        centroids = centroids.transpose(1, 2)
    hard = dist(pixels, centroids).argmin(1)  # (B, N)
    return centroids.transpose(1, 2), hard  # (B, K, C), (B, N)


def _reference_reconstruct(tokens, centroids_then, centroids_now, k, temperature):
    ds = (tokens * tokens).sum(2)[:, :, None] + (centroids_then * centroids_then).sum(2)[:, None] - 2 * (
        torch.einsum("bnc,bmc->bnm", tokens, centroids_then)
    )
    ds[ds < 0] = 0
    weight = torch.exp(-temperature * ds)
    kth = weight.topk(k, dim=2).values.min(-1).values[..., None]
    attention = F.normalize(torch.where(weight >= kth, weight, torch.zeros_like(weight)), dim=2)
    return torch.einsum("bnm,bmc->bnc", attention, centroids_now)


@pytest.mark.parametrize("seed", range(6))
def test_clustering_labels_and_reconstruction_equal_the_reference_formulas(seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = [(8, 8), (14, 14), (7, 10)][seed % 3]
    out_hw = [(4, 4), (11, 11), (5, 6)][seed % 3]
    # features of unit-ish scale, so a fixed temperature of 0.5 keeps every centroid alive
    x = torch.randn(2, h, w, 6, generator=gen)
    n_iters, temperature, window, k = 3, 0.5, 5, min(9, out_hw[0] * out_hw[1])
    y, record = expedite_cluster(x, out_hw, n_iters=n_iters, temperature=temperature, window_size=window, k=k)
    ref_centroids, ref_labels = _reference_cluster(x, out_hw, n_iters, temperature, window)
    torch.testing.assert_close(y.reshape(2, -1, 6), ref_centroids, rtol=1e-4, atol=1e-4)
    assert torch.equal(record.labels, ref_labels)
    now = torch.randn(2, *out_hw, 6, generator=gen)
    expected = _reference_reconstruct(x.reshape(2, h * w, 6), ref_centroids, now.reshape(2, -1, 6), k, temperature)
    torch.testing.assert_close(expedite_reconstruct(now, record).reshape(2, h * w, 6), expected, rtol=1e-4, atol=1e-4)


def test_reconstruction_keeps_every_tie_at_the_kth_weight():
    # a token at 0 with centroids at distances 1, 2, 2, 3: k=2 keeps the nearest and both ties
    record = ExpediteRecord(
        tokens=torch.zeros(1, 1, 1),
        centroids=torch.tensor([[[1.0], [2.0], [-2.0], [3.0]]]),
        labels=torch.zeros(1, 1, dtype=torch.long),
        in_hw=(1, 1),
        out_hw=(1, 4),
        k=2,
        temperature=torch.ones(1, 1, 1),
        reconstruct="l2",
    )
    y = torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(1, 1, 4, 1)
    w = torch.tensor([math.exp(-1), math.exp(-4), math.exp(-4), 0.0])
    expected = (w * y.flatten()).sum() / w.norm()
    assert torch.allclose(expedite_reconstruct(y, record).view(()), expected)


def test_a_starved_centroid_keeps_its_pooled_value_instead_of_becoming_zero():
    # columns 0-1 hold a, columns 2-3 hold b; pooled to 3 centroids, the middle one starts at
    # (a + b) / 2, 400 away (squared) from every token, while each token has a centroid at
    # distance 0: at temperature 100 its affinity underflows to exactly 0. The references then
    # divide 0 by 1e-16 and emit a zero token.
    a, b = torch.full((4,), 10.0), torch.full((4,), 30.0)
    x = torch.cat([a.expand(1, 3, 2, 4), b.expand(1, 3, 2, 4)], dim=2)  # (1, 3, 4, 4)
    ref_centroids, _ = _reference_cluster(x, (1, 3), 2, 100.0, 3)
    assert (ref_centroids[0, 1] == 0).all(), "the input no longer starves the middle centroid"
    y, _ = expedite_cluster(x, (1, 3), n_iters=2, temperature=100.0, window_size=3, k=None)
    torch.testing.assert_close(y[0, 0], torch.stack([a, (a + b) / 2, b]))


def test_auto_temperature_is_scale_free():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 6, 4)
    t = auto_temperature(x)
    assert t.shape == (2, 1, 1)
    torch.testing.assert_close(auto_temperature(10 * x), t / 100)
    # the same grid at ten times the scale clusters identically under "auto"
    y1, r1 = expedite_cluster(x, (3, 3), temperature="auto", k=4)
    y10, r10 = expedite_cluster(10 * x, (3, 3), temperature="auto", k=4)
    torch.testing.assert_close(y10, 10 * y1, rtol=1e-4, atol=1e-4)
    assert torch.equal(r1.labels, r10.labels)
    # by hand: neighbours of a 1x2 grid [0, 2] are 4 apart in squared distance
    two = torch.tensor([0.0, 2.0]).view(1, 1, 2, 1)
    assert auto_temperature(two).item() == pytest.approx(AUTO_TEMPERATURE_SCALE / 4)


def test_auto_temperature_by_hand_on_every_grid_shape():
    # 2x3 grid, one channel: horizontal steps 1, 3 | 0, 4; vertical steps 2, 1, 2
    x = torch.tensor([[0.0, 1, 4], [2, 2, 6]]).view(1, 2, 3, 1)
    squares = [1, 9, 0, 16] + [4, 1, 4]
    assert auto_temperature(x).item() == pytest.approx(AUTO_TEMPERATURE_SCALE / (sum(squares) / 7))
    # a single row has only horizontal steps, a single column only vertical ones; channels add up
    row = torch.tensor([[0.0, 0], [1, 2], [1, 0]]).view(1, 1, 3, 2)  # steps 1 + 4, 0 + 4
    assert auto_temperature(row).item() == pytest.approx(AUTO_TEMPERATURE_SCALE / 4.5)
    assert auto_temperature(row.transpose(1, 2)).item() == pytest.approx(AUTO_TEMPERATURE_SCALE / 4.5)
    # one temperature per image; a grid of one token has no neighbours and gets the scale itself
    two = torch.cat([x, 2 * x])
    assert auto_temperature(two).view(-1).tolist() == pytest.approx(
        [AUTO_TEMPERATURE_SCALE / (35 / 7), AUTO_TEMPERATURE_SCALE / (4 * 35 / 7)]
    )
    single = auto_temperature(torch.randn(3, 1, 1, 4))
    assert single.shape == (3, 1, 1) and (single == AUTO_TEMPERATURE_SCALE).all()


def test_defaults_are_the_references_settings():
    """Five iterations, temperature 0.01, window 5, 20 centroids per reconstructed token."""
    torch.manual_seed(0)
    x = 10 * torch.randn(1, 10, 10, 4)
    y, record = expedite_cluster(x, (5, 5))
    y_ref, record_ref = expedite_cluster(x, (5, 5), n_iters=5, temperature=0.01, window_size=5, k=20)
    assert torch.equal(y, y_ref) and torch.equal(record.labels, record_ref.labels)
    assert record.k == 20 and record.reconstruct == "l2"
    assert not torch.equal(y, expedite_cluster(x, (5, 5), n_iters=6)[0])


@pytest.mark.parametrize("reconstruct", ["l2", "softmax"])
def test_a_token_far_from_every_centroid_is_still_reconstructed_from_its_nearest(reconstruct):
    """At logits of -2500 and -2401 both weights underflow unless each token's own largest
    logit is subtracted first; a token beside the centroids must not set that shift for it."""
    record = ExpediteRecord(
        tokens=torch.tensor([[[50.0], [0.0]]]),  # (B=1, N=2, C=1): far, and on centroid 0
        centroids=torch.tensor([[[0.0], [1.0]]]),
        labels=torch.tensor([[1, 0]]),
        in_hw=(1, 2),
        out_hw=(1, 2),
        k=None,
        temperature=torch.ones(1, 1, 1),
        reconstruct=reconstruct,
    )
    y = torch.tensor([[[[-3.0], [7.0]]]])  # (1, 1, 2, 1)
    out = expedite_reconstruct(y, record)
    assert out[0, 0, 0].item() == pytest.approx(7.0)  # exp(-99) of centroid 0's weight is nothing
    # the token on centroid 0 has logits 0 and -1: weights 1 and e^-1, L2- or sum-normalised
    norm = math.sqrt(1 + math.exp(-2)) if reconstruct == "l2" else 1 + math.exp(-1)
    assert out[0, 0, 1].item() == pytest.approx((-3.0 + 7.0 * math.exp(-1)) / norm, rel=1e-5)


def test_auto_temperature_equals_the_neighbour_loop_on_a_random_grid():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5)
    for i in range(2):
        steps = [float((x[i, a, b + 1] - x[i, a, b]).square().sum()) for a in range(3) for b in range(3)]
        steps += [float((x[i, a + 1, b] - x[i, a, b]).square().sum()) for a in range(2) for b in range(4)]
        assert auto_temperature(x)[i].item() == pytest.approx(AUTO_TEMPERATURE_SCALE / (sum(steps) / len(steps)), rel=1e-5)


def test_a_grid_without_its_batch_dimension_is_refused():
    with pytest.raises(ValueError, match=r"x must be a \(B, H, W, C\) token grid, got shape \(5, 6, 2\)"):
        expedite_cluster(torch.randn(5, 6, 2), (2, 3))
