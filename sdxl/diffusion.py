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

import numpy as np
import torch

from cli.choices import PREDICTION_TYPES
from sdxl.errors import UserError
from sdxl.weights import WeightsError


@dataclass(frozen=True)
class NoiseSchedule:
    """alpha_bar(t) for t = 0..T-1, what the UNet predicts, and how a sampler with n steps picks
    its timesteps."""

    alphas_cumprod: torch.Tensor  # (T,) float32
    steps_offset: int = 1
    prediction_type: str = "epsilon"  # or "v_prediction"
    timestep_spacing: str = "leading"  # or "trailing"

    @classmethod
    def scaled_linear(
        cls,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        steps_offset: int = 1,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        zero_terminal_snr: bool = False,
    ) -> NoiseSchedule:
        betas = (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)
            ** 2
        )
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(
            torch.cumprod(1.0 - betas, dim=0), steps_offset, prediction_type, timestep_spacing
        )

    @classmethod
    def from_config(
        cls,
        source: dict | str | Path,
        prediction_type: str | None = None,
        zero_terminal_snr: bool | None = None,
    ) -> NoiseSchedule:
        """From a diffusers `scheduler/scheduler_config.json` (SDXL's: scaled_linear, leading,
        epsilon), with the prediction type and zero terminal SNR overridden when given. A
        v-prediction or zero-terminal-SNR model samples with trailing spacing, which reaches the
        last timestep (Lin et al. 2023)."""
        config: dict = source if isinstance(source, dict) else json.loads(Path(source).read_text())
        where = "scheduler config" if isinstance(source, dict) else str(source)
        supported = {
            "beta_schedule": ("scaled_linear",),
            "timestep_spacing": ("leading", "trailing"),
            "prediction_type": PREDICTION_TYPES,
        }
        for key, allowed in supported.items():
            if config.get(key, allowed[0]) not in allowed:
                raise WeightsError(
                    f"{where}: {key} {config[key]!r} is not supported (only {', '.join(allowed)})"
                )
        prediction_type = prediction_type or config.get("prediction_type", "epsilon")
        zero_snr = (
            config.get("rescale_betas_zero_snr", False)
            if zero_terminal_snr is None
            else zero_terminal_snr
        )
        spacing = config.get("timestep_spacing", "leading")
        if prediction_type == "v_prediction" or zero_snr:
            spacing = "trailing"
        return cls.scaled_linear(
            config.get("beta_start", 0.00085),
            config.get("beta_end", 0.012),
            config.get("num_train_timesteps", 1000),
            config.get("steps_offset", 1),
            prediction_type,
            spacing,
            zero_snr,
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
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t (0 at the last
        timestep of a zero-terminal-SNR schedule)."""
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)

    # -- sampling ------------------------------------------------------------------------------

    def timesteps(self, n: int) -> torch.Tensor:
        """n timesteps, high to low. Leading spacing: every (T // n)-th step from 0, reversed, plus
        steps_offset (SDXL, 30 steps: 958, 925, ..., 34, 1). Trailing: every T / n-th step down from
        T - 1, rounded (30 steps: 999, 966, ..., 32), so that sampling starts at the last one."""
        T = self.num_train_timesteps
        if not 1 <= n <= T:
            raise UserError(f"sampling steps must be between 1 and {T}, got {n}")
        if self.timestep_spacing == "trailing":  # numpy, to round exactly as diffusers does
            return torch.from_numpy(np.round(np.arange(T, 0, -T / n))).long() - 1
        return torch.arange(n - 1, -1, -1, dtype=torch.int64) * (T // n) + self.steps_offset

    def sigmas(self, n: int) -> torch.Tensor:
        """Noise levels sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) at the n timesteps, then 0.
        alpha_bar is kept from 2^-24 up, as diffusers does, so that a zero-terminal-SNR schedule's
        first sigma is large (4096), not infinite."""
        alphas = self.alphas_cumprod.clamp(min=2**-24)
        table = ((1 - alphas) / alphas) ** 0.5
        return torch.cat([table[self.timesteps(n)], torch.zeros(1)])

    # -- what the UNet predicts ----------------------------------------------------------------

    def denoised(self, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The clean estimate from the UNet's output at x = x0 + sigma eps (sigma space; Euler)."""
        if self.prediction_type == "v_prediction":
            return output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return x - sigma * output

    def x0_and_eps(
        self, output: torch.Tensor, x: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean estimate and the noise from the UNet's output at x = sqrt(a) x0 + sqrt(1 - a)
        eps (a = alpha_bar; DDIM and DDPM). From v this holds at a = 0 too."""
        if self.prediction_type == "v_prediction":
            return a**0.5 * x - (1 - a) ** 0.5 * output, a**0.5 * output + (1 - a) ** 0.5 * x
        return (x - (1 - a) ** 0.5 * output) / a**0.5, output


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose sqrt(alpha_bar) is shifted and scaled to end at exactly 0 while keeping its first
    value: the last timestep is pure noise (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1; in betas, as diffusers computes it, for the same bits).
    """
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    alphas_bar = ((root - last) * (first / (first - last))) ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas
