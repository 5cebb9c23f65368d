"""Adapters for the SDXL UNet and text encoders, without peft: LoRA on Linear and Conv2d layers
(LoCon), DoRA, and LyCORIS's LoHa and LoKr.

`apply_lora_to_unet` and `apply_lora_to_text_encoders` are passes over plain models: each swaps the
selected layers for an `AdaptedLayer` that keeps the frozen base `weight`/`bias` under their
original key names and adds the adapter under `<module>.lora.*`:

    LoRA (Hu et al. 2021):   y = W x + b + (alpha / rank) * up(down(dropout(x)))
    DoRA (Liu et al. 2024):  y = m * (W + dW) x / ||W + dW|| + b,   dW = (alpha / rank) * up @ down
    LoHa (LyCORIS):          y = W x + b + dW x,   dW = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b)
    LoKr (LyCORIS):          y = W x + b + dW x,   dW = (alpha / rank) * w1 kron (w2_a @ w2_b)

One factor of each starts at zero (`up`, `hada_w2_a`, `lokr_w2_b`), so a fresh adapter changes
nothing. For a convolution, `down` has the layer's
kernel, stride and padding and `up` is 1x1 (as kohya and LyCORIS). The adapter weights live in their
own dtype (fp32 by default) even when the base is bf16: AdamW updates of order lr * 1e-3 would vanish
in bf16's 8 mantissa bits, so the trainable weights and their optimizer state stay fp32 and only
the frozen base is low precision.

A kind of adapter is one class (an `Update`: its weights, how its update joins the layer's output,
its merged weight) and one entry in ADAPTERS; what each option adapts is one predicate in TARGETS.
Every file format reads and writes the same plain records, `Adapter` (LoRA, DoRA) and `Factors`
(LoHa, LoKr); reading other programs' files, and the kinds only they write, is
sdxl/lora_formats.py's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from cli.choices import ADAPTER_KINDS, TARGET_MODES
from sdxl.frozen import FrozenLayer
from sdxl.names import COMPONENTS, LoRAError, block_index, canonical, sgm_path

__all__ = ["COMPONENTS", "LoRAError"]  # also where the adapters' users expect them


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


@dataclass
class Factors:
    """A LoHa or LoKr adapter as the files hold it: its tensors under LyCORIS's names (hada_w1_a,
    ..., lokr_w1, lokr_w2_a, ...; Tucker cores hada_t1, hada_t2, lokr_t2 where a file has them)
    and alpha."""

    kind: str  # "loha" or "lokr"
    tensors: dict[str, torch.Tensor]
    alpha: float

    @property
    def rank(self) -> int:
        return cast(type[Factored], ADAPTERS[self.kind]).rank_of(self.tensors)


# Adapters keyed by "<component>.<module path>" (sdxl/names.py).
LoRAModules = dict[str, Adapter | Factors]


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


class Update(nn.Module):
    """What every adapter kind is: a trained update dW of one frozen Linear or Conv2d layer. A kind
    builds its fresh weights from the base layer, rank and alpha; gives dW (`delta_weight`, fp32,
    shaped as the base weight) and the adapted output (by default W x + b + dW x, as LyCORIS
    computes it: dW is applied on its own, since W + dW rounded to bf16 would lose it); and turns
    into its file record and back (`adapter`, `load`)."""

    rank: int
    alpha: torch.Tensor

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def output(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        base = layer.op(x, layer.base_weight(x.dtype), layer.bias)
        return base + layer.op(x, self.delta_weight().to(x.dtype))

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with the update folded in (fp32)."""
        return weight.float() + self.delta_weight()

    def adapter(self) -> Adapter | Factors:
        raise NotImplementedError

    def load(self, record: Adapter | Factors) -> None:
        raise NotImplementedError


class LoRA(Update):
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

    def adapter(self) -> Adapter:
        return Adapter(self.down.weight.detach(), self.up.weight.detach(), float(self.alpha))

    @torch.no_grad()
    def load(self, adapter: Adapter | Factors) -> None:
        assert isinstance(adapter, Adapter)
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
    def load(self, adapter: Adapter | Factors) -> None:
        super().load(adapter)
        assert isinstance(adapter, Adapter)
        if adapter.magnitude is None:
            raise LoRAError("a DoRA adapter needs its magnitude")
        self.magnitude.copy_(adapter.magnitude.reshape(self.magnitude.shape))


class Factored(Update):
    """LyCORIS's kinds (LoHa, LoKr): the update made of named factors, each a parameter under the
    name LyCORIS's files give it, so that our state dict's keys end as theirs do. A file's adapter
    may have other factor shapes than a fresh one (another factorisation, Tucker cores, full
    matrices): `load` takes the file's factors as they are and checks the update's shape."""

    kind: str

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, dropout: float,
                 dtype: torch.dtype):  # fmt: skip
        super().__init__()
        if dropout:
            raise LoRAError(f"{self.kind} has no dropout (LyCORIS has none either); drop it")
        self.shape = tuple(base.weight.shape)
        self.register_buffer("alpha", torch.tensor(float(alpha), device=base.weight.device))
        self.rank = rank

    def factors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters(recurse=False))

    def set_factors(self, tensors: dict[str, torch.Tensor], requires_grad: bool = True) -> None:
        for name in list(self.factors()):
            delattr(self, name)
        for name, t in tensors.items():
            self.register_parameter(name, nn.Parameter(t, requires_grad=requires_grad))
        self.rank = self.rank_of(tensors)

    @staticmethod
    def rank_of(tensors: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def scale(self) -> torch.Tensor:
        return self.alpha.float() / self.rank

    def adapter(self) -> Factors:
        return Factors(
            self.kind, {k: v.detach() for k, v in self.factors().items()}, float(self.alpha)
        )

    @torch.no_grad()
    def load(self, adapter: Adapter | Factors) -> None:
        if not isinstance(adapter, Factors) or adapter.kind != self.kind:
            raise LoRAError(f"a {self.kind} adapter cannot load a {type(adapter).__name__}")
        like = next(iter(self.factors().values()))
        self.set_factors({k: v.to(like) for k, v in adapter.tensors.items()})
        self.alpha.fill_(adapter.alpha)
        self.check_shape()

    def check_shape(self) -> None:
        try:
            shape = tuple(self.delta_weight().shape)
        except RuntimeError:  # factors that do not multiply
            shape = ()
        if shape != self.shape:
            raise LoRAError(f"{self.kind} factors {self.factor_shapes()} make no update of a "
                            f"{self.shape} layer")  # fmt: skip

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.factors().items()}

    @classmethod
    def holding(cls, record: Factors, shape: tuple[int, ...]) -> Factored:
        """The adapter holding a file's factors (as they are: any layout LyCORIS writes), for a
        layer of `shape`, without the layer."""
        update = cls.__new__(cls)
        nn.Module.__init__(update)
        update.shape = tuple(shape)
        update.register_buffer("alpha", torch.tensor(float(record.alpha)))
        update.set_factors(dict(record.tensors))
        update.check_shape()
        return update


def tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A convolution's update from a Tucker core (r, r, kh, kw) and its two modes, up (r, out) and
    down (r, in): (out, in, kh, kw), as LyCORIS rebuilds it."""
    return torch.einsum("i j ..., j r, i p -> p r ...", core, down, up)


class LoHa(Factored):
    """LoHa (LyCORIS; the Hadamard-product parameterisation of Hyeon-Woo et al. 2022, FedPara):
    dW = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), of rank up to rank^2 for the parameters
    of two LoRAs. A convolution's factors span its flattened (in * kh * kw) inputs; files may have
    Tucker cores instead (hada_t1, hada_t2 with (r, out) and (r, in) modes). LyCORIS's
    initialisation: w1_a ~ N(0, 0.1), w1_b and w2_b ~ N(0, 1), w2_a = 0."""

    kind = "loha"

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__(base, rank, alpha, dropout, dtype)
        out, flat = self.shape[0], math.prod(self.shape[1:])
        kw: dict[str, Any] = {"device": base.weight.device, "dtype": dtype}
        w1_a, w1_b = torch.empty(out, rank, **kw), torch.empty(rank, flat, **kw)
        w2_a, w2_b = torch.zeros(out, rank, **kw), torch.empty(rank, flat, **kw)
        nn.init.normal_(w1_a, std=0.1)
        nn.init.normal_(w1_b, std=1.0)
        nn.init.normal_(w2_b, std=1.0)
        self.set_factors({"hada_w1_a": w1_a, "hada_w1_b": w1_b, "hada_w2_a": w2_a, "hada_w2_b": w2_b})  # fmt: skip

    @staticmethod
    def rank_of(tensors: dict[str, torch.Tensor]) -> int:
        return tensors["hada_w1_b"].shape[0]

    def delta_weight(self) -> torch.Tensor:
        f = {k: v.float() for k, v in self.factors().items()}
        if "hada_t1" in f:
            w1 = tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
            w2 = tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        else:  # (out, r) @ (r, in * kh * kw)
            w1, w2 = f["hada_w1_a"] @ f["hada_w1_b"], f["hada_w2_a"] @ f["hada_w2_b"]
        return (w1 * w2 * self.scale()).reshape(self.shape)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """dimension = m * n with m <= n: m = factor where it divides the dimension; otherwise (and for
    factor -1) the pair closest to a square with m at most `factor`, as LyCORIS splits a LoKr
    layer's sides (e.g. 640 -> (20, 32), 1280 -> (32, 40) with -1; 640 -> (8, 80) with 8)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


class LoKr(Factored):
    """LoKr (LyCORIS; Kronecker-product adaptation, Edalati et al. 2022): dW = scale * w1 kron w2,
    each side of the weight split as out = a * b and in = c * d (`factorization`, `factor`). The
    small factor w1 (a, c) is a full matrix; w2 (b, d[, kh, kw]) is low-rank, w2_a (b, r) @ w2_b
    (r, d * kh * kw), when the rank is under half its larger side, else full. scale = alpha / rank,
    or 1 when no factor is low-rank. Files may also hold w1 as w1_a @ w1_b, or a Tucker core
    lokr_t2 with (r, b) and (r, d) modes. LyCORIS's initialisation: w1 and w2_a Kaiming-uniform,
    w2_b (or a full w2) zero."""

    kind = "lokr"

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, factor: int = -1):  # fmt: skip
        super().__init__(base, rank, alpha, dropout, dtype)
        (a, b), (c, d) = factorization(self.shape[0], factor), factorization(self.shape[1], factor)
        kernel = self.shape[2:]
        kw: dict[str, Any] = {"device": base.weight.device, "dtype": dtype}
        w1 = torch.empty(a, c, **kw)
        nn.init.kaiming_uniform_(w1, a=math.sqrt(5))
        if rank < max(b, d) / 2:
            w2_a = torch.empty(b, rank, **kw)
            nn.init.kaiming_uniform_(w2_a, a=math.sqrt(5))
            w2_b = torch.zeros(rank, d * math.prod(kernel), **kw)
            self.set_factors({"lokr_w1": w1, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b})
        else:  # a rank this large is a full matrix's worth: LyCORIS trains w2 whole
            self.set_factors({"lokr_w1": w1, "lokr_w2": torch.zeros(b, d, *kernel, **kw)})

    @staticmethod
    def rank_of(tensors: dict[str, torch.Tensor]) -> int:
        """The low-rank factors' rank; 0 when both factors are full matrices."""
        if "lokr_w2_a" in tensors:
            return tensors["lokr_w2_b"].shape[0]
        return tensors["lokr_w1_b"].shape[0] if "lokr_w1_a" in tensors else 0

    def scale(self) -> torch.Tensor:
        return super().scale() if self.rank else torch.ones(())

    def delta_weight(self) -> torch.Tensor:
        f = {k: v.float() for k, v in self.factors().items()}
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:  # (b, r) @ (r, d * kh * kw)
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))  # (a, c[, 1, 1])
        # (a, c) kron (b, d[ * kh * kw]) -> (a * b, c * d[ * kh * kw]) -> the weight's shape
        return (torch.kron(w1, w2.contiguous()) * self.scale()).reshape(self.shape)


# The kinds of adapter training makes (--adapter; --use_dora chooses "dora"). A new kind: a
# subclass of Update, an entry here, and its name in cli/choices.py.
ADAPTERS: dict[str, type[Update]] = {"lora": LoRA, "dora": DoRA, "loha": LoHa, "lokr": LoKr}
assert tuple(ADAPTERS) == ADAPTER_KINDS


class AdaptedLayer(FrozenLayer):
    """A frozen Linear or Conv2d plus its adapter. The base parameters keep the names `weight` and
    `bias`, so the model's state-dict keys are unchanged by the wrapping."""

    def __init__(self, base: nn.Linear | nn.Conv2d, lora: Update):
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


# Each --lora_target_mode as which layers of the UNet it adapts.
TARGETS: dict[str, Callable[[str, nn.Module], bool]] = {
    "attention": _attention,
    "attention_out": lambda name, m: type(m) is nn.Linear
    and (name.endswith("attn1.to_out.0") or name.endswith("attn2.to_out.0")),
    # Every Linear inside a Transformer2DModel: attention, feed-forward, proj_in / proj_out.
    "all": lambda name, m: type(m) is nn.Linear and ".attentions." in name,
}
assert tuple(TARGETS) == TARGET_MODES


def conv_target(name: str, m: nn.Module) -> bool:
    """kohya's conv_dim (--conv_rank): every convolution and Linear of the ResNet blocks (conv1,
    conv2, the 1x1 shortcut, the time projection) and of the down- and upsamplers."""
    return (type(m) is nn.Linear or isinstance(m, nn.Conv2d)) and any(
        f".{part}." in name for part in _RESNET_PARTS
    )


def text_target(name: str, m: nn.Module) -> bool:
    """The text encoders' attention and MLP projections (kohya's CLIPAttention and CLIPMLP)."""
    return type(m) is nn.Linear and bool(
        re.fullmatch(r"(text_model\.)?encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d)", name)
    )


# ---------------------------------------------------------------------------------------------
# Putting adapters in, taking them out
# ---------------------------------------------------------------------------------------------


def add_adapters(
    model: nn.Module,
    plan: dict[str, tuple[int, float]],
    kind: str = "lora",
    dropout: float = 0.0,
    options: dict | None = None,
) -> list[str]:
    """Wrap each planned layer (path -> (rank, alpha)) with a fresh adapter of `kind` (built with
    the kind's own `options`: LoKr's factor). Order matters and is fixed here: freeze every base
    parameter, then wrap, then mark only the adapter parameters trainable."""
    if kind not in ADAPTERS:
        raise LoRAError(f"unknown adapter kind {kind!r}; choose one of {sorted(ADAPTERS)}")
    model.requires_grad_(False)
    for name, (rank, alpha) in plan.items():
        if rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {rank} for {name}")
        parent, _, child = name.rpartition(".")
        base = model.get_submodule(name)
        assert isinstance(base, (nn.Linear, nn.Conv2d)), name
        wrapped = AdaptedLayer(base, ADAPTERS[kind](base, rank, alpha, dropout, **(options or {})))
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
    lokr_factor: int = -1,
) -> list[str]:
    """Wrap the UNet's target layers with adapters of `kind` (ADAPTERS); returns the wrapped
    module names.

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
        if not (TARGETS[target_mode](name, module) or (conv_rank and conv_target(name, module))):
            continue
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            plan[name] = (conv_rank, conv_alpha if conv_alpha is not None else conv_rank)
        elif block_ranks is not None:
            k = block_index(sgm_path(name, layers))
            plan[name] = (block_ranks[k], (block_alphas or block_ranks)[k])
        else:
            plan[name] = (rank, alpha)
    options = {"factor": lokr_factor} if kind == "lokr" else {}
    return add_adapters(
        unet, {n: ra for n, ra in plan.items() if ra[0] > 0}, kind, dropout, options
    )


def apply_lora_to_text_encoders(
    text_encoder: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    kind: str = "lora",
    lokr_factor: int = -1,
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
            if text_target(name, module) and not (unread and unread in name)
        }
        options = {"factor": lokr_factor} if kind == "lokr" else {}
        added = add_adapters(encoder, plan, kind, dropout, options)
        names += [canonical(f"{component}.{n}") for n in added]
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
    for DoRA `.lora.magnitude`; LoHa's and LoKr's factors as `<module>.lora.hada_w1_a`, ...,
    `<module>.lora.lokr_w1`, ..."""
    return {k: v for k, v in model.state_dict().items() if ".lora." in k}


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
        for name, p in layer.lora.named_parameters():
            counts[
                "magnitude" if name == "magnitude" else "conv" if layer.conv else "linear"
            ] += p.numel()
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
