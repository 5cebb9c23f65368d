"""The device, the precision policy and the processes of a run, resolved once before training or
generation (both use this module).

- LoRA (and generation): the frozen UNet is stored in bf16 (or fp16) and the adapters in fp32 (see
  sdxl/lora.py), so no autocast is needed: each adapter casts its input up and its output back.
- Full fine-tuning: the UNet's trainable weights stay fp32 (master weights for AdamW) and the forward
  runs under autocast in bf16 / fp16.
- fp16 needs a gradient scaler (its range underflows small gradients); bf16 and fp32 do not, and the
  scaler is then a no-op.
- The VAE always runs in fp32 (the SDXL VAE overflows in fp16); the text encoders in fp16 on CUDA.

Under torchrun each process is one member of the group (`Distributed`): every collective runs on a
tensor on the process's own device, since NCCL, the backend on GPUs, has no CPU tensors
(all_reduce on one fails with "No backend type associated with device type cpu").
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cli.choices import PRECISIONS
from sdxl.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
assert tuple(DTYPES) == PRECISIONS


def default_allocator() -> str:
    """PyTorch's CUDA allocator with expandable segments: a segment grows in place instead of a new
    one being reserved, so blocks of changing sizes (buckets, VAE tiles, the caches' phase and then
    the UNet's) leave less reserved and unused. Set only if the user has not configured the
    allocator, and before CUDA starts (the scripts call it first). Returns the setting in force."""
    user = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_ALLOC_CONF"))
    if user is None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = user = "expandable_segments:True"
    return user


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise UserError(
            f"--device {name!r} is not a device this project runs on; use cuda, cpu or auto"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


@dataclass(frozen=True)
class Precision:
    name: str
    device_type: str
    unet_dtype: torch.dtype  # how the UNet's weights are stored
    compute_dtype: torch.dtype  # the dtype of the UNet's inputs
    use_autocast: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_autocast:
            return contextlib.nullcontext()
        # No cache of cast weights: inside a CUDA graph it would outlive the capture
        # (make_graphed_callables refuses it); each weight is cast once a forward anyway.
        return torch.autocast(self.device_type, dtype=DTYPES[self.name], cache_enabled=False)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    @property
    def text_dtype(self) -> torch.dtype:
        return torch.float16 if self.device_type == "cuda" else torch.float32


def resolve_precision(
    name: str, device: torch.device, full_finetune: bool = False, full_bf16: bool = False
) -> Precision:
    """`auto` is bf16 on CUDA (fp32's range, so nothing overflows) and fp32 on the CPU (where bf16
    works but is slow on most CPUs). The same rule serves training and generation. Full
    fine-tuning keeps fp32 weights under bf16 autocast, or with `full_bf16` bf16 weights."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" or full_bf16 else "fp32"
    if name not in DTYPES:
        raise UserError(f"unknown precision {name!r}; choose bf16, fp16 or fp32")
    low = DTYPES[name]
    if full_finetune and not full_bf16:
        return Precision(
            name, device.type, torch.float32, torch.float32, use_autocast=name != "fp32"
        )
    return Precision(name, device.type, low, low, use_autocast=False)


# ---------------------------------------------------------------------------------------------
# Processes (torchrun)
# ---------------------------------------------------------------------------------------------


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
        """The model the forward runs: DDP averages the gradients of the processes. Its frozen
        weights and its buffers are left out of DDP's synchronisation: every process loaded the
        same ones and nothing changes them, and DDP's first broadcast cannot take fp8 weights
        (--fp8_base: "cat_cuda" is not implemented for Float8_e4m3fn)."""
        if self.world == 1:
            return model
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        buffers = [name for name, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen + buffers)
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

    def from_main(self, value: Any) -> Any:
        """The first process's `value` on every process (a decision they must share, such as a
        checkpoint's name). A no-op with one process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str, timeout_minutes: float = 240, group: bool = False) -> Distributed:
    """One process, or under torchrun (WORLD_SIZE > 1) a member of the process group: NCCL with one
    GPU per process, gloo on the CPU. The others wait for the first process while it alone builds
    the caches or renders validation images, for up to `timeout_minutes` (NCCL's default, 10
    minutes, would end a run whose cache takes longer). With `group`, one process forms a group of
    its own (FSDP shards over a group, even of one: a sharded run resumed on one GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = resolve_device(device)
    if world == 1 and not group:
        return Distributed(0, 1, local)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    backend = "nccl" if local.type == "cuda" else "gloo"
    if world == 1:  # no torchrun: nothing to rendezvous with
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend, timeout=timeout)
        if local.type == "cuda":
            local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if local.type == "cuda":
        torch.cuda.set_device(local)
    return Distributed(dist.get_rank(), world, local)
