"""spatialmerge.distributed outside a process group, and shard_indices for simulated ranks."""

from __future__ import annotations

import pytest
import torch

from spatialmerge import distributed


def test_shards_of_ten_over_three_ranks_are_disjoint_and_complete() -> None:
    shards = [distributed.shard_indices(10, rank=r, world=3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(i for shard in shards for i in shard) == list(range(10))


def test_more_ranks_than_items_leaves_some_ranks_empty() -> None:
    assert [distributed.shard_indices(2, rank=r, world=3) for r in range(3)] == [[0], [1], []]


@pytest.mark.parametrize(("n", "rank", "world"), [(5, 3, 3), (5, -1, 2), (5, 0, 0), (-1, 0, 1)])
def test_invalid_shard_arguments_raise(n: int, rank: int, world: int) -> None:
    with pytest.raises(ValueError):
        distributed.shard_indices(n, rank=rank, world=world)


def test_single_process_defaults() -> None:
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard_indices(4) == [0, 1, 2, 3]


def test_all_reduce_sum_without_a_group_is_a_copy() -> None:
    values = torch.tensor([1, 2], dtype=torch.int64)
    total = distributed.all_reduce_sum(values)
    assert torch.equal(total, values) and total is not values
    numbers = distributed.all_reduce_sum([0.5, 3])
    assert numbers.dtype == torch.float64 and numbers.tolist() == [0.5, 3.0]


def test_init_from_env_without_torchrun_stays_single_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env() is False
    distributed.cleanup()  # a no-op outside a group


def test_incomplete_torchrun_environment_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        distributed.init_from_env()
