"""CubistMerge against its algorithm written out one sequence at a time, in plain Python loops.

The reference below uses none of the project's merge code: for every odd token, the cosine with
each even neighbour (a last odd token has no right one); the r best-scoring odd tokens go (ties:
the leftmost), each into its more similar neighbour (ties: left); a destination becomes the
per-channel max-magnitude (``maxmag``), the size-weighted mean (``mean``) or the token of largest
norm (``maxnorm``) of itself and its sources, taken left to right with ties to the value held. With
``collisions="reference"`` a destination chosen by two sources takes only the one written last:
even ranks are written before odd ranks, later ranks after earlier ones.
"""

import math

import pytest
import torch

from spatialmerge.merging import cubist_merge, merge_1d

REDUCES = ["maxmag", "mean", "maxnorm"]
COLLISIONS = ["exact", "reference"]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b) / (max(float(a.norm()), 1e-12) * max(float(b.norm()), 1e-12))


def paper_merge_sequence(x, r, metric=None, size=None, reduce="maxmag", collisions="exact"):
    """One sequence: x (N, C), metric (N, Cm) or None, size (N,) or None.

    Returns (y (N - r, C), metric' or None, size' or None, index (N,) list)."""
    n = x.shape[0]
    m = x if metric is None else metric
    target, score = {}, {}
    for i in range(1, n, 2):
        left = _cosine(m[i], m[i - 1])
        right = _cosine(m[i], m[i + 1]) if i + 1 < n else -math.inf
        target[i] = i + 1 if right > left else i - 1
        score[i] = max(left, right)
    order = sorted(score, key=lambda i: -score[i])  # sorted() is stable: ties keep the leftmost
    chosen = sorted(order[:r])
    rank = {i: order.index(i) for i in chosen}
    sources = {}
    for i in chosen:
        sources.setdefault(target[i], []).append(i)
    if collisions == "reference":
        sources = {d: [max(s, key=lambda i: (rank[i] % 2, rank[i]))] for d, s in sources.items()}
    if reduce == "mean" and size is None:
        size = torch.ones(n)
    kept = [k for k in range(n) if k not in chosen]

    def combine(t):
        out = []
        for k in kept:
            merged = sources.get(k, [])
            if reduce == "mean":
                value = sum(t[j] * size[j] for j in [k] + merged) / sum(size[j] for j in [k] + merged)
            else:
                value = t[k]
                for j in merged:  # left to right, ties keep the value held
                    if reduce == "maxmag":
                        value = torch.where(t[j].abs() > value.abs(), t[j], value)
                    elif float(t[j].double().norm()) > float(value.double().norm()):
                        value = t[j]
            out.append(value)
        return torch.stack(out)

    new_size = None
    if size is not None:
        new_size = torch.stack([size[k] + sum(size[j] for j in sources.get(k, [])) for k in kept])
    index = [kept.index(k) if k in kept else kept.index(target[k]) for k in range(n)]
    return combine(x), None if metric is None else combine(metric), new_size, index


def paper_cubist_merge(x, r_h, r_w, metric=None, reduce="maxmag", collisions="exact"):
    """(B, H, W, C): every row along W, then every column of the result along H.

    Returns y (B, H', W', C) and the flat index (B, H * W) of the token holding each cell."""
    b, h, w, _ = x.shape
    size = torch.ones(b, h, w) if reduce == "mean" else None
    ys, indices = [], []
    for i in range(b):
        rows = [
            paper_merge_sequence(
                x[i, j], r_w, None if metric is None else metric[i, j],
                None if size is None else size[i, j], reduce, collisions,
            )
            for j in range(h)
        ]
        row_y = torch.stack([row[0] for row in rows])  # (H, W', C)
        row_m = None if metric is None else torch.stack([row[1] for row in rows])
        row_s = None if size is None else torch.stack([row[2] for row in rows])
        w2 = row_y.shape[1]
        cols = [
            paper_merge_sequence(
                row_y[:, k], r_h, None if row_m is None else row_m[:, k],
                None if row_s is None else row_s[:, k], reduce, collisions,
            )
            for k in range(w2)
        ]
        ys.append(torch.stack([col[0] for col in cols], dim=1))  # (H', W', C)
        indices.append([
            cols[rows[j][3][k]][3][j] * w2 + rows[j][3][k] for j in range(h) for k in range(w)
        ])
    return torch.stack(ys), torch.tensor(indices)


def _tokens(shape, seed):
    """Random tokens with norms from 0.01 to 10, so a cosine that is not normalised ranks wrong."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x * torch.logspace(-2, 1, shape[-2])[:, None].roll(seed, 0)


@pytest.mark.parametrize("collisions", COLLISIONS)
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("n,r", [(9, 4), (10, 3), (7, 1)])
def test_merge_1d_equals_the_algorithm_run_per_sequence(n, r, reduce, collisions):
    x = _tokens((3, n, 6), seed=n + r)
    metric = _tokens((3, n, 4), seed=n * r)
    size = torch.randint(1, 5, (3, n)).float()
    y, m2, s2, index = merge_1d(x, r, metric=metric, size=size, reduce=reduce, collisions=collisions)
    for i in range(3):
        ref_y, ref_m, ref_s, ref_index = paper_merge_sequence(x[i], r, metric[i], size[i], reduce, collisions)
        torch.testing.assert_close(y[i], ref_y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m2[i], ref_m, rtol=1e-6, atol=1e-6)
        assert torch.equal(s2[i], ref_s)
        assert index[i].tolist() == ref_index


@pytest.mark.parametrize("reduce", REDUCES)
def test_merge_1d_matches_on_the_tokens_without_a_metric(reduce):
    x = _tokens((4, 11, 5), seed=3)
    y, metric, size, index = merge_1d(x, 5, reduce=reduce)
    assert metric is None
    assert (size is None) == (reduce != "mean"), "mean counts sizes from ones; the others need none"
    for i in range(4):
        ref_y, _, ref_s, ref_index = paper_merge_sequence(x[i], 5, reduce=reduce)
        torch.testing.assert_close(y[i], ref_y, rtol=1e-6, atol=1e-6)
        assert index[i].tolist() == ref_index
        if reduce == "mean":
            assert torch.equal(size[i], ref_s)


@pytest.mark.parametrize("collisions", COLLISIONS)
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("hw,r", [((8, 9), (3, 4)), ((7, 6), (2, 0)), ((6, 7), (0, 3))])
def test_cubist_merge_equals_rows_then_columns_run_per_sequence(hw, r, reduce, collisions):
    x = _tokens((2, *hw, 5), seed=sum(hw))
    metric = _tokens((2, *hw, 3), seed=7)
    for m in (None, metric):
        y, record = cubist_merge(x, *r, metric=m, reduce=reduce, collisions=collisions)
        ref_y, ref_index = paper_cubist_merge(x, *r, m, reduce, collisions)
        torch.testing.assert_close(y, ref_y, rtol=1e-6, atol=1e-6)
        assert torch.equal(record.index, ref_index)
        assert record.out_hw == (hw[0] - r[0], hw[1] - r[1])


def test_half_precision_tokens_are_matched_in_float32():
    """bf16 cosines tie and reorder; the matching must rank the float32 cosines of the bf16
    values, the same plan as the float32 copy of those values."""
    x = _tokens((4, 16, 16, 8), seed=5).bfloat16()
    y, record = cubist_merge(x, 6, 6)
    y32, record32 = cubist_merge(x.float(), 6, 6)
    assert torch.equal(record.index, record32.index)
    assert torch.equal(y.float(), y32)


@pytest.mark.parametrize("reduce", ["maxmag", "maxnorm"])
def test_equal_values_keep_the_destination(reduce):
    """A source equal in magnitude (maxmag) or norm (maxnorm) to its destination, but of another
    sign, must not replace it: ties keep the value already held."""
    metric = torch.tensor([[1.0, 0], [1, 0], [0, 1]])[None]  # token 1 merges left into 0
    x = torch.tensor([[3.0, -4.0], [-3.0, 4.0], [1.0, 1.0]])[None]
    y, _, _, index = merge_1d(x, 1, metric=metric, reduce=reduce)
    assert index[0].tolist() == [0, 0, 1]
    assert y[0, 0].tolist() == [3.0, -4.0]


def test_maxnorm_pair_takes_the_larger_norm_of_three():
    """Two sources into one destination under maxnorm: the largest-norm token of all three,
    whichever side it comes from."""
    metric = torch.tensor([[1.0, 0], [0, 1], [0, 1], [0, 1], [1, 0]])[None]
    for winner in (1, 2, 3):
        x = torch.ones(5, 2)
        x[winner] = torch.tensor([-2.0, 2.0])
        y, _, _, index = merge_1d(x[None], 2, metric=metric, reduce="maxnorm")
        assert index[0].tolist() == [0, 1, 1, 1, 2]
        assert y[0, 1].tolist() == [-2.0, 2.0]
