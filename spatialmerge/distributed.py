"""Just enough torch.distributed for sharded evaluation and DDP runs started by torchrun.

Everything works unchanged in a single process: rank 0 of a world of 1, reductions are copies.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

_TORCHRUN_VARS: tuple[str, ...] = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank; 0 outside a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group; 1 outside a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that logs, prints and saves (rank 0)."""
    return rank() == 0


def shard_indices(n: int, rank: int | None = None, world: int | None = None) -> list[int]:
    """This rank's share of `range(n)`: every `world`-th index starting at `rank`.

    Unlike DistributedSampler nothing is padded or repeated, so summing per-rank statistics
    counts every item exactly once; ranks may get one item more than others. `rank` / `world`
    default to the current process group's.
    """
    if rank is None:
        rank = dist.get_rank() if is_distributed() else 0
    if world is None:
        world = world_size()
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, world) with world={world} >= 1")
    return list(range(rank, n, world))


def all_reduce_sum(values: Tensor | Sequence[float]) -> Tensor:
    """Sum `values` over all ranks; every rank gets the total. Returns a new tensor.

    A sequence of numbers becomes a float64 tensor (exact for counts up to 2**53). NCCL only
    reduces CUDA tensors, so CPU tensors make a round trip through the current CUDA device.
    """
    tensor = (
        values.detach().clone()
        if isinstance(values, Tensor)
        else torch.tensor(values, dtype=torch.float64)
    )
    if not is_distributed():
        return tensor
    device = tensor.device
    if dist.get_backend() == dist.Backend.NCCL and device.type != "cuda":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.to(device)


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment variables, if any.

    Returns True when running distributed. Without torchrun's variables this is a single process
    and nothing is initialised. The backend defaults to NCCL when CUDA is available (each process
    then uses GPU `LOCAL_RANK`) and to gloo otherwise.
    """
    if is_distributed():
        return True
    present = [name for name in _TORCHRUN_VARS if name in os.environ]
    if not present:
        return False
    if len(present) != len(_TORCHRUN_VARS):
        missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
        raise RuntimeError(
            f"distributed environment is incomplete: {present} are set but {missing} are not. "
            "Start the job with torchrun (e.g. torchrun --nproc_per_node=2 ...), which sets all "
            "of them, or unset them for a single-process run"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "backend='nccl' needs CUDA, which is not available here; use backend='gloo'"
            )
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    return True


def cleanup() -> None:
    """Leave the process group, if one was joined; safe to call always (e.g. in `finally`)."""
    if is_distributed():
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device this machine has, or one clear
    error naming the value and the fix (rather than a driver traceback at the first ``.to``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type != "cpu":
        raise ValueError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device
