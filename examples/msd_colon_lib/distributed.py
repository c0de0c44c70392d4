"""DDP plumbing: rank/world from torchrun, barrier, broadcast, the device of a rank."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device).type == "cuda"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def mean_across(d: Dist, total: torch.Tensor, n: int) -> float:
    """``total / n`` summed over the ranks (the epoch's mean training loss)."""
    if d.enabled:
        buf = torch.stack([total.detach().float(), torch.tensor(float(n), device=total.device)])
        buf = buf.to("cpu") if dist.get_backend() == "gloo" else buf
        dist.all_reduce(buf)
        return float(buf[0] / max(buf[1], 1))
    return float(total) / max(n, 1)


@contextlib.contextmanager
def maybe_destroy(d: Dist) -> Iterator[None]:
    """Destroy the process group on exit (also on errors)."""
    try:
        yield
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()
