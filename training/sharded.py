"""Full fine-tuning sharded over the processes (--fsdp): PyTorch's FSDP2 (`fully_shard`), and the
sharded checkpoints of `torch.distributed.checkpoint` (DCP).

Each process keeps 1/N of the UNet's fp32 weights, of their gradients and of the optimizer's state.
A unit's full weights are gathered (in bf16 on a GPU) just before its forward and again before its
backward, and dropped after; its gradients are averaged across the processes in fp32 and scattered
back into the shards. The units are the blocks gradient checkpointing recomputes (each ResNet and
transformer block), the transformer stacks' projections, the down- and upsamplers, and, last, the
UNet itself (its embeddings, first and last convolution): the largest unit, not the model, sets
what a process holds unsharded.

A checkpoint is a folder of shards, `name.dcp` beside `name.pt`, written by every process at once.
DCP records each tensor's global shape, so a run resumes from it with any number of processes,
sharded or not (`load_sharded` fills whatever form the run's weights take). The files users take
away (the SGM file) get the full weights, gathered once onto the first process's host memory.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from sdxl.device import DTYPES, Distributed, Precision
from sdxl.files import TMP_SUFFIX
from sdxl.unet import (
    BasicTransformerBlock,
    Downsample2D,
    ResnetBlock2D,
    Transformer2DModel,
    UNet2DConditionModel,
    Upsample2D,
)

UNITS = (ResnetBlock2D, BasicTransformerBlock, Transformer2DModel, Downsample2D, Upsample2D)


def sharding_units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules sharded one by one, inner before outer (a transformer stack after its blocks);
    the UNet itself comes last and holds what is left."""
    units: list[torch.nn.Module] = [m for m in unet.modules() if isinstance(m, UNITS)]
    return units[::-1]


def unit_sizes(unet: torch.nn.Module) -> tuple[list[int], int]:
    """The parameters each unit gathers (its own: not those of the units inside it), and those
    left to the UNet itself (the memory preflight's model of --fsdp)."""
    claimed: set[int] = set()
    own = []
    for unit in sharding_units(unet):  # (inner units first)
        params = [p for p in unit.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in params)
        own.append(sum(p.numel() for p in params))
    return own, sum(p.numel() for p in unet.parameters() if id(p) not in claimed)


def shard_unet(unet: UNet2DConditionModel, precision: Precision, dist: Distributed) -> None:
    """Shard the UNet's units over the processes, in place (its parameters become DTensors on the
    process's device). Under autocast the gathered weights are in the autocast dtype, and the
    gradients are averaged in fp32."""
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    low = DTYPES[precision.name] if precision.use_autocast else None
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    for module in [*sharding_units(unet), unet]:
        fully_shard(module, mesh=mesh, mp_policy=policy)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradients_kept(unet: torch.nn.Module) -> Iterator[None]:
    """Accumulate gradients locally for the micro-batches inside (no reduce-scatter until the
    step's last backward): FSDP's counterpart of DDP's no_sync."""
    assert isinstance(unet, FSDPModule)
    unet.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        unet.set_requires_gradient_sync(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A value that FSDP left as a DTensor (the gradient norm) as the plain tensor it stands for."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered_unet(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's full state dict in the first process's host memory ({} on the others); every
    process must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return cast(dict[str, torch.Tensor], get_model_state_dict(unet, options=options))


def save_sharded(
    folder: Path,
    dist: Distributed,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict | None,
) -> None:
    """Write the UNet's weights, the optimizer's state and the EMA's averages as DCP shards into
    `folder`, every process its own; the folder appears under its name only once all are done."""
    tmp = folder.with_name(f".{folder.name}{TMP_SUFFIX}")
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model, optim = get_state_dict(unet, optimizer)
    # (plan caching: the shards' layout is the same at every save, so it is planned once)
    planner = DefaultSavePlanner(enable_plan_caching=True)
    state = {"model": model, "optimizer": optim, "ema": ema or {}}
    dcp.save(state, checkpoint_id=tmp, planner=planner)
    dist.barrier()
    if dist.main:
        if folder.exists():  # (a lowest-loss checkpoint of this step, from before a resume)
            shutil.rmtree(folder)
        tmp.replace(folder)


def load_sharded(
    folder: Path, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict | None
) -> None:
    """Fill the UNet's weights, the optimizer's state and the EMA's averages from DCP shards, in
    whatever form the run holds them (sharded over any number of processes, or whole)."""
    model, optim = get_state_dict(unet, optimizer)
    dcp.load({"model": model, "optimizer": optim, "ema": ema or {}}, checkpoint_id=folder)
    set_state_dict(unet, optimizer, model_state_dict=model, optim_state_dict=optim)
