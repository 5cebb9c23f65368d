"""The samplers: plain functions that walk SDXL's noise schedule from noise to clean latents.

They share one signature,

    sampler(model, noise, schedule, steps, generator=None) -> clean latents

where `model(x, t)` is the UNet's prediction at `x` and timestep(s) `t`: the noise, or the velocity
for a v-prediction model (the schedule's `prediction_type` says which, and turns it into what the
sampler needs). Classifier-free guidance lives in that closure. `noise` is unit Gaussian noise, and
`generator` (one, or one per sample) drives any fresh noise a stochastic sampler needs. They hold no state between calls: every call computes its own
timesteps, so running a sampler twice with the same inputs gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cli.choices import SAMPLER_NAMES
from sdxl.diffusion import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Gaussian noise; with a list of generators, sample i is drawn from generator i alone, so an
    image's noise does not depend on the batch it is in."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    return torch.cat(
        [torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator]
    )


@torch.no_grad()
def sample_euler(
    model: ModelFn,
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    generator: Generators = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 1
    with no churn); SDXL's default sampler, diffusers' EulerDiscreteScheduler."""
    timesteps, sigmas = schedule.timesteps(steps), schedule.sigmas(steps).to(noise.device)
    # Start at sigma_max: x = noise * sqrt(sigma_max^2 + 1), since VP-scaled noise has variance 1.
    # diffusers starts a trailing schedule at noise * sigma_max instead (the same for a zero-SNR
    # schedule, whose sigma_max is 4096); so does this, for the same images.
    scale = sigmas[0] if schedule.timestep_spacing == "trailing" else (sigmas[0] ** 2 + 1) ** 0.5
    x = noise.float() * scale
    for i, t in enumerate(timesteps):
        sigma = sigmas[i]
        output = model((x / (sigma**2 + 1) ** 0.5).to(noise.dtype), t.to(noise.device)).float()
        denoised = schedule.denoised(output, x, sigma)
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    return x.to(noise.dtype)


@torch.no_grad()
def sample_ddim(
    model: ModelFn,
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    generator: Generators = None,
) -> torch.Tensor:
    """DDIM with eta = 0 (Song et al. 2021): deterministic steps x_t -> x_t' through the predicted x0."""
    timesteps = schedule.timesteps(steps)
    alphas = schedule.alphas_cumprod.to(noise.device)
    gap = schedule.num_train_timesteps // steps
    x = noise
    for t in timesteps:
        a_t = alphas[t]
        x0, eps = schedule.x0_and_eps(model(x, t.to(noise.device)), x, a_t)
        # SDXL's config has set_alpha_to_one false: the step past t=0 lands on alpha_bar(0), not 1.
        a_prev = alphas[t - gap] if t - gap >= 0 else alphas[0]
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


@torch.no_grad()
def sample_ddpm(
    model: ModelFn,
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    generator: Generators = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020) over the strided timesteps, with the posterior's
    "fixed small" variance."""
    timesteps = schedule.timesteps(steps)
    alphas = schedule.alphas_cumprod.to(noise.device)
    gap = schedule.num_train_timesteps // steps
    one = torch.tensor(1.0, device=noise.device)
    x = noise
    for t in timesteps:
        a_t = alphas[t]
        x0, _ = schedule.x0_and_eps(model(x, t.to(noise.device)), x, a_t)
        a_prev = alphas[t - gap] if t - gap >= 0 else one
        alpha_t = a_t / a_prev  # the one-step alpha between the two strided timesteps
        x = (a_prev**0.5 * (1 - alpha_t) / (1 - a_t)) * x0 + (
            alpha_t**0.5 * (1 - a_prev) / (1 - a_t)
        ) * x
        if t > 0:
            variance = torch.clamp((1 - a_prev) / (1 - a_t) * (1 - alpha_t), min=1e-20)
            x = x + variance**0.5 * randn(x.shape, generator, x.device, x.dtype)
    return x


SAMPLERS = {"euler": sample_euler, "ddim": sample_ddim, "ddpm": sample_ddpm}
assert tuple(SAMPLERS) == SAMPLER_NAMES  # the --sampler choices (cli/choices.py)
