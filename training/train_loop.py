"""The training loop: one optimizer step (`train_step`), one epoch (`train_epoch`), and a validation
loss at fixed timesteps and noise (`validate`).

Everything that depends on options (precision, loss weighting, noise offset, EMA, cached encoders,
data parallelism, accumulation) is resolved into a `Trainer` before the loop starts, so the step
itself has no option branches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdxl.diffusion import NoiseSchedule, randn
from sdxl.errors import UserError
from sdxl.vae import SDXLVAE
from training.data_loader import sample_seed
from training.precision_util import Precision

# pixels (B,3,H,W) or cached VAE moments (B,8,h,w), time ids (B,6), captions, sample ids (B,)
Batch = tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]
Generators = list[torch.Generator]


class TrainingError(UserError):
    """The run cannot continue (e.g. the loss became NaN); nothing broken is written."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # samples of the current epoch's order already consumed (by all processes)
    smoothed_loss: float | None = None
    best_loss: float = float("inf")


def _uniform_noise(x: torch.Tensor, g: Generators) -> torch.Tensor:
    return randn(x.shape, g, x.device, x.dtype)


@dataclass
class Trainer:
    """The models and every resolved option the loop needs."""

    unet: torch.nn.Module
    vae: SDXLVAE
    schedule: NoiseSchedule
    precision: Precision
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    # images (or cached moments) -> VAE posterior moments (B, 8, h, w)
    encode_images: Callable[[torch.Tensor], torch.Tensor]
    # captions -> (context (B, 77, 2048), pooled (B, 1280))
    encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
    seed: int = 0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    model: torch.nn.Module | None = None  # what the forward runs: the UNet, or its DDP wrapper
    no_sync: Callable[[], contextlib.AbstractContextManager] = (
        contextlib.nullcontext
    )  # DDP: skip a sync
    loss_weight: Callable[[torch.Tensor], torch.Tensor] = field(
        default=lambda t: torch.ones(t.shape)
    )
    make_noise: Callable[[torch.Tensor, Generators], torch.Tensor] = _uniform_noise
    sample_timesteps: Callable[[Generators], torch.Tensor] | None = (
        None  # default: uniform over all T
    )
    after_step: Callable[[], None] = field(default=lambda: None)  # e.g. the EMA update

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = self.unet
        if self.sample_timesteps is None:
            T, device = self.schedule.num_train_timesteps, self.device
            self.sample_timesteps = lambda gens: torch.cat(
                [torch.randint(0, T, (1,), generator=g, device=device) for g in gens]
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


def offset_noise(strength: float) -> Callable[[torch.Tensor, Generators], torch.Tensor]:
    """Gaussian noise plus `strength` times one extra Gaussian per sample and channel (constant over
    the image), which lets the model learn overall brightness shifts."""
    if strength == 0:
        return _uniform_noise

    def noise(x: torch.Tensor, g: Generators) -> torch.Tensor:
        offset = randn((x.shape[0], x.shape[1], 1, 1), g, x.device, x.dtype)
        return randn(x.shape, g, x.device, x.dtype) + strength * offset

    return noise


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------


def diffusion_loss(
    tr: Trainer,
    model: torch.nn.Module,
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
        pred = model(
            noisy.to(dt),
            t,
            context.to(dt),
            {"text_embeds": pooled.to(dt), "time_ids": time_ids.to(dt)},
        )
    target = tr.schedule.target(latents, noise, t)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return per_sample * tr.loss_weight(t).to(per_sample.device)


def micro_batch_loss(tr: Trainer, batch: Batch) -> torch.Tensor:
    """The mean loss of one micro-batch. Each sample's posterior sample, timestep and noise come
    from its own generator (seeded by its sample id), so they do not depend on the batching."""
    images, time_ids, captions, ids = batch
    gens = [torch.Generator(tr.device).manual_seed(sample_seed(tr.seed, int(i))) for i in ids]
    latents = tr.vae.sample(tr.encode_images(images.to(tr.device)), gens)
    context, pooled = tr.encode_text(captions)
    t = tr.sample_timesteps(gens)  # type: ignore[misc]
    noise = tr.make_noise(latents, gens)
    return diffusion_loss(tr, tr.model, latents, context, pooled, time_ids.to(tr.device), t, noise).mean()  # type: ignore[arg-type]


def train_step(tr: Trainer, micro_batches: list[Batch]) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches. Returns (loss, gradient norm)."""
    total = 0.0
    for i, batch in enumerate(micro_batches):
        # With data parallelism, gradients are averaged across processes on the last micro-batch only.
        sync = contextlib.nullcontext() if i == len(micro_batches) - 1 else tr.no_sync()
        with sync:
            loss = micro_batch_loss(tr, batch) / len(micro_batches)
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
    samples_per_step: int,
    max_steps: int,
    on_step: Callable[[TrainState, float, float], None],
) -> None:
    """Run optimizer steps until the epoch's batches or `max_steps` run out. `samples_per_step` is
    the global batch (all processes, all micro-batches). `on_step(state, loss, grad_norm)` is called
    after every step (logging, checkpoints)."""
    while state.step < max_steps:
        micro = [b for _, b in zip(range(tr.grad_accum), batches)]
        if (
            len(micro) < tr.grad_accum
        ):  # an incomplete accumulation at the end of an epoch is dropped
            return
        loss, grad_norm = train_step(tr, micro)
        state.step += 1
        state.position += samples_per_step
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
    comparable between steps and between runs. Runs the plain UNet (no data-parallel sync)."""
    g = [torch.Generator(tr.device).manual_seed(seed)]
    losses = []
    for images, time_ids, captions, _ in batches:
        latents = tr.vae.sample(tr.encode_images(images.to(tr.device)), g * images.shape[0])
        context, pooled = tr.encode_text(captions)
        for step in timesteps:
            t = torch.full((latents.shape[0],), step, device=tr.device, dtype=torch.long)
            noise = randn(latents.shape, g * latents.shape[0], tr.device, latents.dtype)
            loss = diffusion_loss(
                tr, tr.unet, latents, context, pooled, time_ids.to(tr.device), t, noise
            )
            losses.append(loss.mean().item())
    return sum(losses) / max(1, len(losses))
