"""SDXL's noise schedule, the one object training and sampling share.

The schedule is the discrete "scaled_linear" DDPM one SDXL base was trained with (betas from 0.00085 to
0.012 on a square-root scale, 1000 steps); training draws t, adds noise and builds the target from it
(training/train_loop.py), and every sampler (sampling/samplers.py) walks a subset of the same 1000
steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdxl.errors import UserError
from sdxl.weights import WeightsError


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
        where = "scheduler config" if isinstance(source, dict) else str(source)
        supported = {
            "beta_schedule": ("scaled_linear",),
            "timestep_spacing": ("leading",),
            "prediction_type": ("epsilon", "v_prediction"),
        }
        for key, allowed in supported.items():
            if config.get(key, allowed[0]) not in allowed:
                raise WeightsError(
                    f"{where}: {key} {config[key]!r} is not supported (only {', '.join(allowed)})"
                )
        return cls.scaled_linear(
            config.get("beta_start", 0.00085),
            config.get("beta_end", 0.012),
            config.get("num_train_timesteps", 1000),
            config.get("steps_offset", 1),
            config.get("prediction_type", "epsilon"),
        )

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The same schedule with its table on `device` (training keeps it next to the UNet)."""
        return replace(self, alphas_cumprod=self.alphas_cumprod.to(device))

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
        """Leading spacing: every (T // n)-th step from 0, reversed, plus steps_offset
        (SDXL, 30 steps: 958, 925, ..., 34, 1)."""
        if not 1 <= n <= self.num_train_timesteps:
            raise UserError(
                f"sampling steps must be between 1 and {self.num_train_timesteps}, got {n}"
            )
        step = self.num_train_timesteps // n
        return torch.arange(n - 1, -1, -1, dtype=torch.int64) * step + self.steps_offset

    def sigmas(self, n: int) -> torch.Tensor:
        """Noise levels sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) at the n timesteps, then 0."""
        table = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        return torch.cat([table[self.timesteps(n)], torch.zeros(1)])
