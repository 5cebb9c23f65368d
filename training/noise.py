"""Per-sample random numbers for the training step, drawn on the device in one batched call.

Every random choice for a sample (its posterior sample, timestep and noise) must depend on that
sample alone, so that a run is the same whatever the batch size, the number of processes, or where it
was resumed. Per-sample `torch.Generator`s would give that, at the price of a few small kernels per
sample and a Python loop in the step. Instead the numbers come from a counter-based generator: element
i of stream s of a sample with seed k is a hash of (k, s, i). That is one batched computation for the
whole batch, it reads nothing back to the host, and it can be captured in a CUDA graph with the seeds
as its only input. The integer part is exact, so the uniform numbers are the same bits on every device.

The hash is Wellons' "lowbias32" (github.com/skeeto/hash-prospector), applied in int64 arithmetic to
32-bit values; the normal numbers come from the Box-Muller transform of two 24-bit uniforms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cli.choices import TIMESTEP_SAMPLINGS

_MASK32 = 0xFFFFFFFF

# Streams: independent sequences per sample.
POSTERIOR, TIMESTEP, NOISE, OFFSET, PERTURBATION = 0, 1, 2, 3, 4
MULTIRES = 8  # multi-resolution noise uses MULTIRES + i for its level i (up to 8 levels)
VALIDATION = 16  # validation uses VALIDATION + k for its k-th draw


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x below 2^32, without int64 overflow: x is split into 16-bit halves."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _uniform_bits(seeds: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """(B, count) 24-bit integers: element i of `stream` for each seed (int64, below 2^63)."""
    key = _hash32(
        (seeds & _MASK32) ^ _hash32((seeds >> 32) ^ _hash32(torch.full_like(seeds, stream)))
    )
    counter = torch.arange(count, device=seeds.device, dtype=torch.int64)
    return _hash32(_hash32(counter)[None, :] ^ key[:, None]) >> 8  # (B, count)


def rand(seeds: torch.Tensor, stream: int, shape: Sequence[int]) -> torch.Tensor:
    """Uniform numbers in (0, 1], shaped (B, *shape), one independent draw per seed."""
    n = math.prod(shape)
    u = (_uniform_bits(seeds, stream, n) + 1).to(torch.float32) / 2.0**24
    return u.reshape(len(seeds), *shape)


def randn(seeds: torch.Tensor, stream: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal numbers (float32), shaped (B, *shape), one independent draw per seed."""
    n = math.prod(shape)
    u = (_uniform_bits(seeds, stream, 2 * n) + 1).to(torch.float32) / 2.0**24  # (B, 2n) in (0, 1]
    radius = torch.sqrt(-2.0 * torch.log(u[:, :n]))
    z = radius * torch.cos(2.0 * math.pi * u[:, n:])
    return z.reshape(len(seeds), *shape)


# ---------------------------------------------------------------------------------------------
# Draws the loss makes (training/loss.py)
# ---------------------------------------------------------------------------------------------


def timesteps(
    seeds: torch.Tensor,
    low: int,
    high: int,
    sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """One timestep per seed (int64) in low .. high-1 (kohya's --min_timestep/--max_timestep):
    uniform; or logit-normal, a fraction s = sigmoid(mean + std z) of the range (Esser et al.
    2024, SD3's sampling, which favours the middle timesteps)."""
    if sampling == "uniform":
        s = 1.0 - rand(seeds, TIMESTEP, (1,))[:, 0]  # [0, 1)
    elif sampling == "logit_normal":
        s = torch.sigmoid(logit_mean + logit_std * randn(seeds, TIMESTEP, (1,))[:, 0])
    else:
        raise ValueError(
            f"unknown timestep sampling {sampling!r}; choose one of {TIMESTEP_SAMPLINGS}"
        )
    return ((s * (high - low)).long() + low).clamp_(max=high - 1)


def pyramid(
    eps: torch.Tensor, seeds: torch.Tensor, iterations: int, discount: float
) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion
    Model Training"): Gaussian noise at 1/2, 1/4, ... of the latent size, upsampled and added to
    `eps` (B, C, H, W) with weights discount^i, then scaled back to unit variance per sample. The
    paper draws each level's scale between 2 and 4; here it is 2^i, so that the whole batch shares
    its shapes. At most 8 levels."""
    _, channels, h, w = eps.shape
    for i in range(1, min(iterations, 8) + 1):
        size = (max(1, h >> i), max(1, w >> i))
        low = randn(seeds, MULTIRES + i - 1, (channels, *size))
        eps = eps + F.interpolate(low, size=(h, w), mode="bilinear") * discount**i
        if size == (1, 1):
            break
    return eps / eps.std(dim=(1, 2, 3), keepdim=True)
