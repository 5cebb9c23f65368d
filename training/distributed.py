"""Data-parallel training under torchrun: which process this is, its device, and the few
collectives the loop needs.

Every collective runs on a tensor on the process's own device: NCCL, the backend on GPUs, has no CPU
tensors (all_reduce on one fails with "No backend type associated with device type cpu").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.precision_util import resolve_device


@dataclass(frozen=True)
class Distributed:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """The first process: the one that writes checkpoints, logs and W&B."""
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any process (e.g. a stop signal, which reaches each process at
        its own moment). A no-op with one process."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @contextlib.contextmanager
    def first_process_first(self) -> Iterator[None]:
        """Run the block on the first process, then on the others (e.g. filling a shared cache)."""
        if self.world > 1 and not self.main:
            dist.barrier()
        yield
        if self.world > 1 and self.main:
            dist.barrier()

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model the forward runs: DDP averages the gradients of the processes."""
        if self.world == 1:
            return model
        return DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None
        )

    def averager(self, params: list[torch.nn.Parameter]) -> Callable[[], None]:
        """A function that averages the gradients of `params` across the processes, in one
        all_reduce: for trained parameters outside the DDP-wrapped UNet (the text encoders')."""
        if self.world == 1 or not params:
            return lambda: None

        def average() -> None:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            for p, g in zip(params, flat.split([q.numel() for q in params])):
                p.grad = g.view_as(p)  # views of the one reduced buffer

        return average

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def init_distributed(device: str) -> Distributed:
    """One process, or under torchrun (WORLD_SIZE > 1) a member of the process group: NCCL with one
    GPU per process, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(0, 1, resolve_device(device))
    cuda = resolve_device(device).type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    local = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local)
    return Distributed(dist.get_rank(), world, local)
