"""SDXL's noise schedule, shared by training and sampling, and the samplers.

The schedule is the discrete "scaled_linear" DDPM one SDXL base was trained with (betas from 0.00085 to
0.012 on a square-root scale, 1000 steps); training draws t, adds noise and builds the target from it,
and every sampler walks a subset of the same 1000 steps.

Samplers are plain functions with one signature,

    sampler(eps_model, noise, schedule, steps, generator=None) -> clean latents

where `eps_model(x, t)` predicts the noise in `x` at timestep(s) `t` (classifier-free guidance lives in
that closure), `noise` is unit Gaussian noise, and `generator` (one, or one per sample) drives any
fresh noise a stochastic sampler needs. They hold no state between calls: every call computes its own
timesteps, so running a sampler twice with the same inputs gives the same result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class NoiseSchedule:
    """alpha_bar(t) for t = 0..T-1, and how a sampler with n steps picks its timesteps."""

    alphas_cumprod: torch.Tensor  # (T,) float32
    steps_offset: int = 1
    prediction_type: str = "epsilon"

    @classmethod
    def scaled_linear(
        cls,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        steps_offset: int = 1,
        prediction_type: str = "epsilon",
    ) -> NoiseSchedule:
        betas = (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)
            ** 2
        )
        return cls(torch.cumprod(1.0 - betas, dim=0), steps_offset, prediction_type)

    @classmethod
    def from_config(cls, source: dict | str | Path) -> NoiseSchedule:
        """From a diffusers `scheduler/scheduler_config.json` (SDXL's: scaled_linear, leading)."""
        config: dict = source if isinstance(source, dict) else json.loads(Path(source).read_text())
        if config.get("beta_schedule", "scaled_linear") != "scaled_linear":
            raise ValueError(
                f"scheduler: only beta_schedule scaled_linear is supported, got {config['beta_schedule']!r}"
            )
        if config.get("timestep_spacing", "leading") != "leading":
            raise ValueError(
                f"scheduler: only timestep_spacing leading is supported, got {config['timestep_spacing']!r}"
            )
        if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"scheduler: unsupported prediction_type {config['prediction_type']!r}"
            )
        return cls.scaled_linear(
            config.get("beta_start", 0.00085),
            config.get("beta_end", 0.012),
            config.get("num_train_timesteps", 1000),
            config.get("steps_offset", 1),
            config.get("prediction_type", "epsilon"),
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    # -- training ------------------------------------------------------------------------------

    def _at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar(t) shaped (B, 1, 1, 1) to broadcast against `like`."""
        a = self.alphas_cumprod.to(like.device)[t].to(like.dtype)
        return a.reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
        a = self._at(t, x0)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target, sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0."""
        a = self._at(t, x0)
        return a**0.5 * noise - (1 - a) ** 0.5 * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict under this schedule's prediction type."""
        return noise if self.prediction_type == "epsilon" else self.velocity(x0, noise, t)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t."""
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)

    # -- sampling ------------------------------------------------------------------------------

    def timesteps(self, n: int) -> torch.Tensor:
        """ "Leading" spacing: every (T // n)-th step from 0, reversed, plus steps_offset
        (SDXL, 30 steps: 958, 925, ..., 34, 1)."""
        if not 1 <= n <= self.num_train_timesteps:
            raise ValueError(f"steps must be between 1 and {self.num_train_timesteps}, got {n}")
        step = self.num_train_timesteps // n
        return torch.arange(n - 1, -1, -1, dtype=torch.int64) * step + self.steps_offset

    def sigmas(self, n: int) -> torch.Tensor:
        """Noise levels sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) at the n timesteps, then 0."""
        table = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        return torch.cat([table[self.timesteps(n)], torch.zeros(1)])


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
    eps_model: EpsModel,
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    generator: Generators = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 1
    with no churn); SDXL's default sampler, diffusers' EulerDiscreteScheduler."""
    timesteps, sigmas = schedule.timesteps(steps), schedule.sigmas(steps).to(noise.device)
    x = (
        noise.float() * (sigmas[0] ** 2 + 1) ** 0.5
    )  # start at sigma_max; VP-scaled noise has variance 1
    for i, t in enumerate(timesteps):
        sigma = sigmas[i]
        eps = eps_model((x / (sigma**2 + 1) ** 0.5).to(noise.dtype), t.to(noise.device)).float()
        denoised = x - sigma * eps
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    return x.to(noise.dtype)


@torch.no_grad()
def sample_ddim(
    eps_model: EpsModel,
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
        eps = eps_model(x, t.to(noise.device))
        a_t = alphas[t]
        # SDXL's config has set_alpha_to_one false: the step past t=0 lands on alpha_bar(0), not 1.
        a_prev = alphas[t - gap] if t - gap >= 0 else alphas[0]
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


@torch.no_grad()
def sample_ddpm(
    eps_model: EpsModel,
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
        eps = eps_model(x, t.to(noise.device))
        a_t = alphas[t]
        a_prev = alphas[t - gap] if t - gap >= 0 else one
        alpha_t = a_t / a_prev  # the one-step alpha between the two strided timesteps
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x = (a_prev**0.5 * (1 - alpha_t) / (1 - a_t)) * x0 + (
            alpha_t**0.5 * (1 - a_prev) / (1 - a_t)
        ) * x
        if t > 0:
            variance = torch.clamp((1 - a_prev) / (1 - a_t) * (1 - alpha_t), min=1e-20)
            x = x + variance**0.5 * randn(x.shape, generator, x.device, x.dtype)
    return x


SAMPLERS = {"euler": sample_euler, "ddim": sample_ddim, "ddpm": sample_ddpm}
