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
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

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
# The step's random draws, resolved once from the options
# ---------------------------------------------------------------------------------------------

NoiseFn = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def make_noise(offset: float) -> NoiseFn:
    """The diffusion noise for latents of shape (B, C, H, W). With `offset` > 0 ("noise offset",
    Guttenberg 2023), one extra Gaussian per sample and channel, constant over the image, is added
    with that weight, which lets the model learn overall brightness shifts."""

    def plain(seeds: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return randn(seeds, NOISE, shape[1:])

    def with_offset(seeds: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return plain(seeds, shape) + offset * randn(seeds, OFFSET, (shape[1], 1, 1))

    return plain if offset == 0 else with_offset


def multires_noise(base: NoiseFn, iterations: int, discount: float) -> NoiseFn:
    """Multi-resolution ("pyramid") noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion
    Model Training"): Gaussian noise at 1/2, 1/4, ... of the latent size, upsampled and added with
    weights discount^i, then scaled back to unit variance per sample. The paper draws each level's
    scale between 2 and 4; here it is 2^i, so that the whole batch shares its shapes."""
    if iterations == 0:
        return base

    def noise(seeds: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        n = base(seeds, shape)
        h, w = shape[2], shape[3]
        for i in range(1, min(iterations, 8) + 1):
            size = (max(1, h >> i), max(1, w >> i))
            low = randn(seeds, MULTIRES + i - 1, (shape[1], *size))
            n = n + F.interpolate(low, size=(h, w), mode="bilinear") * discount**i
            if size == (1, 1):
                break
        return n / n.std(dim=(1, 2, 3), keepdim=True)

    return noise


def input_perturbation(gamma: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The noise the UNet's input is made with: the target's noise plus gamma times fresh noise
    (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models"); the target
    keeps the unperturbed noise. With gamma 0, the target's noise itself."""
    if gamma == 0:
        return lambda seeds, n: n
    return lambda seeds, n: n + gamma * randn(seeds, PERTURBATION, n.shape[1:])


def uniform_timesteps(num_train_timesteps: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """t uniform over 0 .. T-1, one per seed (int64)."""

    def draw(seeds: torch.Tensor) -> torch.Tensor:
        u = rand(seeds, TIMESTEP, (1,))[:, 0]  # (0, 1]
        return ((1.0 - u) * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)

    return draw
