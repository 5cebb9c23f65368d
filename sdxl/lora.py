"""Adapters for the SDXL UNet and text encoders, without peft: LoRA on Linear and Conv2d layers
(LoCon), and DoRA.

`apply_lora_to_unet` and `apply_lora_to_text_encoders` are passes over plain models: each swaps the
selected layers for an `AdaptedLayer` that keeps the frozen base `weight`/`bias` under their
original key names and adds the adapter under `<module>.lora.*`:

    LoRA (Hu et al. 2021):   y = W x + b + (alpha / rank) * up(down(dropout(x)))
    DoRA (Liu et al. 2024):  y = m * (W + dW) x / ||W + dW|| + b,   dW = (alpha / rank) * up @ down

`up` starts at zero, so a fresh adapter changes nothing. For a convolution, `down` has the layer's
kernel, stride and padding and `up` is 1x1 (as kohya and LyCORIS). The adapter weights live in their
own dtype (fp32 by default) even when the base is bf16: AdamW updates of order lr * 1e-3 would vanish
in bf16's 8 mantissa bits, so the trainable weights and their optimizer state stay fp32 and only
the frozen base is low precision.

A kind of adapter is one class (how its update joins the layer's output, and its merged weight) and
one entry in ADAPTERS; what each option adapts is one predicate in TARGETS. Every file format reads
and writes the same plain `Adapter` record (sdxl/lora_formats.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from sdxl.errors import UserError
from sdxl.frozen import FrozenLayer
from sdxl.options import TARGET_MODES


class LoRAError(UserError, ValueError):
    """A LoRA file or option that does not fit the model."""


@dataclass
class Adapter:
    """One layer's adapter as the files hold it: down (rank, in[, kh, kw]), up (out, rank[, 1, 1]),
    alpha, and for DoRA the magnitude: of each output channel, (out,), or, in some foreign files,
    of each input channel, (1, in)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# Adapters keyed by "<component>.<module path>", the component one of COMPONENTS.
LoRAModules = dict[str, Adapter]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


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


class LoRA(nn.Module):
    """The low-rank update (alpha / rank) * up(down(x)) of a Linear or Conv2d layer."""

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        device = base.weight.device  # a UNet already on the GPU gets GPU adapters
        self.rank = rank
        self.alpha: torch.Tensor
        # A buffer, so that every saved adapter carries its own alpha (ranks and alphas may differ
        # per block).
        self.register_buffer("alpha", torch.tensor(float(alpha), device=device))
        self.down: nn.Linear | nn.Conv2d
        self.up: nn.Linear | nn.Conv2d
        if isinstance(base, nn.Conv2d):
            # down has the base's kernel, stride and padding; up is 1x1.
            kernel, stride = cast(tuple[int, int], base.kernel_size), cast(
                tuple[int, int], base.stride
            )
            padding = cast(tuple[int, int], base.padding)
            kw = {"bias": False, "device": device, "dtype": dtype}
            self.down = nn.Conv2d(base.in_channels, rank, kernel, stride, padding, **kw)  # type: ignore[arg-type]
            self.up = nn.Conv2d(rank, base.out_channels, 1, **kw)  # type: ignore[arg-type]
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
            self.up = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # down: Kaiming-uniform like nn.Linear (and peft's default); up: zero, so the update starts at 0.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in the adapter's dtype (fp32 by default), returned in the caller's. Dropout, when
        # on, acts on x in the caller's dtype, so what backward keeps stays in that dtype too.
        x = self.dropout(x)
        if isinstance(self.down, nn.Conv2d):
            h = self.down(x.to(self.down.weight.dtype))
        else:
            h = _LinearOnCastInput.apply(x, self.down.weight)
        return (self.up(h) * (self.alpha / self.rank)).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) * up @ down in fp32, shaped as the base layer's weight."""
        up, down = self.up.weight.float(), self.down.weight.float()
        # (out, rank[, 1, 1]) @ (rank, in[, kh, kw]) -> (out, in[, kh, kw])
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return delta * (self.alpha.float() / self.rank)

    def output(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        """The adapted layer's output."""
        return layer.op(x, layer.base_weight(x.dtype), layer.bias) + self(x)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with the update folded in (fp32)."""
        return weight.float() + self.delta_weight()

    def adapter(self) -> Adapter:
        return Adapter(self.down.weight.detach(), self.up.weight.detach(), float(self.alpha))

    @torch.no_grad()
    def load(self, adapter: Adapter) -> None:
        self.down.weight.copy_(adapter.down.reshape(self.down.weight.shape))
        self.up.weight.copy_(adapter.up.reshape(self.up.weight.shape))


def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output channel's weights: over every axis but the first, as peft
    takes it for DoRA. (out, ...) -> (out,)"""
    return torch.linalg.vector_norm(weight.flatten(1), dim=1)


class DoRA(LoRA):
    """DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): the adapted weight as a
    trained magnitude per output channel times the direction (W + dW) / ||W + dW||. The norm is
    detached from the gradient, as the paper's section 4.3 and peft do."""

    norm = staticmethod(channel_norm)  # the weight's norm, one value per magnitude

    def __init__(self, base: nn.Linear | nn.Conv2d, *args, **kwargs):
        super().__init__(base, *args, **kwargs)
        # ||W||, so that with up = 0 the layer is unchanged.
        magnitude = self.norm(base.weight.detach().float()).to(self.up.weight.dtype)
        self.magnitude = nn.Parameter(magnitude)

    @staticmethod
    def along_channels(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A magnitude-shaped vector, shaped to scale the weight: (out,) -> (out, 1[, 1, 1])."""
        return v.reshape(-1, *[1] * (weight.dim() - 1))

    def output(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        norm = channel_norm(super().merged_weight(layer.base_weight(torch.float32))).detach()
        scale = layer.per_channel((self.magnitude / norm).to(x.dtype))
        # s (W x + dW x) + b, written as peft writes it: with s = 1 (a fresh adapter) it adds
        # exact zeros to the base layer's output.
        base = layer.op(x, layer.base_weight(x.dtype), layer.bias)
        plain = base if layer.bias is None else base - layer.per_channel(layer.bias)
        return base + (scale - 1) * plain + scale * self(x)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        merged = super().merged_weight(weight)  # LoRA's: W + dW
        scale = self.magnitude.float() / self.norm(merged).detach()
        return merged * self.along_channels(scale, merged)

    def adapter(self) -> Adapter:
        return Adapter(
            self.down.weight.detach(),
            self.up.weight.detach(),
            float(self.alpha),
            self.magnitude.detach(),
        )

    @torch.no_grad()
    def load(self, adapter: Adapter) -> None:
        super().load(adapter)
        if adapter.magnitude is None:
            raise LoRAError("a DoRA adapter needs its magnitude")
        self.magnitude.copy_(adapter.magnitude.reshape(self.magnitude.shape))


def input_channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each input channel's weights, over every axis but the second.
    (out, in, ...) -> (1, in)"""
    return torch.linalg.vector_norm(weight.transpose(0, 1).flatten(1), dim=1)[None]


class DoRAOnInputs(DoRA):
    """DoRA with one magnitude per input channel, (1, in): what OneTrainer writes by default and
    older LyCORIS wrote, and ComfyUI reads. Only read from files; training makes DoRA."""

    norm = staticmethod(input_channel_norm)

    @staticmethod
    def along_channels(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(1, in) -> (1, in[, 1, 1])"""
        return v.reshape(1, -1, *[1] * (weight.dim() - 2))

    def output(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        # A scale per input channel does not factor out of the output: use the whole weight.
        merged = self.merged_weight(layer.base_weight(torch.float32))
        return layer.op(x, merged.to(x.dtype), layer.bias)


# The kinds of adapter, by the name --lora_type... chooses. A new kind: a subclass of LoRA, and here.
ADAPTERS: dict[str, type[LoRA]] = {"lora": LoRA, "dora": DoRA}


class AdaptedLayer(FrozenLayer):
    """A frozen Linear or Conv2d plus its adapter. The base parameters keep the names `weight` and
    `bias`, so the model's state-dict keys are unchanged by the wrapping."""

    def __init__(self, base: nn.Linear | nn.Conv2d, lora: LoRA):
        super().__init__(base)
        self.lora = lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora.output(self, x)

    @torch.no_grad()
    def merged(self, strength: float = 1.0) -> nn.Module:
        """The plain layer with the adapter folded into its weight (for inference: one matmul
        instead of three, and room for another LoRA), at `strength` (W + strength * (W' - W))."""
        assert self.weight_scale is None, "merge LoRAs before storing the base in fp8"
        w = self.weight
        merged = self.lora.merged_weight(w)
        if strength != 1.0:  # part of the way from W to W'
            merged = w.float() + strength * (merged - w.float())
        out, in_ = w.shape[:2]
        with torch.device("meta"):
            layer = (
                nn.Conv2d(in_, out, tuple(w.shape[2:]), bias=self.bias is not None)  # type: ignore[arg-type]
                if self.conv
                else nn.Linear(in_, out, bias=self.bias is not None)
            )
        if self.conv:
            keywords = self.op.keywords  # type: ignore[attr-defined]
            layer.stride, layer.padding = keywords["stride"], keywords["padding"]
            layer.dilation = keywords["dilation"]
        layer.weight = nn.Parameter(merged.to(w.dtype), requires_grad=False)
        layer.bias = self.bias
        return layer


# ---------------------------------------------------------------------------------------------
# What can be adapted
# ---------------------------------------------------------------------------------------------

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_RESNET_PARTS = ("resnets", "downsamplers", "upsamplers")


def _attention(name: str, m: nn.Module) -> bool:
    return type(m) is nn.Linear and any(
        name.endswith(f"attn1.{s}") or name.endswith(f"attn2.{s}") for s in _ATTENTION
    )


# Each --lora_target_mode, and "conv" (--conv_rank), as which layers of the UNet it adapts.
TARGETS: dict[str, Callable[[str, nn.Module], bool]] = {
    "attention": _attention,
    "attention_out": lambda name, m: type(m) is nn.Linear
    and (name.endswith("attn1.to_out.0") or name.endswith("attn2.to_out.0")),
    # Every Linear inside a Transformer2DModel: attention, feed-forward, proj_in / proj_out.
    "all": lambda name, m: type(m) is nn.Linear and ".attentions." in name,
    # kohya's conv_dim: every convolution and Linear of the ResNet blocks (conv1, conv2, the
    # 1x1 shortcut, the time projection) and of the down- and upsamplers.
    "conv": lambda name, m: (type(m) is nn.Linear or isinstance(m, nn.Conv2d))
    and any(f".{part}." in name for part in _RESNET_PARTS),
    # The text encoders' attention and MLP projections (kohya's CLIPAttention and CLIPMLP).
    "text": lambda name, m: type(m) is nn.Linear
    and bool(
        re.fullmatch(r"(text_model\.)?encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d)", name)
    ),
}
assert set(TARGET_MODES) <= set(TARGETS)


_RESNET_SGM = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}


def sgm_path(path: str, layers_per_block: int) -> str:
    """diffusers UNet module path -> the original SDXL (SGM) path, which kohya's and ComfyUI's
    names use. Each level has layers_per_block + 1 slots in input_blocks (a ResNet and its
    transformer, then the downsample), input_blocks.0 being conv_in, and as many in output_blocks;
    in a slot the ResNet is sub-module 0, the transformer 1, an upsample the last (2: SDXL's
    upsampling levels all have transformers)."""
    n = layers_per_block + 1
    if path in _TOP_SGM:
        return _TOP_SGM[path]
    p = path.split(".")
    if p[0] == "mid_block":  # ResNet, transformer, ResNet: middle_block.0-2, no slots
        if p[1] == "attentions":
            return "middle_block.1." + ".".join(p[3:])
        if p[1] == "resnets" and len(p) == 4 and p[3] in _RESNET_SGM:
            return f"middle_block.{2 * int(p[2])}.{_RESNET_SGM[p[3]]}"
    elif p[0] in ("down_blocks", "up_blocks"):
        level, kind = int(p[1]), p[2]
        if kind == "downsamplers":
            return f"input_blocks.{n * (level + 1)}.0.op"
        if kind == "upsamplers":
            return f"output_blocks.{n * level + n - 1}.2.conv"
        down = p[0] == "down_blocks"
        slot = f"input_blocks.{n * level + int(p[3]) + 1}" if down else f"output_blocks.{n * level + int(p[3])}"  # fmt: skip
        if kind == "attentions":
            return f"{slot}.1." + ".".join(p[4:])
        if kind == "resnets" and len(p) == 5 and p[4] in _RESNET_SGM:
            return f"{slot}.0.{_RESNET_SGM[p[4]]}"
    raise LoRAError(f"no original SDXL name for {path}")


def block_index(sgm: str) -> int:
    """kohya's SDXL block number of an original module path, 0-22: 0 the time and label
    embeddings, 1-9 input_blocks.0-8, 10-12 middle_block.0-2, 13-21 output_blocks.0-8, 22 out."""
    if m := re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.", sgm):
        return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m[1]] + int(m[2])
    return 22 if sgm.startswith("out.") else 0


# ---------------------------------------------------------------------------------------------
# Putting adapters in, taking them out
# ---------------------------------------------------------------------------------------------


def add_adapters(
    model: nn.Module, plan: dict[str, tuple[int, float]], kind: str = "lora", dropout: float = 0.0
) -> list[str]:
    """Wrap each planned layer (path -> (rank, alpha)) with a fresh adapter of `kind`. Order
    matters and is fixed here: freeze every base parameter, then wrap, then mark only the adapter
    parameters trainable."""
    if kind not in ADAPTERS:
        raise LoRAError(f"unknown adapter kind {kind!r}; choose one of {sorted(ADAPTERS)}")
    model.requires_grad_(False)
    for name, (rank, alpha) in plan.items():
        if rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {rank} for {name}")
        parent, _, child = name.rpartition(".")
        base = model.get_submodule(name)
        assert isinstance(base, (nn.Linear, nn.Conv2d)), name
        wrapped = AdaptedLayer(base, ADAPTERS[kind](base, rank, alpha, dropout))
        setattr(model.get_submodule(parent), child, wrapped)
    for _, layer in lora_modules(model):
        layer.lora.requires_grad_(True)
    return list(plan)


def apply_lora_to_unet(
    unet: nn.Module,
    rank: int,
    alpha: float,
    target_mode: str = "attention",
    dropout: float = 0.0,
    *,
    kind: str = "lora",
    conv_rank: int = 0,
    conv_alpha: float | None = None,
    block_ranks: list[int] | None = None,
    block_alphas: list[float] | None = None,
) -> list[str]:
    """Wrap the UNet's target layers with adapters; returns the wrapped module names.

    `target_mode` chooses the transformer layers (TARGETS). `conv_rank` > 0 adds the ResNet blocks'
    convolutions and Linears and the samplers' convolutions, as kohya's conv_dim does: its 3x3
    convolutions get conv_rank and conv_alpha, the 1x1 shortcut and the time projection get `rank`
    and `alpha`. `block_ranks` / `block_alphas` (23 values, kohya's block_dims / block_alphas) give
    the rank and alpha of the non-3x3 layers by block instead; a rank of 0 leaves a block out.
    """
    if target_mode not in TARGET_MODES:
        raise LoRAError(f"unknown LoRA target mode {target_mode!r}; choose one of {TARGET_MODES}")
    layers = int(unet.config.layers_per_block)  # type: ignore[union-attr, arg-type]
    plan = {}
    for name, module in unet.named_modules():
        if not (
            TARGETS[target_mode](name, module) or (conv_rank and TARGETS["conv"](name, module))
        ):
            continue
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            plan[name] = (conv_rank, conv_alpha if conv_alpha is not None else conv_rank)
        elif block_ranks is not None:
            k = block_index(sgm_path(name, layers))
            plan[name] = (block_ranks[k], (block_alphas or block_ranks)[k])
        else:
            plan[name] = (rank, alpha)
    return add_adapters(unet, {n: ra for n, ra in plan.items() if ra[0] > 0}, kind, dropout)


def apply_lora_to_text_encoders(
    text_encoder: nn.Module, rank: int, alpha: float, dropout: float = 0.0, kind: str = "lora"
) -> list[str]:
    """Adapters on both CLIP encoders' attention and MLP projections (an SDXLTextEncoder, or any
    module with `text_encoder` and `text_encoder_2`), on every layer whose output SDXL reads:
    CLIP-L's last layer is left out, since SDXL takes its penultimate hidden states (bigG's last
    layer makes the pooled embedding)."""
    names = []
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(text_encoder, component)
        last = encoder.config.num_hidden_layers - 1
        unread = f"encoder.layers.{last}." if component == "text_encoder" else None
        plan = {
            name: (rank, alpha)
            for name, module in encoder.named_modules()
            if TARGETS["text"](name, module) and not (unread and unread in name)
        }
        names += [canonical(f"{component}.{n}") for n in add_adapters(encoder, plan, kind, dropout)]
    return names


def components(unet: nn.Module, text_encoder: nn.Module | None = None) -> dict[str, nn.Module]:
    """The models adapters go into, by their LoRAModules component names (the text encoders from
    an SDXLTextEncoder)."""
    models = {"unet": unet}
    if text_encoder is not None:
        models["text_encoder"] = text_encoder.text_encoder  # type: ignore[assignment]
        models["text_encoder_2"] = text_encoder.text_encoder_2  # type: ignore[assignment]
    return models


def lora_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def get_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: `<module>.lora.down.weight`, `.lora.up.weight`, `.lora.alpha` and
    for DoRA `.lora.magnitude`."""
    return {k: v for k, v in model.state_dict().items() if ".lora." in k}


def split_component(key: str) -> tuple[str, str]:
    """ "unet.down_blocks..." -> ("unet", "down_blocks...")."""
    component, _, path = key.partition(".")
    if component not in COMPONENTS:
        raise LoRAError(f"adapter key {key} names no model part ({', '.join(COMPONENTS)})")
    return component, path


def canonical(key: str) -> str:
    """An adapter key as the files name it: CLIP's layers under `text_model.`, as the weight files,
    kohya, ComfyUI and diffusers have them (transformers 5 builds CLIPTextModel without that
    level)."""
    component, path = split_component(key)
    if component != "unet" and path.startswith("encoder."):
        return f"{component}.text_model.{path}"
    return key


def by_component(modules: LoRAModules) -> dict[str, dict[str, Adapter]]:
    """{"unet": {path: adapter}, "text_encoder": {...}, ...}, for the parts that have adapters."""
    parts: dict[str, dict[str, Adapter]] = {}
    for key, adapter in modules.items():
        component, path = split_component(key)
        parts.setdefault(component, {})[path] = adapter
    return parts


def export_adapters(models: dict[str, nn.Module]) -> LoRAModules:
    """The live adapters of the models (by component name), as the files hold them."""
    return {
        canonical(f"{component}.{name}"): layer.lora.adapter()
        for component, model in models.items()
        for name, layer in lora_modules(model)
    }


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into an already-wrapped model. Strict: a file made for another rank,
    target set or architecture fails, naming the first mismatched key and both shapes."""
    own = get_lora_state_dict(model)
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


@torch.no_grad()
def attach_adapters(model: nn.Module, adapters: dict[str, Adapter]) -> None:
    """Wrap exactly the named layers with adapters holding the given weights (from a file): a
    DoRA adapter where there is a magnitude (DoRAOnInputs where it is one per input channel),
    else LoRA."""
    model.requires_grad_(False)
    own = dict(model.named_modules())
    for name, adapter in adapters.items():
        if name not in own:  # the model may lack the files' text_model level (see canonical)
            name = name.removeprefix("text_model.")
        base = own.get(name)
        if not (type(base) is nn.Linear or isinstance(base, nn.Conv2d)):
            raise LoRAError(f"LoRA targets {name}, which is not a Linear or Conv2d of this model")
        assert isinstance(base, (nn.Linear, nn.Conv2d))
        kind: type[LoRA] = LoRA
        if adapter.magnitude is not None:
            kind = DoRAOnInputs if adapter.magnitude.dim() == 2 else DoRA
        lora = kind(base, adapter.rank, adapter.alpha)
        shapes_fit = adapter.down.numel() == lora.down.weight.numel() and (
            adapter.up.numel() == lora.up.weight.numel()
        )
        if isinstance(lora, DoRA):
            shapes_fit &= adapter.magnitude.numel() == lora.magnitude.numel()  # type: ignore[union-attr]
        if not shapes_fit or adapter.down.shape[1] != lora.down.weight.shape[1]:
            raise LoRAError(
                f"LoRA shape mismatch at {name}: file has down {tuple(adapter.down.shape)} / up "
                f"{tuple(adapter.up.shape)}, this model's layer is {tuple(base.weight.shape)} "
                "(another architecture?)"
            )
        lora.load(adapter)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, AdaptedLayer(base, lora))


def attach_lora(models: dict[str, nn.Module], modules: LoRAModules) -> None:
    """Put adapters read from a file into the models they name (by component)."""
    for component, adapters in by_component(modules).items():
        if component not in models:
            raise LoRAError(f"the LoRA adapts the {component}, which is not loaded here")
        attach_adapters(models[component], adapters)


def merge_lora(model: nn.Module, strength: float = 1.0) -> None:
    """Fold every adapter into its base weight, at `strength`: the model is plain again, with the
    adapters' effect."""
    for name, layer in list(lora_modules(model)):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.merged(strength))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable adapter parameters by kind of layer: Linear, Conv2d, and DoRA magnitudes."""
    counts = {"linear": 0, "conv": 0, "magnitude": 0}
    for _, layer in lora_modules(model):
        n = layer.lora.down.weight.numel() + layer.lora.up.weight.numel()
        counts["conv" if layer.conv else "linear"] += n
        if isinstance(layer.lora, DoRA):
            counts["magnitude"] += layer.lora.magnitude.numel()
    return counts


def describe_adapters(models: dict[str, nn.Module]) -> str:
    """One line: the adapter parameters of each model, by kind, and in all."""
    counts = {name: count_parameters(model) for name, model in models.items()}
    parts = [
        f"{name} " + ", ".join(f"{kind} {n:,}" for kind, n in c.items() if n)
        for name, c in counts.items()
    ]
    total = sum(n for c in counts.values() for n in c.values())
    return f"adapter parameters: {'; '.join(parts)}; {total:,} in all"
