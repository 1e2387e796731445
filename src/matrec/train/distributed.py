"""torchrun support: the same command runs on one process or many (DDP), nothing to change."""
from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (nccl on CUDA, gloo on
    CPU); a plain ``python``/``matrec`` launch is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
        _destroy_at_exit()
    return info


# Set once this process has failed: from then on the group is left to torchrun (see _destroy_at_exit).
_failed: list[bool] = []


def mark_failed() -> None:
    """Record that this process is ending on an error, so the exit hook leaves the group alone.

    Callers that catch an error and exit on their own (the CLI's clean error messages) call this;
    uncaught exceptions are recorded by the excepthook ``_destroy_at_exit`` installs.
    """
    _failed.append(True)


def _destroy_at_exit() -> None:
    """Destroy the group we created before the interpreter tears down.

    Left to interpreter finalization, gloo's worker threads can still hold tensors whose release
    needs the GIL, and the process dies with SIGABRT ("terminate called without an active
    exception") after a run that succeeded. After a failure (an uncaught exception, or
    ``mark_failed``) we leave the group alone: destroying it while the other ranks wait in a
    collective can deadlock, and torchrun stops them.
    """
    previous_hook = sys.excepthook

    def hook(*exc_info):
        mark_failed()
        previous_hook(*exc_info)

    def destroy():
        if not _failed and dist.is_initialized():
            dist.destroy_process_group()

    sys.excepthook = hook
    atexit.register(destroy)


def all_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a scalar tensor over all processes (itself in a world of one)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def all_gather_object(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` in a world of one)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
