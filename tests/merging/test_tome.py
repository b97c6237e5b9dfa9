"""ToMe matching: hand-checked merges, prefix protection, tracing, schedules and errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spatialmerge.merging.tome import (
    bipartite_soft_matching,
    max_r,
    merge_wavg,
    parse_r,
)
from tests.merging.helpers import merge_source


def _hand_metric() -> torch.Tensor:
    """Six tokens; A = tokens 0, 2, 4 and B = tokens 1, 3, 5.

    Cosine similarities to the best B token: token 2 -> 3 is 1.0, token 0 -> 1 is ~0.995,
    token 4 -> 5 is ~0.894 (its large norm would win on raw dot products). With r=2 tokens
    2->3 and 0->1 merge and token 4 stays.
    """
    return torch.tensor(
        [
            [
                [1.0, 0.1, 0.0],  # 0 (A): closest to 1
                [1.0, 0.0, 0.0],  # 1 (B)
                [0.0, 1.0, 0.0],  # 2 (A): equal to 3
                [0.0, 1.0, 0.0],  # 3 (B)
                [5.0, 0.0, 10.0],  # 4 (A): closest to 5, weakest cosine, largest dot product
                [0.0, 0.0, 1.0],  # 5 (B)
            ]
        ]
    )


def test_hand_example_weighted_average_sizes_and_order():
    merge, _ = bipartite_soft_matching(_hand_metric(), r=2)
    x = torch.tensor([4.0, 8.0, 1.0, 5.0, 10.0, -2.0]).view(1, 6, 1)
    size = torch.tensor([1.0, 3.0, 2.0, 2.0, 1.0, 1.0]).view(1, 6, 1)
    merged, merged_size = merge_wavg(merge, x, size)
    # order: unmerged A (token 4), then B tokens 1, 3, 5 with their sources merged in
    # token 1: (1*4 + 3*8) / 4 = 7; token 3: (2*1 + 2*5) / 4 = 3
    assert torch.allclose(merged.view(-1), torch.tensor([10.0, 7.0, 3.0, -2.0]))
    assert torch.equal(merged_size.view(-1), torch.tensor([1.0, 4.0, 4.0, 1.0]))

    assert torch.allclose(merge(x, mode="mean").view(-1), torch.tensor([10.0, 6.0, 3.0, -2.0]))
    assert torch.allclose(merge(x, mode="sum").view(-1), torch.tensor([10.0, 12.0, 6.0, -2.0]))


def test_hand_example_unmerge_and_source():
    merge, unmerge = bipartite_soft_matching(_hand_metric(), r=2)
    y = torch.tensor([10.0, 7.0, 3.0, -2.0]).view(1, 4, 1)
    restored = unmerge(y)
    assert restored.shape == (1, 6, 1)
    # tokens 0 and 1 live in output 1, tokens 2 and 3 in output 2, token 4 in 0, token 5 in 3
    assert torch.equal(restored.view(-1), torch.tensor([7.0, 7.0, 3.0, 3.0, 10.0, -2.0]))

    source = merge_source(merge, torch.zeros(1, 6, 1))
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 1, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(source[0], expected)
    # tracing a second step composes with the first: feed the traced source back in
    merge2, _ = bipartite_soft_matching(torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 1]]]), r=1)
    source2 = merge_source(merge2, y, source)
    assert source2.shape == (1, 3, 6)
    assert torch.equal(source2.sum(1), torch.ones(1, 6))


def test_batch_elements_are_matched_independently():
    torch.manual_seed(0)
    metric = torch.randn(3, 12, 5)
    x = torch.randn(3, 12, 4)
    merge, unmerge = bipartite_soft_matching(metric, r=4, num_prefix_tokens=1)
    merged = merge(x)
    for i in range(3):
        merge_i, unmerge_i = bipartite_soft_matching(metric[i : i + 1], r=4, num_prefix_tokens=1)
        assert torch.allclose(merged[i : i + 1], merge_i(x[i : i + 1]))
        assert torch.allclose(unmerge(merged)[i : i + 1], unmerge_i(merged[i : i + 1]))


@pytest.mark.parametrize("num_prefix", [1, 2, 5])
def test_prefix_tokens_never_merge_and_stay_in_front(num_prefix):
    # every token has the same metric, so protected tokens tie with everyone for every edge:
    # only the protection keeps them out (argmax of a tie would pick the first column)
    torch.manual_seed(0)
    n = 15
    metric = torch.ones(2, n, 3)
    x = torch.randn(2, n, 4)
    r = max_r(n, num_prefix)
    merge, unmerge = bipartite_soft_matching(metric, r=r, num_prefix_tokens=num_prefix)
    merged, size = merge_wavg(merge, x)
    assert merged.shape == (2, n - r, 4)
    assert torch.equal(merged[:, :num_prefix], x[:, :num_prefix])
    assert torch.equal(size[:, :num_prefix], torch.ones(2, num_prefix, 1))
    source = merge_source(merge, x)
    assert torch.equal(source[:, :num_prefix, :num_prefix], torch.eye(num_prefix).expand(2, -1, -1))
    assert torch.equal(source[:, :num_prefix].sum(-1), torch.ones(2, num_prefix))
    assert torch.equal(unmerge(merged)[:, :num_prefix], x[:, :num_prefix])


def test_prefix_tokens_are_protected_even_when_most_similar():
    # CLS (0) and a register (1) equal every other token; the rest are spread out
    torch.manual_seed(1)
    metric = torch.randn(1, 10, 6)
    metric[:, 3:] = metric[:, :1] + 0.01 * torch.randn(1, 7, 6)
    metric[:, 1] = metric[:, 0]
    merge, _ = bipartite_soft_matching(metric, r=max_r(10, 2), num_prefix_tokens=2)
    source = merge_source(merge, metric)
    assert torch.equal(source[0, :2, :2], torch.eye(2))
    assert torch.equal(source[0, :2].sum(-1), torch.ones(2))


def test_r_zero_is_identity():
    x = torch.randn(2, 7, 3)
    merge, unmerge = bipartite_soft_matching(torch.randn(2, 7, 4), r=0)
    assert merge(x) is x and unmerge(x) is x


def test_merge_is_differentiable_and_matching_is_not():
    metric = torch.randn(2, 9, 4, requires_grad=True)
    x = torch.randn(2, 9, 4, requires_grad=True)
    merge, unmerge = bipartite_soft_matching(metric, r=3, num_prefix_tokens=1)
    merged, _ = merge_wavg(merge, x)
    unmerge(merged).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert metric.grad is None


@pytest.mark.parametrize(
    ("n", "prefix", "r", "limit"),
    [(6, 0, 4, 3), (7, 0, 5, 4), (6, 1, 3, 2), (10, 4, 4, 3), (6, 0, -1, 3)],
)
def test_r_out_of_range_names_value_limit_and_tokens(n, prefix, r, limit):
    assert max_r(n, prefix) == limit
    with pytest.raises(ValueError, match=rf"r={r}.*\[0, {limit}\].*{n} tokens"):
        bipartite_soft_matching(torch.randn(1, n, 3), r=r, num_prefix_tokens=prefix)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="num_prefix_tokens=9"):
        bipartite_soft_matching(torch.randn(1, 6, 3), r=1, num_prefix_tokens=9)
    with pytest.raises(ValueError, match="r must be an int"):
        bipartite_soft_matching(torch.randn(1, 6, 3), r=1.5)
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        bipartite_soft_matching(torch.randn(6, 3), r=1)
    merge, unmerge = bipartite_soft_matching(torch.randn(1, 6, 3), r=2)
    with pytest.raises(ValueError, match="mode='max'"):
        merge(torch.randn(1, 6, 3), mode="max")
    with pytest.raises(ValueError, match="merge_fn expects a .*N=6"):
        merge(torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match=r"merge_fn expects .* got shape \(1, 6, 3, 1\)"):
        merge(torch.randn(1, 6, 3, 1))
    with pytest.raises(ValueError, match="unmerge_fn expects a .*N=4"):
        unmerge(torch.randn(1, 6, 3))
    identity_merge, identity_unmerge = bipartite_soft_matching(torch.randn(1, 6, 3), r=0)
    with pytest.raises(ValueError, match="merge_fn expects a .*N=6"):
        identity_merge(torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match="unmerge_fn expects a .*N=6"):
        identity_unmerge(torch.randn(1, 4, 3))


@pytest.mark.parametrize(
    ("n", "prefix", "limit"),
    # one merge per unprotected token of set A (even positions), none when set B (odd) is all
    # protected: 7 -> A 4; 4 | 2 -> A 2 - 1; 5 | 4 -> B 2 - 2; 4 | 3 -> A 2 - 2; 1 -> B empty
    [(7, 0, 4), (4, 2, 1), (5, 4, 0), (4, 3, 0), (1, 0, 0), (2, 0, 1)],
)
def test_max_r_by_hand(n, prefix, limit):
    assert max_r(n, prefix) == limit
    assert max_r(n) == max_r(n, 0)


def test_parse_r_constant_and_list():
    assert parse_r(12, 8) == [8] * 12
    assert parse_r(4, [3, 2]) == [3, 2, 0, 0]
    assert parse_r(2, [1, 1]) == [1, 1]
    assert parse_r(1, (5, -1.0)) == [5]
    assert parse_r(3, 0) == [0, 0, 0] and parse_r(3, [0, 2]) == [0, 2, 0], "0 means no merge"


def test_parse_r_linear_schedule_by_hand():
    # (4, -0.5): from int(4 * 1.5) = 6 down to 2 * 4 - 6 = 2 in steps of (2 - 6) / 4 = -1
    assert parse_r(5, (4, -0.5)) == [6, 5, 4, 3, 2]
    # (3, 1.0): from 0 up to 6 in steps of 6 / 4 = 1.5, truncated
    assert parse_r(5, (3, 1.0)) == [0, 1, 3, 4, 6]
    assert parse_r(4, (3, 0.0)) == [3, 3, 3, 3]


@pytest.mark.parametrize("inflection", [-1.0, -0.5])
def test_parse_r_decreasing_schedule(inflection):
    schedule = parse_r(12, (8, inflection))
    assert len(schedule) == 12
    assert schedule[0] > schedule[-1]
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))
    assert abs(sum(schedule) - 8 * 12) <= 12  # int truncation loses under one token per layer
    if inflection == -1.0:
        assert schedule[0] == 16 and schedule[-1] == 0


def test_parse_r_increasing_schedule():
    schedule = parse_r(6, (4, 1.0))
    assert schedule[0] == 0 and schedule[-1] == 8
    assert all(a <= b for a, b in zip(schedule, schedule[1:]))


@pytest.mark.parametrize(
    ("num_layers", "r", "match"),
    [
        (3, [1, 2, 3, 4], "4 layers.*has 3"),
        (3, [1, -1], "every entry of the r list must be a non-negative int .* got -1"),
        (3, -2, "r must be a non-negative int .* got -2"),
        (3, (4, 1.5), "inflection=1.5"),
        (3, (4, -1.5), "inflection=-1.5"),
        (True, 4, "num_layers=True"),
        (3, (4, -0.5, 1), r"\(r, inflection\)"),
        (3, (4, "up"), "inflection must be a number"),
        (0, 4, "num_layers=0"),
        (3, 2.5, "non-negative int"),
    ],
)
def test_parse_r_rejects_bad_schedules(num_layers, r, match):
    with pytest.raises(ValueError, match=match):
        parse_r(num_layers, r)


@st.composite
def cases(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 20))
    c = draw(st.integers(1, 6))
    prefix = draw(st.integers(0, min(n, 5)))
    r = draw(st.integers(0, max_r(n, prefix)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    return b, n, c, prefix, r, dtype, seed


@settings(max_examples=60, deadline=None)
@given(cases())
def test_shapes_and_bookkeeping_for_any_input(case):
    b, n, c, prefix, r, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    metric = torch.randn(b, n, c, generator=gen).to(dtype)
    x = torch.randn(b, n, c, generator=gen).to(dtype)
    merge, unmerge = bipartite_soft_matching(metric, r=r, num_prefix_tokens=prefix)

    merged, size = merge_wavg(merge, x)
    assert merged.shape == (b, n - r, c) and merged.dtype == dtype
    assert torch.equal(merged[:, :prefix], x[:, :prefix])

    source = merge_source(merge, x)  # (B, N - r, N)
    assert source.shape == (b, n - r, n)
    assert torch.equal(source.sum(1), torch.ones(b, n, dtype=dtype))  # each token held once
    assert torch.equal(source.sum(2)[..., None], size)  # rows count the tokens merged in
    assert int(size.sum()) == b * n

    restored = unmerge(merged)
    assert restored.shape == (b, n, c) and restored.dtype == dtype
    # every token gets the value of the merged token that holds it
    assert torch.equal(restored, source.transpose(1, 2) @ merged)
