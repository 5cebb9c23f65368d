"""LoRA for the SDXL UNet, without peft.

`apply_lora_to_unet` is a pass over a plain UNet: it swaps selected `nn.Linear` layers for a
`LoRALinearWrapper` that keeps the frozen base `weight`/`bias` under their original key names and adds
`LoRALinear`'s low-rank update under `<module>.lora.down.weight` / `<module>.lora.up.weight`:

    y = W x + b + (alpha / rank) * up(down(dropout(x)))

`up` starts at zero, so a fresh adapter changes nothing. The adapter weights live in their own dtype
(fp32 by default) even when the base is bf16: AdamW updates of order lr * 1e-3 would vanish in bf16's 8
mantissa bits, so the trainable weights and their optimizer state stay fp32 and only the frozen base
is low precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from sdxl.errors import UserError
from sdxl.options import TARGET_MODES


class LoRAError(UserError, ValueError):
    """A LoRA file or option that does not fit the model."""


_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


class _LinearOnCastInput(torch.autograd.Function):
    """F.linear(x.to(weight.dtype), weight), keeping x for backward in its own dtype.

    With a bf16 base and fp32 adapters, autograd would keep the fp32 copy of x that the down
    projection reads: twice the bytes of x, and one copy per adapter (to_q, to_k and to_v each make
    their own from the same input). Kept as is, x is one bf16 tensor the three adapters share, and
    the copy is made again in backward. The cast is exact, so the gradients are the same bits.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)  # a no-op unless the forward ran under autocast
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            # (out, tokens) @ (tokens, in): the leading dims of grad and x flattened into tokens
            grad_w = grad.flatten(0, -2).T @ x.flatten(0, -2).to(weight.dtype)
        return grad_x, grad_w


class LoRALinear(nn.Module):
    """The low-rank update (alpha / rank) * up(down(x)): down is rank x in, up is out x rank."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # down: Kaiming-uniform like nn.Linear (and peft's default); up: zero, so the update starts at 0.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in the adapter's dtype (fp32 by default), returned in the caller's. Dropout, when
        # on, acts on x in the caller's dtype, so what backward keeps stays in that dtype too.
        h = _LinearOnCastInput.apply(self.dropout(x), self.down.weight)
        return (self.up(h) * self.scale).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * up @ down, the (out x in) matrix this adapter adds to the base weight."""
        return self.scale * (self.up.weight.float() @ self.down.weight.float())


class LoRALinearWrapper(nn.Module):
    """A frozen nn.Linear plus a LoRALinear. The base parameters keep the names `weight` and
    `bias`, so the UNet's state-dict keys are unchanged by the wrapping."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        # Created on the base layer's device, so a UNet already on the GPU gets GPU adapters.
        self.lora = LoRALinear(
            base.in_features, base.out_features, rank, alpha, dropout, device=base.weight.device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora(x)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight has the update folded in (for inference: one matmul
        instead of three, and room for another LoRA)."""
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device="meta"
        )
        linear.weight = nn.Parameter(
            (self.weight.float() + self.lora.delta_weight()).to(self.weight.dtype),
            requires_grad=False,
        )
        linear.bias = self.bias
        return linear


def _is_target(name: str, target_mode: str) -> bool:
    if target_mode == "attention":
        return any(name.endswith(f"attn1.{s}") or name.endswith(f"attn2.{s}") for s in _ATTENTION)
    if target_mode == "attention_out":
        return name.endswith("attn1.to_out.0") or name.endswith("attn2.to_out.0")
    if target_mode == "all":
        # Every Linear inside a Transformer2DModel: attention, feed-forward, proj_in / proj_out.
        return ".attentions." in name
    raise LoRAError(f"unknown LoRA target mode {target_mode!r}; choose one of {TARGET_MODES}")


def apply_lora_to_unet(
    unet: nn.Module, rank: int, alpha: float, target_mode: str = "attention", dropout: float = 0.0
) -> list[str]:
    """Wrap the target Linear layers with LoRA; returns the wrapped module names.

    Order matters and is fixed here: freeze every base parameter, then wrap, then mark only the
    adapter parameters trainable.
    """
    if target_mode not in TARGET_MODES:
        raise LoRAError(f"unknown LoRA target mode {target_mode!r}; choose one of {TARGET_MODES}")
    if rank < 1:
        raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
    unet.requires_grad_(False)
    targets = [
        name
        for name, module in unet.named_modules()
        if type(module) is nn.Linear and _is_target(name, target_mode)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        setattr(parent, child, LoRALinearWrapper(getattr(parent, child), rank, alpha, dropout))
    for _, wrapper in lora_modules(unet):
        wrapper.lora.requires_grad_(True)
    return targets


def lora_modules(unet: nn.Module) -> Iterator[tuple[str, LoRALinearWrapper]]:
    for name, module in unet.named_modules():
        if isinstance(module, LoRALinearWrapper):
            yield name, module


def get_lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: `<module>.lora.down.weight` and `<module>.lora.up.weight`."""
    return {k: v for k, v in unet.state_dict().items() if ".lora." in k}


@torch.no_grad()
def load_lora_state_dict(unet: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into an already-wrapped UNet. Strict: a file made for another rank,
    target set or architecture fails, naming the first mismatched key and both shapes."""
    own = get_lora_state_dict(unet)
    for key, value in own.items():
        if key not in state_dict:
            raise LoRAError(f"LoRA state dict has no {key} (expected shape {tuple(value.shape)})")
        if state_dict[key].shape != value.shape:
            raise LoRAError(
                f"LoRA shape mismatch at {key}: file has {tuple(state_dict[key].shape)}, "
                f"this model expects {tuple(value.shape)} (another rank or architecture?)"
            )
    extra = [k for k in state_dict if k not in own]
    if extra:
        raise LoRAError(
            f"LoRA state dict has {len(extra)} keys this model does not (first: {extra[0]}); "
            "was it trained with another target mode?"
        )
    for key, value in own.items():
        value.copy_(state_dict[key])


def merge_lora(unet: nn.Module) -> None:
    """Fold every adapter into its base weight: the UNet is plain again, with the LoRA's effect."""
    for name, wrapper in list(lora_modules(unet)):
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, wrapper.merged())
