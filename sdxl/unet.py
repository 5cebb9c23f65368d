"""The SDXL UNet in plain PyTorch.

One architecture, wired explicitly: conv_in -> three down levels -> mid block -> three up levels ->
conv_out, with the skip tensors handed from each down level to its up level. Only widths and depths
come from the config (so tests can build a tiny SDXL); the structure is SDXL's and nothing else.

Parameter names and shapes are diffusers' `UNet2DConditionModel` ones, so the official
`unet/diffusion_pytorch_model.safetensors` loads with `strict=True`. Helper modules that exist only to
keep a key index stable are marked where they are defined.

Shapes in comments: B batch, C channels, H x W latent size, N = H*W tokens, L context tokens (77).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_input
from torch.utils.checkpoint import checkpoint

from sdxl.weights import WeightsError, load_state_dict_strict, read_safetensors

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    """Widths and depths of an SDXL UNet. Defaults are SDXL base 1.0's."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, int, int] = (320, 640, 1280)
    layers_per_block: int = 2
    # Transformer depth per level; level 0 has no attention so its entry is unused. The mid block
    # uses the last entry.
    transformer_layers_per_block: tuple[int, int, int] = (1, 2, 10)
    # diffusers calls this `attention_head_dim`, but uses it as the number of heads per level
    # (SDXL: 5, 10, 20 heads, each 64 wide).
    num_heads: tuple[int, int, int] = (5, 10, 20)
    cross_attention_dim: int = 2048
    addition_time_embed_dim: int = 256
    # pooled text embedding (1280) + 6 time ids x 256 = 2816
    projection_class_embeddings_input_dim: int = 2816
    norm_num_groups: int = 32
    norm_eps: float = 1e-5

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


# Keys of a diffusers unet/config.json and the only value SDXL's structure allows for each.
_FIXED_STRUCTURE: dict[str, Any] = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "addition_embed_type": "text_time",
    "use_linear_projection": True,
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "resnet_time_scale_shift": "default",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "center_input_sample": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "upcast_attention": None,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "cross_attention_norm": None,
    "mid_block_only_cross_attention": None,
    "resnet_skip_time_act": False,
    "num_attention_heads": None,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}
# Keys that carry no structure (bookkeeping, or unused by the text_time embedding).
_INFORMATIONAL = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
    "sample_size",
    "addition_embed_type_num_heads",
}

# Keys of the config that may vary, and the UNetConfig field each sets.
_FREE_KEYS = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "block_out_channels": "block_out_channels",
    "layers_per_block": "layers_per_block",
    "transformer_layers_per_block": "transformer_layers_per_block",
    "attention_head_dim": "num_heads",
    "cross_attention_dim": "cross_attention_dim",
    "addition_time_embed_dim": "addition_time_embed_dim",
    "projection_class_embeddings_input_dim": "projection_class_embeddings_input_dim",
    "norm_num_groups": "norm_num_groups",
    "norm_eps": "norm_eps",
}


def _per_level(name: str, value: Any) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, int) for v in value)
    ):
        return (value[0], value[1], value[2])
    raise WeightsError(f"unet config: {name} must be an int or a list of 3 ints, got {value!r}")


def config_from_diffusers(config: dict[str, Any]) -> UNetConfig:
    """Read a diffusers `unet/config.json` dict, rejecting anything that is not SDXL's structure."""
    for key, value in config.items():
        if key in _INFORMATIONAL:
            continue
        if key in _FIXED_STRUCTURE:
            allowed = _FIXED_STRUCTURE[key]
            same = list(value) == allowed if isinstance(allowed, list) else value == allowed
            # upcast_attention: null and false mean the same thing.
            if key == "upcast_attention" and value is False:
                same = True
            if not same:
                raise WeightsError(
                    f"unet config: {key}={value!r} is not supported; this UNet implements SDXL's "
                    f"structure only ({key}={allowed!r})"
                )
        elif key not in _FREE_KEYS:
            raise WeightsError(f"unet config: unknown key {key!r}; this UNet implements SDXL only")
    kwargs: dict[str, Any] = {}
    for key, field_name in _FREE_KEYS.items():
        if key in config:
            kwargs[field_name] = config[key]
    for name in ("block_out_channels", "transformer_layers_per_block", "num_heads"):
        if name in kwargs:
            kwargs[name] = _per_level(name, kwargs[name])
    if not isinstance(kwargs.get("layers_per_block", 2), int):
        raise WeightsError("unet config: layers_per_block must be a single int")
    cfg = UNetConfig(**kwargs)
    for ch, heads in zip(cfg.block_out_channels, cfg.num_heads):
        if ch % cfg.norm_num_groups:
            raise WeightsError(
                f"unet config: {ch} channels are not divisible by {cfg.norm_num_groups} groups"
            )
        if ch % heads:
            raise WeightsError(f"unet config: {ch} channels are not divisible by {heads} heads")
    return cfg


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def sinusoidal_embedding(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(x * w_k), sin(x * w_k)] with w_k = 10000^(-k / (dim/2)); used for t and the time ids.

    (diffusers' `flip_sin_to_cos=True, downscale_freq_shift=0`, SGM's `timestep_embedding`.)
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000) * torch.arange(half, dtype=torch.float32, device=x.device) / half
    )
    angles = x[:, None].float() * freqs[None, :]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear; used for the timestep and for the added (text, time ids) vector."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ---------------------------------------------------------------------------------------------
# Two layers that keep less for backward (same parameters, same outputs, same gradients)
# ---------------------------------------------------------------------------------------------


class _ConvFrozenWeight(torch.autograd.Function):
    """conv2d whose backward computes only the input gradient, from the weight alone."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        ctx.save_for_backward(conv.weight)
        ctx.x_shape, ctx.conv = x.shape, (conv.stride, conv.padding, conv.dilation, conv.groups)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.x_format = torch.channels_last if channels_last else torch.contiguous_format
        return F.conv2d(x, conv.weight, conv.bias, *ctx.conv)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        # Under autocast the forward ran in grad's dtype; the weight is cast the same way.
        grad_x = conv2d_input(ctx.x_shape, weight.to(grad.dtype), grad, *ctx.conv)
        # The kernel takes its layout from the weight (x is not there); give x's back (a no-op
        # when the two agree, as in a UNet moved to one memory format).
        return grad_x.contiguous(memory_format=ctx.x_format), None


class LeanConv2d(nn.Conv2d):
    """nn.Conv2d that keeps nothing for backward while its weights are frozen.

    Autograd's convolution always saves its input, though only the weight gradient reads it: the
    input gradient is the output gradient convolved back with the weight. Under LoRA every
    convolution is frozen, so that input is pure cost: the upsamplers' 4x maps, and in each
    recomputed ResNet the GroupNorm+SiLU outputs. (Autograd's matmul already skips it for frozen
    Linears.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not any(p.requires_grad for p in (self.weight, self.bias) if p is not None)
        if frozen and torch.is_grad_enabled():
            return _ConvFrozenWeight.apply(x, self)
        return super().forward(x)  # inference, or full fine-tuning (the weight gradient reads x)


class GroupNormSiLU(nn.GroupNorm):
    """SiLU(GroupNorm(x)) that keeps only x for backward (the parameters are nn.GroupNorm's).

    Separately, GroupNorm saves x and SiLU saves the normalised map, a second tensor as large as x
    (the largest in a ResNet: 960 channels at full resolution in the first up ResNet). Recomputing
    the map in backward is elementwise work; storing it is what sets the training step's peak."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(self._norm_silu, x, use_reentrant=False, preserve_rng_state=False)
        return self._norm_silu(x)  # inference: nothing is kept for backward anyway

    def _norm_silu(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


# ---------------------------------------------------------------------------------------------
# ResNet and transformer layers
# ---------------------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, plus the time embedding, GroupNorm-SiLU-conv, plus a (1x1) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = GroupNormSiLU(cfg.norm_num_groups, in_ch, eps=cfg.norm_eps)
        self.conv1 = LeanConv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.time_embed_dim, out_ch)
        self.norm2 = GroupNormSiLU(cfg.norm_num_groups, out_ch, eps=cfg.norm_eps)
        self.conv2 = LeanConv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = LeanConv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # emb is already SiLU(time embedding): the UNet applies that activation once for all ResNets.
        h = self.conv1(self.norm1(x))  # norm1 and norm2 include the SiLU
        h = h + self.time_emb_proj(emb)[:, :, None, None]  # (B, C, 1, 1) broadcast over H, W
        h = self.conv2(self.norm2(h))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class SkipResnetBlock2D(ResnetBlock2D):
    """An up-path ResNet: the same layers over the running features concatenated with a skip.

    The concatenation happens inside, so that gradient checkpointing (which stores a unit's
    inputs) keeps `x` and `skip`, both of which exist anyway, instead of a concatenated copy."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(torch.cat([x, skip], dim=1), emb)  # (B, C + C_skip, H, W)


class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given, cross-attention otherwise."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        # A list only so that the key is `to_out.0.weight`, as in the official weights.
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N, C = x.shape
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, heads, N, C/heads)
        k = self.to_k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear to 2 x inner width, split into (value, gate), value * GELU(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is a parameter-free placeholder (diffusers' dropout slot) that keeps the output
        # projection at the key `ff.net.2`.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, and a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, feature map -> tokens, `depth` transformer blocks, tokens -> feature map, residual."""

    def __init__(self, ch: int, heads: int, depth: int, cfg: UNetConfig):
        super().__init__()
        # eps 1e-6 here (not the UNet's 1e-5), as in SDXL.
        self.norm = nn.GroupNorm(cfg.norm_num_groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, heads, cfg.cross_attention_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), a view
        # x first: the sum takes x's memory format, so a channels_last UNet stays channels_last.
        return x + h


class Downsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = LeanConv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = LeanConv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        # Nearest-neighbour to the size of the matching down level (x2 when sizes are even; exact
        # for odd latent sizes too).
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# ---------------------------------------------------------------------------------------------
# The levels of the UNet
# ---------------------------------------------------------------------------------------------


class DownBlock2D(nn.Module):
    """Down level 0: ResNets only, then a stride-2 downsample. Returns the output and its skips."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, cfg)
                for i in range(cfg.layers_per_block)
            ]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)])

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for resnet in self.resnets:
            x = resnet(x, emb)
            skips.append(x)
        x = self.downsamplers[0](x)
        skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(nn.Module):
    """Down levels 1 and 2: (ResNet, transformer) pairs; level 1 also downsamples."""

    def __init__(
        self, in_ch: int, out_ch: int, heads: int, depth: int, downsample: bool, cfg: UNetConfig
    ):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(n)]
        )
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, heads, depth, cfg) for _ in range(n)]
        )
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch)])

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, emb), context)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResNet, transformer, ResNet at the lowest resolution."""

    def __init__(self, ch: int, heads: int, depth: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, cfg), ResnetBlock2D(ch, ch, cfg)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, heads, depth, cfg)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


def _up_resnets(in_ch: int, prev_ch: int, out_ch: int, cfg: UNetConfig) -> nn.ModuleList:
    """The ResNets of an up level. Each takes the running features concatenated with one skip:
    the skips are the down level's outputs (out_ch wide) and, last, the level below's (in_ch)."""
    n = cfg.layers_per_block + 1
    return nn.ModuleList(
        [
            SkipResnetBlock2D(
                (prev_ch if i == 0 else out_ch) + (in_ch if i == n - 1 else out_ch), out_ch, cfg
            )
            for i in range(n)
        ]
    )


class UpBlock2D(nn.Module):
    """Up level 2 (full resolution): ResNets over concatenated skips, no attention, no upsample."""

    def __init__(self, in_ch: int, prev_ch: int, out_ch: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = _up_resnets(in_ch, prev_ch, out_ch, cfg)

    def forward(
        self, x: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor
    ) -> torch.Tensor:
        for resnet, skip in zip(self.resnets, reversed(skips)):
            x = resnet(x, emb, skip)  # (B, C, H, W) ++ (B, C_skip, H, W) -> (B, C_out, H, W)
        return x


class CrossAttnUpBlock2D(nn.Module):
    """Up levels 0 and 1: (ResNet over a concatenated skip, transformer) triples, then upsample."""

    def __init__(
        self, in_ch: int, prev_ch: int, out_ch: int, heads: int, depth: int, cfg: UNetConfig
    ):
        super().__init__()
        self.resnets = _up_resnets(in_ch, prev_ch, out_ch, cfg)
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, heads, depth, cfg) for _ in range(cfg.layers_per_block + 1)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        emb: torch.Tensor,
        context: torch.Tensor,
        out_size: torch.Size,
    ) -> torch.Tensor:
        for resnet, attn, skip in zip(self.resnets, self.attentions, reversed(skips)):
            x = resnet(x, emb, skip)  # (B, C, H, W) ++ (B, C_skip, H, W) -> (B, C_out, H, W)
            x = attn(x, context)
        return self.upsamplers[0](x, out_size)


# ---------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------


def _checkpointed(forward: Any, *args: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False)


class UNet2DConditionModel(nn.Module):
    """SDXL's noise-prediction UNet: eps = unet(x_t, t, text context, pooled text + time ids)."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg
        c0, c1, c2 = cfg.block_out_channels
        heads, depth = cfg.num_heads, cfg.transformer_layers_per_block

        self.conv_in = LeanConv2d(cfg.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim)
        # Added conditioning: pooled text (1280) ++ 6 time ids embedded at 256 each = 2816 in SDXL.
        self.add_embedding = TimestepEmbedding(
            cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim
        )

        self.down_blocks = nn.ModuleList(
            [
                DownBlock2D(c0, c0, cfg),
                CrossAttnDownBlock2D(c0, c1, heads[1], depth[1], downsample=True, cfg=cfg),
                CrossAttnDownBlock2D(c1, c2, heads[2], depth[2], downsample=False, cfg=cfg),
            ]
        )
        self.mid_block = UNetMidBlock2DCrossAttn(c2, heads[2], depth[2], cfg)
        self.up_blocks = nn.ModuleList(
            [
                CrossAttnUpBlock2D(c1, c2, c2, heads[2], depth[2], cfg),
                CrossAttnUpBlock2D(c0, c2, c1, heads[1], depth[1], cfg),
                UpBlock2D(c0, c1, c0, cfg),
            ]
        )
        self.conv_norm_out = GroupNormSiLU(cfg.norm_num_groups, c0, eps=cfg.norm_eps)
        self.conv_out = LeanConv2d(c0, cfg.out_channels, 3, padding=1)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UNet2DConditionModel:
        """Build from the dict of a diffusers `unet/config.json` (SDXL structure only)."""
        return cls(config_from_diffusers(config))

    # -- gradient checkpointing: chosen once, outside the blocks ---------------------------------

    def checkpoint_units(self) -> Iterator[nn.Module]:
        """The modules recomputed in backward: every ResNet and every transformer block of the
        down, mid and up paths (the granularity that keeps the recompute peak small)."""
        for module in self.modules():
            if isinstance(module, (ResnetBlock2D, BasicTransformerBlock)):
                yield module

    def enable_gradient_checkpointing(self, interval: int = 1) -> None:
        """Recompute every `interval`-th unit in backward (1: all of them, the least memory; 2
        keeps half the units' activations, trading memory for less recomputation)."""
        for i, module in enumerate(self.checkpoint_units()):
            if i % interval:
                continue
            # An instance attribute shadows the class's forward; the module tree and state dict
            # are unchanged and `disable_gradient_checkpointing` simply deletes it again.
            forward = functools.partial(type(module).forward, module)
            module.forward = functools.partial(_checkpointed, forward)

    def disable_gradient_checkpointing(self) -> None:
        for module in self.checkpoint_units():
            module.__dict__.pop("forward", None)

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """sample (B, 4, H, W) noisy latents; timestep scalar or (B,); encoder_hidden_states
        (B, 77, 2048); added_cond_kwargs: text_embeds (B, 1280) pooled, time_ids (B, 6) =
        (orig_h, orig_w, crop_top, crop_left, target_h, target_w). Returns eps, (B, 4, H, W)."""
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
        context = encoder_hidden_states
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]

        # Embeddings: t, and the six time ids each as a 256-d sinusoid, concatenated after the
        # pooled text vector -> (B, 2816), summed into one (B, 1280) conditioning vector.
        emb = self.time_embedding(
            sinusoidal_embedding(t, self.config.block_out_channels[0]).to(sample.dtype)
        )
        ids = sinusoidal_embedding(time_ids.flatten(), self.config.addition_time_embed_dim).reshape(
            B, -1
        )
        emb = emb + self.add_embedding(torch.cat([text_embeds, ids], dim=-1).to(emb.dtype))
        emb = F.silu(emb)  # every ResNet consumes SiLU(emb); compute it once

        # Down: each level returns its output and its skip tensors (one per ResNet/transformer pair,
        # plus the downsampled output); the up levels consume them in reverse.
        x0 = self.conv_in(sample)  # (B, C0, H, W)
        h, skips0 = self.down_blocks[0](x0, emb)  # skips at H and H/2; h at H/2
        h, skips1 = self.down_blocks[1](h, emb, context)  # skips at H/2 and H/4; h at H/4
        h, skips2 = self.down_blocks[2](h, emb, context)  # skips and h at H/4
        h = self.mid_block(h, emb, context)

        # Up: level i takes the skips of down level 2-i, plus the last skip of the level above it
        # (or conv_in's output), and upsamples to the size of the next level's skips.
        # h at H/2, then at H, then at H again (the last level does not upsample).
        h = self.up_blocks[0](h, [skips1[-1], *skips2], emb, context, skips1[0].shape[-2:])
        h = self.up_blocks[1](h, [skips0[-1], *skips1[:-1]], emb, context, skips0[0].shape[-2:])
        h = self.up_blocks[2](h, [x0, *skips0[:-1]], emb)
        return self.conv_out(self.conv_norm_out(h))  # (B, 4, H, W); the norm includes the SiLU


def load_unet(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> UNet2DConditionModel:
    """Load a diffusers-layout `unet/` folder (config.json and the fp32 or `.fp16` safetensors) or a
    single safetensors file (SDXL base config). The model is built on the meta device and the
    weights are assigned straight into `dtype` on `device`: no random init, no second copy."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"{path}: no config.json (expected a diffusers unet/ folder)")
        cfg = config_from_diffusers(json.loads((path / "config.json").read_text()))
        names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]
        if dtype in (torch.float16, torch.bfloat16):
            names.reverse()  # a half-precision target reads half the bytes from the fp16 variant
        found = [path / n for n in names if (path / n).is_file()]
        if not found:
            raise WeightsError(f"{path}: no {names[0]} or {names[1]}")
        weights = found[0]
    elif path.is_file():
        cfg, weights = UNetConfig(), path
    else:
        raise WeightsError(f"{path}: no such UNet file or folder")
    with torch.device("meta"):
        unet = UNet2DConditionModel(cfg)
    load_state_dict_strict(
        unet, read_safetensors(weights, dtype, device), f"UNet weights {weights}"
    )
    return unet
