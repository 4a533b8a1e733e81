"""Data-parallel training over several processes: torch.distributed, started by torchrun's
launcher (the elastic agent), DistributedDataParallel inside.

Each process is a rank. They share one global batch per step (each keeps an interleaved share,
see ``TensorBatches.training_epoch``), DDP averages their gradients, so together they take the
step one process would take on the whole batch. Only rank 0 validates, writes checkpoints and
talks to MLflow; it tells the others what validation said, so early stopping is one decision.
gloo on CPU, NCCL on CUDA, one GPU per rank.

Torch only: this runs on the accelerator machine too.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cxr_platform.errors import CxrError
from cxr_platform.sections import usable_cores

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world_size


SINGLE = Ranks()


def join_from_environment(device: torch.device) -> Ranks:
    """In a process the launcher started (``WORLD_SIZE`` > 1 in its environment), join the
    process group; elsewhere a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per rank on a node (its local rank); CPU ranks share the CPU."""
    if device.type != "cuda" or not ranks.distributed:
        return device
    local = int(os.environ.get("LOCAL_RANK", ranks.rank))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def share_cpu(ranks: Ranks) -> None:
    """CPU ranks split the cores this process may use (its affinity and cgroup limit, which
    ``os.cpu_count()`` ignores) between them rather than each taking all of them."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size))
    if ranks.distributed:
        torch.set_num_threads(max(1, usable_cores() // local_world))


def from_main(value: T, ranks: Ranks) -> T:
    """Rank 0's ``value`` on every rank."""
    if not ranks.distributed:
        return value
    holder = [value if ranks.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]  # type: ignore[return-value]


def summed(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum of ``value`` over the ranks (on every rank)."""
    if ranks.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def wait_for_all(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def leave(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _recorded(entrypoint: Callable[..., T], *args: Any) -> T:
    """A rank's work, with its exception written where the launcher reads it back."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(entrypoint)(*args)


class DistributedLaunchError(CxrError):
    """A rank failed; the message names it and what it raised."""


def launch(nproc_per_node: int, entrypoint: Callable[..., T], *args: Any) -> T:
    """Run ``entrypoint(*args)`` in ``nproc_per_node`` processes on this machine, as
    ``torchrun --standalone --nproc-per-node N`` would; returns rank 0's result.

    ``entrypoint`` must be importable by name (the processes are spawned, not forked)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=f"cxr-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port, as torchrun --standalone picks
        max_restarts=0,  # a failed training run is reported, not silently restarted
        monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, _recorded)(entrypoint, *args)
    except ChildFailedError as exc:
        raise DistributedLaunchError(_root_cause(exc, nproc_per_node)) from exc
    return results[0]


# What a rank dies of when another rank died under it, or when the launcher stopped it after
# another failed (a signal, no error file): a consequence, never the cause.
_LOST_A_PEER = (
    "connection closed by peer",
    "remote worker crashing",
    "connectfullmesh",
    "received by pid",  # "Signal 15 (SIGTERM) received by PID ..."
    "to enable traceback",  # the launcher's words for a rank that wrote no error
)


def _failure_text(failure: Any) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", message)
    return str(message)


def _root_cause(exc: Any, nproc_per_node: int) -> str:
    """The rank whose own error started it. The launcher's first failure is by timestamps of
    whole seconds, so a rank that died of losing its peer can tie with, and be named before,
    the rank that raised; a peer-lost error is named only when every rank has one."""
    texts = {rank: _failure_text(failure) for rank, failure in exc.failures.items()}

    def order(rank: int) -> tuple[bool, int, int]:
        lost = any(marker in texts[rank].lower() for marker in _LOST_A_PEER)
        return lost, exc.failures[rank].timestamp, rank

    first, *others = sorted(texts, key=order)
    message = f"rank {first} of {nproc_per_node} failed: {texts[first]}"
    if others:
        message += f" (rank {', '.join(map(str, others))} failed after it)"
    return message
