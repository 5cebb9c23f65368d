"""The training loop: one optimizer step (`train_step`), one epoch (`train_epoch`), and a validation
loss at fixed timesteps and noise (`validate`).

Everything that depends on options (precision, loss weighting, noise offset, EMA, accumulation) is
resolved into a `Trainer` before the loop starts, so the step itself has no option branches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdxl.diffusion import NoiseSchedule
from sdxl.errors import UserError
from sdxl.text_encoders import SDXLTextEncoder
from sdxl.vae import SDXLVAE
from training.precision_util import Precision

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]  # pixels (B,3,H,W), time ids (B,6), captions


class TrainingError(UserError):
    """The run cannot continue (e.g. the loss became NaN); nothing broken is written."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # batches of the current epoch already consumed
    smoothed_loss: float | None = None
    best_loss: float = float("inf")


@dataclass
class Trainer:
    """The models and every resolved option the loop needs."""

    unet: torch.nn.Module
    text_encoder: SDXLTextEncoder
    vae: SDXLVAE
    schedule: NoiseSchedule
    precision: Precision
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    device: torch.device
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    loss_weight: Callable[[torch.Tensor], torch.Tensor] = field(
        default=lambda t: torch.ones_like(t, dtype=torch.float32)
    )
    make_noise: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = field(
        default=lambda x, g: torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    )
    sample_timesteps: Callable[[int, torch.Generator], torch.Tensor] | None = (
        None  # default: uniform over all T
    )
    after_step: Callable[[], None] = field(default=lambda: None)  # e.g. the EMA update

    def __post_init__(self) -> None:
        if self.sample_timesteps is None:
            T, device = self.schedule.num_train_timesteps, self.device
            self.sample_timesteps = lambda n, g: torch.randint(
                0, T, (n,), generator=g, device=device
            )


# ---------------------------------------------------------------------------------------------
# Loss options, resolved once
# ---------------------------------------------------------------------------------------------


def min_snr_weight(
    schedule: NoiseSchedule, gamma: float | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction; all ones without gamma."""
    if gamma is None:
        return lambda t: torch.ones(t.shape, dtype=torch.float32, device=t.device)
    offset = 0.0 if schedule.prediction_type == "epsilon" else 1.0

    def weight(t: torch.Tensor) -> torch.Tensor:
        snr = schedule.snr(t)
        return torch.clamp(snr, max=gamma) / (snr + offset)

    return weight


def offset_noise(strength: float) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Gaussian noise plus `strength` times one extra Gaussian per sample and channel (constant over
    the image), which lets the model learn overall brightness shifts."""

    def noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        eps = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return eps + strength * torch.randn(
            x.shape[0], x.shape[1], 1, 1, generator=g, device=x.device, dtype=x.dtype
        )

    if strength == 0:
        return lambda x, g: torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    return noise


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------


def encode_batch(
    tr: Trainer, batch: Batch, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels -> latents (a sample of the VAE posterior, fp32) and captions -> (context, pooled)."""
    pixels, time_ids, captions = batch
    latents = tr.vae.encode(pixels.to(tr.device), g)
    context, pooled = tr.text_encoder.encode(captions)
    return latents, context, pooled, time_ids.to(tr.device)


def diffusion_loss(
    tr: Trainer,
    latents: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per-sample weighted MSE between the UNet's prediction and the target at timesteps t."""
    noisy = tr.schedule.add_noise(latents, noise, t)
    dt = tr.precision.compute_dtype
    with tr.precision.autocast():
        pred = tr.unet(
            noisy.to(dt),
            t,
            context.to(dt),
            {"text_embeds": pooled.to(dt), "time_ids": time_ids.to(dt)},
        )
    target = tr.schedule.target(latents, noise, t)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return per_sample * tr.loss_weight(t)


def train_step(tr: Trainer, micro_batches: list[Batch]) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches. Returns (loss, gradient norm)."""
    total = 0.0
    for batch in micro_batches:
        latents, context, pooled, time_ids = encode_batch(tr, batch, tr.generator)
        noise = tr.make_noise(latents, tr.generator)
        t = torch.randint(
            0,
            tr.schedule.num_train_timesteps,
            (latents.shape[0],),
            generator=tr.generator,
            device=tr.device,
        )
        loss = diffusion_loss(tr, latents, context, pooled, time_ids, t, noise).mean() / len(
            micro_batches
        )
        value = loss.item()
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss is {value}; stopping without saving (try a lower --learning_rate, or --precision bf16/fp32)"
            )
        tr.scaler.scale(loss).backward()
        total += value
    tr.scaler.unscale_(tr.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.params, tr.max_grad_norm)
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.lr_scheduler.step()
    tr.after_step()
    return total, float(grad_norm)


def train_epoch(
    tr: Trainer,
    state: TrainState,
    batches: Iterator[Batch],
    max_steps: int,
    on_step: Callable[[TrainState, float, float], None],
) -> None:
    """Run optimizer steps until the epoch's batches or `max_steps` run out. `on_step(state, loss,
    grad_norm)` is called after every step (logging, checkpoints)."""
    while state.step < max_steps:
        micro = [b for _, b in zip(range(tr.grad_accum), batches)]
        if (
            len(micro) < tr.grad_accum
        ):  # an incomplete accumulation at the end of an epoch is dropped
            return
        loss, grad_norm = train_step(tr, micro)
        state.step += 1
        state.position += len(micro)
        state.smoothed_loss = (
            loss if state.smoothed_loss is None else 0.9 * state.smoothed_loss + 0.1 * loss
        )
        on_step(state, loss, grad_norm)


@torch.no_grad()
def validate(
    tr: Trainer,
    batches: list[Batch],
    timesteps: tuple[int, ...] = (100, 300, 500, 700, 900),
    seed: int = 0,
) -> float:
    """Mean loss over the batches at fixed timesteps and fixed noise (seeded), so that numbers are
    comparable between steps and between runs."""
    g = torch.Generator(tr.device).manual_seed(seed)
    losses = []
    for batch in batches:
        # its own generator: validation must not consume the training RNG
        latents, context, pooled, time_ids = encode_batch(tr, batch, g)
        for step in timesteps:
            t = torch.full((latents.shape[0],), step, device=tr.device, dtype=torch.long)
            noise = torch.randn(latents.shape, generator=g, device=tr.device, dtype=latents.dtype)
            losses.append(
                diffusion_loss(tr, latents, context, pooled, time_ids, t, noise).mean().item()
            )
    return sum(losses) / max(1, len(losses))
