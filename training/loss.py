"""The training loss of SDXL, as the papers write it: `training_loss` draws a sample's latent,
timestep and noise, `noised_loss` compares the UNet's prediction with its target.

    x0 ~ q(x0 | image)                the VAE posterior (its moments come from the batch)
    t ~ U{0, ..., T-1} (or a part of it, or logit-normal),  eps ~ N(0, I)
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = w(t) * mean over pixels of  mask * l(unet(x_t, t, text, size), target)
    target = eps (epsilon prediction) or sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v-prediction)

Each option is one `if` below. Every random number comes from the sample's seed (training/noise.py),
drawn on the device, so a sample's loss does not depend on its batch, and the function reads
nothing back to the host: a Python `if` on an option is settled when a CUDA graph is captured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cli.choices import LOSS_TYPES
from sdxl.device import Precision
from sdxl.diffusion import NoiseSchedule
from sdxl.vae import SDXLVAE
from training import noise
from training.specs import LossSpec


def training_loss(
    model: torch.nn.Module,
    vae: SDXLVAE,
    schedule: NoiseSchedule,
    spec: LossSpec,
    precision: Precision,
    moments: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    seeds: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Per-sample loss (B,) of one micro-batch: VAE moments (B, 8, h, w), text context and pooled
    embedding, time ids (B, 6), per-sample seeds (B,), loss masks (B, 1, h, w)."""
    latent_shape = (moments.shape[1] // 2, *moments.shape[2:])  # (4, h, w)
    x0 = vae.sample(moments, noise.randn(seeds, noise.POSTERIOR, latent_shape))
    t = noise.timesteps(
        seeds,
        spec.min_timestep,
        spec.max_timestep or schedule.num_train_timesteps,
        spec.timestep_sampling,
        spec.logit_mean,
        spec.logit_std,
    )
    eps = noise.randn(seeds, noise.NOISE, latent_shape)
    if spec.noise_offset:  # Guttenberg 2023: lets the model learn overall brightness
        eps = eps + spec.noise_offset * noise.randn(seeds, noise.OFFSET, (latent_shape[0], 1, 1))
    if spec.multires_iterations:  # Whitaker 2023: pyramid noise
        eps = noise.pyramid(eps, seeds, spec.multires_iterations, spec.multires_discount)
    eps_in = eps  # the noise of the UNet's input; the target keeps eps
    if spec.ip_noise_gamma:  # input perturbation (Ning et al. 2023)
        eps_in = eps + spec.ip_noise_gamma * noise.randn(seeds, noise.PERTURBATION, latent_shape)
    return noised_loss(
        model, schedule, spec, precision, x0, context, pooled, time_ids, t, eps, eps_in, mask
    )


def noised_loss(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    spec: LossSpec,
    precision: Precision,
    x0: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    eps_in: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Per-sample loss (B,) at given timesteps and noise: the UNet sees x0 noised with `eps_in`,
    its target is built from `eps` (validation passes the same fixed noise as both)."""
    x_t = schedule.add_noise(x0, eps_in, t)
    dt = precision.compute_dtype
    with precision.autocast():
        cond = {"text_embeds": pooled.to(dt), "time_ids": time_ids.to(dt)}
        pred = model(x_t.to(dt), t, context.to(dt), cond)
    target = schedule.target(x0, eps, t)
    per_element = elementwise_loss(spec.loss_type, spec.huber_c, pred.float(), target.float())
    loss = (per_element * mask).mean(dim=(1, 2, 3))
    weight = torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if spec.snr_gamma is not None:  # min-SNR-gamma (Hang et al. 2023)
        weight = min_snr_weight(schedule, spec.snr_gamma, t)
    if spec.debiased:  # debiased estimation (Yu et al. 2024)
        weight = weight * debiased_weight(schedule, t)
    return loss * weight


def elementwise_loss(
    kind: str, huber_c: float, pred: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The loss at each latent element: l2, the squared error; huber, 2c (sqrt(d^2 + c^2) - c),
    the pseudo-Huber loss, robust to outliers (Charbonnier et al. 1997; kohya's --loss_type); and
    smooth_l1, the same divided by c."""
    if kind == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if kind == "huber":
        return 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    if kind == "smooth_l1":
        return 2.0 * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    raise ValueError(f"unknown loss type {kind!r}; choose one of {LOSS_TYPES}")


def min_snr_weight(schedule: NoiseSchedule, gamma: float, t: torch.Tensor) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction."""
    offset = 0.0 if schedule.prediction_type == "epsilon" else 1.0
    snr = schedule.snr(t)
    # The floor keeps a zero-terminal-SNR schedule's last timestep (SNR 0) at weight 0, not 0/0.
    return torch.clamp(snr, max=gamma) / (snr + offset).clamp(min=1e-12)


def debiased_weight(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """Debiased estimation loss weights, 1 / sqrt(SNR) with SNR capped at 1000 (Yu et al. 2024,
    "Debias the Training of Diffusion Models"; the cap as kohya's)."""
    return 1 / schedule.snr(t).clamp(min=1e-12, max=1000) ** 0.5
