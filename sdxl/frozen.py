"""Frozen base layers, and storing them in fp8 (--fp8_base).

A `FrozenLayer` is a Linear or Conv2d as a function of its weight and bias, keeping their names
(`weight`, `bias`) so that state-dict keys do not change. LoRA's `AdaptedLayer` is one with an
adapter. The weight can be stored in another dtype than the one the layer computes in:
`base_weight(dtype)` upcasts it, one layer at a time, when the layer runs.

fp8 storage (`store_in_fp8`) halves the frozen UNet's 4.8 GiB in bf16. Each weight is kept as
`torch.float8_e4m3fn` (4 exponent bits, 3 mantissa bits) with one fp32 scale per output channel,
absmax / 448 (448 is e4m3's largest value), so every channel uses the format's whole range and
its small weights do not flush to zero. An element's rounding error is at most 1/16 of its value
(about 2^-4 relative, against bf16's 2^-9). What stays in the compute dtype, and why:
- the norms (GroupNorm, LayerNorm) and every bias: small, and they set the scale of what follows;
- conv_in and conv_out: the first and last layers, whose errors reach the latents undiluted;
- the time and size embeddings (time_embedding, add_embedding): they condition every block, and
  they are small;
- the adapters (LoRA, DoRA), which train in fp32.
With gradient checkpointing (the default) a block's upcast weights live only while the block runs
or is recomputed; without it, autograd keeps them for the backward pass and the saving is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max

# Layers that stay in the compute dtype (see the module docstring).
KEEP_PRECISION = ("conv_in", "conv_out", "time_embedding.", "add_embedding.")


class FrozenLayer(nn.Module):
    """A frozen Linear or Conv2d: op(x, weight, bias), the weight upcast to x's dtype."""

    def __init__(self, base: nn.Linear | nn.Conv2d):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight_scale: torch.Tensor | None
        # per output channel, for fp8 storage; not in the state dict, whose keys stay the same
        self.register_buffer("weight_scale", None, persistent=False)
        self.conv = isinstance(base, nn.Conv2d)
        self.op: Callable[..., torch.Tensor] = F.linear
        if isinstance(base, nn.Conv2d):
            assert base.padding_mode == "zeros" and base.groups == 1, "SDXL's convolutions"
            self.op = partial(
                F.conv2d, stride=base.stride, padding=base.padding, dilation=base.dilation
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.base_weight(x.dtype), self.bias)

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype` (a no-op when it is stored so)."""
        if self.weight_scale is None:
            return self.weight.to(dtype)
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def per_channel(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to scale this layer's output."""
        return v.reshape(-1, 1, 1) if self.conv else v

    @torch.no_grad()
    def to_fp8(self) -> None:
        w = self.weight.detach().float()
        # (out, ...) -> (out, 1[, 1, 1]): one scale per output channel
        absmax = w.flatten(1).abs().amax(dim=1).reshape(-1, *[1] * (w.dim() - 1))
        scale = absmax.clamp(min=1e-12) / FP8_MAX
        self.weight = nn.Parameter((w / scale).to(FP8), requires_grad=False)
        self.weight_scale = scale


def store_in_fp8(model: nn.Module) -> int:
    """Store the Linear and Conv2d weights of a UNet in fp8 with per-channel scales, frozen, all but
    KEEP_PRECISION's (adapted layers keep their adapters in full precision). Apply it after the
    adapters and before training or sampling; a later `model.to(dtype)` would undo it. Returns the
    number of layers stored in fp8."""
    stored = 0
    for name, module in list(model.named_modules()):
        if name.startswith(KEEP_PRECISION) or ".lora." in f"{name}.":  # an adapter's own layers
            continue
        if isinstance(module, FrozenLayer):
            layer = module
        elif type(module) is nn.Linear or isinstance(module, nn.Conv2d):
            layer = FrozenLayer(module)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        else:
            continue
        layer.to_fp8()
        stored += 1
    return stored
