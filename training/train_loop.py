"""One optimizer step (`train_step`) and a validation loss at fixed timesteps and noise (`validate`).

Everything that depends on options (precision, loss weighting, noise offset, EMA, cached encoders,
data parallelism, accumulation) is resolved into a `Trainer` by `build_trainer` before the loop
starts, so the step itself has no option branches.

A step has a host side and a device side. `prepare` runs the encoders (or reads the caches) and
moves a micro-batch to the device; `micro_step` (forward and backward of one micro-batch) and
`optimizer_update` then only launch work on the device: every random number is drawn there from the
samples' seeds (training/noise.py), and nothing is read back. The loss and the gradient norm come
back as device tensors; the loop reads them once per optimizer step, when it logs.

Because the device side reads nothing back, it can be captured: on CUDA (`--cuda_graph auto`)
`micro_step` and `optimizer_update` each run as replayed CUDA graphs (sdxl/capture.py), one per
input shape, and the learning rate is a device tensor that the schedule fills between replays.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sampling.inference import Pipeline, generate_unique_batch, image_grid
from sdxl.capture import Graphed, compile_blocks
from sdxl.diffusion import NoiseSchedule
from sdxl.errors import UserError
from sdxl.files import atomic_write
from sdxl.frozen import store_in_fp8
from sdxl.lora import (
    apply_lora_to_text_encoders,
    apply_lora_to_unet,
    components,
    describe_adapters,
)
from sdxl.pretrained import SDXLParts
from sdxl.unet import UNet2DConditionModel
from sdxl.vae import SDXLVAE
from training import noise
from training.cache import ImageEncoder, TextEncoder
from training.data_loader import Batch, sample_seed
from training.distributed import Distributed
from training.ema import EMA
from training.optimizers import build_optimizer, tensor_learning_rates
from training.precision_util import Precision


class TrainingError(UserError):
    """The run cannot continue (e.g. the loss became NaN); nothing broken is written."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # samples of the current epoch's order already consumed (by all processes)
    smoothed_loss: float | None = None
    best_loss: float = float("inf")

    def advance(self, loss: float, epoch: int, position: int) -> None:
        """Count one optimizer step that left the run at (epoch, position)."""
        self.step, self.epoch, self.position = self.step + 1, epoch, position
        s = self.smoothed_loss
        self.smoothed_loss = loss if s is None else 0.9 * s + 0.1 * loss


@dataclass
class Trainer:
    """The models and every resolved option the step needs."""

    unet: UNet2DConditionModel
    models: torch.nn.ModuleDict  # what is trained: the UNet, and the text encoders with their LoRA
    model: torch.nn.Module  # what the forward runs: the UNet, or its DDP wrapper
    vae: SDXLVAE
    schedule: NoiseSchedule
    precision: Precision
    device: torch.device
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: EMA | None
    encode_images: ImageEncoder
    encode_text: TextEncoder
    loss_weight: Callable[[torch.Tensor], torch.Tensor]  # per-sample weights of timesteps t
    elementwise_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pred, target)
    make_noise: noise.NoiseFn
    perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (seeds, noise) -> input noise
    sample_timesteps: Callable[[torch.Tensor], torch.Tensor]
    seed: int
    max_grad_norm: float
    prior_loss_weight: float  # of the regularisation images' loss
    no_sync: Callable[[], contextlib.AbstractContextManager]  # DDP: skip the gradient sync
    average_text_gradients: Callable[[], None]  # across processes (DDP has only the UNet's)
    # How the device side runs: eagerly (gradients freed between steps), or through
    # sdxl/capture.py's Graphed (see `use_graphs`).
    grads_to_none: bool = True
    run_micro_step: Callable[..., torch.Tensor] = field(init=False)  # `micro_step`, or its graphs
    run_update: Callable[[], torch.Tensor] = field(init=False)  # `optimizer_update`, or its graph

    def __post_init__(self) -> None:
        self.run_micro_step = functools.partial(micro_step, self)
        self.run_update = functools.partial(optimizer_update, self)


def build_trainer(
    args: argparse.Namespace,
    parts: SDXLParts,
    encode_images: ImageEncoder,
    encode_text: TextEncoder,
    precision: Precision,
    dist: Distributed,
    max_steps: int,
) -> Trainer:
    """Make `parts.unet` trainable as `args` says (LoRA adapters or the whole UNet, gradient
    checkpointing) and put together everything a step needs. `args` are train_sdxl.py's options; the
    script, the bench and the tests all build their trainer here."""
    unet = parts.unet
    models = make_trainable(args, parts)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(memory_format=torch.channels_last)  # the layout fast convolution kernels want
    trained_models = torch.nn.ModuleDict(models)
    trained = [(n, p) for n, p in trained_models.named_parameters() if p.requires_grad]
    params = [p for _, p in trained]
    # One parameter group per model: the text encoders' own learning rates (--text_encoder_lr).
    text_lrs = args.text_encoder_lr or [args.learning_rate]
    groups = [
        {"params": [p for n, p in trained if n.startswith(f"{component}.")], "lr": lr}
        for component, lr in zip(models, [args.learning_rate, text_lrs[0], text_lrs[-1]])
    ]
    optimizer, lr_scheduler = build_optimizer([g for g in groups if g["params"]], args, max_steps)
    tensor_learning_rates(optimizer, dist.device)  # what a graph needs; eager steps alike
    if dist.main and args.use_lora:
        print(describe_adapters(models))
    schedule = parts.schedule.to(dist.device)  # its table beside the UNet: no copy per step
    base_noise = noise.make_noise(args.noise_offset)
    snr_weight = min_snr_weight(schedule, args.snr_gamma)
    debias = debiased_weight(schedule) if args.debiased_estimation_loss else None
    if args.compile:  # last: the compiled blocks include the adapters and the checkpointing
        compile_blocks(unet, args.compile_backend)
    model = dist.wrap(unet)
    tr = Trainer(
        unet=unet,
        models=trained_models,
        model=model,
        vae=parts.vae,
        schedule=schedule,
        precision=precision,
        device=dist.device,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        scaler=precision.grad_scaler(),
        ema=EMA(trained, args.ema_decay) if args.use_ema else None,
        encode_images=encode_images,
        encode_text=encode_text,
        loss_weight=snr_weight if debias is None else lambda t: snr_weight(t) * debias(t),
        elementwise_loss=elementwise_loss(args.loss_type, args.huber_c),
        make_noise=noise.multires_noise(
            base_noise, args.multires_noise_iterations, args.multires_noise_discount
        ),
        perturb=noise.input_perturbation(args.ip_noise_gamma),
        sample_timesteps=noise.uniform_timesteps(schedule.num_train_timesteps),
        seed=args.seed,
        max_grad_norm=args.max_grad_norm,
        prior_loss_weight=args.prior_loss_weight,
        no_sync=getattr(model, "no_sync", contextlib.nullcontext),
        average_text_gradients=dist.averager(
            [p for n, p in trained if n.startswith("text_encoder")]
        ),
    )
    capture = args.cuda_graph == "auto" and dist.device.type == "cuda"
    obstacle = cuda_graph_obstacle(args, dist) if capture else None
    if obstacle is not None and dist.main:
        print(f"--cuda_graph auto: the training step runs eagerly, since {obstacle}")
    if capture and obstacle is None:
        use_graphs(tr, capture=True)
    elif args.compile:  # eager steps, but the first run of each shape (the compiling) is reported
        tr.run_micro_step = Graphed(tr.run_micro_step, capture=False, label="--compile")
    return tr


def cuda_graph_obstacle(args: argparse.Namespace, dist: Distributed) -> str | None:
    """Why the training step cannot be replayed as CUDA graphs under these options (None: it can)."""
    if dist.world > 1:
        return "DistributedDataParallel's gradient all-reduce is not captured here (torchrun)"
    if args.precision == "fp16":
        return "fp16's gradient scaler reads its overflow check back every step (use bf16)"
    if args.train_text_encoder:
        return "--train_text_encoder trains through the text encoders, which run outside the step"
    if args.optimizer != "adamw":
        return f"--optimizer {args.optimizer} cannot step inside a graph (torch's adamw can)"
    return None


def use_graphs(tr: Trainer, capture: bool) -> None:
    """Run the step's device side as CUDA graphs (sdxl/capture.py): the micro-batch step, one graph
    per input shape, and the optimizer update (its learning rate a tensor: `tensor_learning_rates`).
    A graph reads and writes fixed tensors, so the gradients stay allocated (zeroed, not freed).
    With capture=False the same path runs eagerly: the CPU tests use that."""
    for p in tr.params:
        p.grad = torch.zeros_like(p)
    tr.grads_to_none = False
    tr.run_micro_step = Graphed(tr.run_micro_step, capture, "--cuda_graph training step")
    tr.run_update = Graphed(tr.run_update, capture)


def make_trainable(args: argparse.Namespace, parts: SDXLParts) -> dict[str, torch.nn.Module]:
    """Adapters as the options say (or the whole UNet trainable); returns the trained models by
    component name."""
    if not args.use_lora:
        return components(parts.unet.requires_grad_(True))
    kind = "dora" if args.use_dora else "lora"
    apply_lora_to_unet(
        parts.unet,
        args.lora_rank,
        args.lora_alpha,
        args.lora_target_mode,
        args.lora_dropout,
        kind=kind,
        conv_rank=args.conv_rank,
        conv_alpha=args.conv_alpha,
        block_ranks=args.block_dims,
        block_alphas=args.block_alphas,
    )
    if args.fp8_base:  # after the adapters, which stay in fp32 (sdxl/frozen.py)
        store_in_fp8(parts.unet)
    if not args.train_text_encoder:
        return components(parts.unet)
    rank, alpha, dropout = args.lora_rank, args.lora_alpha, args.lora_dropout
    apply_lora_to_text_encoders(parts.text_encoder, rank, alpha, dropout, kind)
    return components(parts.unet, parts.text_encoder)


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
        # The floor keeps a zero-terminal-SNR schedule's last timestep (SNR 0) at weight 0, not 0/0.
        return torch.clamp(snr, max=gamma) / (snr + offset).clamp(min=1e-12)

    return weight


def debiased_weight(schedule: NoiseSchedule) -> Callable[[torch.Tensor], torch.Tensor]:
    """Debiased estimation loss weights, 1 / sqrt(SNR) with SNR capped at 1000 (Yu et al. 2024,
    "Debias the Training of Diffusion Models"; the cap as kohya's)."""
    return lambda t: 1 / schedule.snr(t).clamp(min=1e-12, max=1000) ** 0.5


def elementwise_loss(
    kind: str, huber_c: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss at each latent element: l2 (squared error); huber, 2c (sqrt(d^2 + c^2) - c), the
    pseudo-Huber loss, robust to outliers (Charbonnier et al. 1997; as kohya's --loss_type); and
    smooth_l1, the same divided by c."""
    if kind == "l2":
        return lambda pred, target: F.mse_loss(pred, target, reduction="none")
    scale = 2 * huber_c if kind == "huber" else 2.0
    return lambda pred, target: scale * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------

# One micro-batch on the device: VAE moments (B, 8, h, w), context (B, 77, 2048), pooled (B, 1280),
# time ids (B, 6), per-sample seeds (B,), loss masks (B, 1, h, w).
StepInputs = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]


def prepare(tr: Trainer, batch: Batch) -> StepInputs:
    """The host side of a micro-batch: encode (or read the caches) and move it to the device. Each
    sample's seed comes from the run's seed and its sample id, so its random draws do not depend on
    the batching."""
    images, time_ids, captions, ids, masks = batch
    moments = tr.encode_images(images.to(tr.device))
    context, pooled = tr.encode_text(captions)
    seeds = torch.tensor([sample_seed(tr.seed, int(i)) for i in ids], dtype=torch.int64)
    return (
        moments,
        context,
        pooled,
        time_ids.to(tr.device),
        seeds.to(tr.device),
        masks.to(tr.device),
    )


def diffusion_loss(
    tr: Trainer,
    model: torch.nn.Module,
    latents: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    input_noise: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Per-sample loss between the UNet's prediction and the target at timesteps t: the element-wise
    loss, times the mask (B, 1, h, w), averaged, times the timestep's weight. The UNet sees the
    latents noised with `input_noise`, the target is built from `noise`."""
    noisy = tr.schedule.add_noise(latents, input_noise, t)
    dt = tr.precision.compute_dtype
    with tr.precision.autocast():
        pred = model(
            noisy.to(dt),
            t,
            context.to(dt),
            {"text_embeds": pooled.to(dt), "time_ids": time_ids.to(dt)},
        )
    target = tr.schedule.target(latents, noise, t)
    per_element = tr.elementwise_loss(pred.float(), target.float()) * mask
    return per_element.mean(dim=(1, 2, 3)) * tr.loss_weight(t)


def micro_batch_loss(tr: Trainer, *inputs: torch.Tensor) -> torch.Tensor:
    """The mean loss of one micro-batch (`StepInputs`), with each sample's posterior sample,
    timestep and noise drawn from its own seed."""
    moments, context, pooled, time_ids, seeds, mask = inputs
    eps = noise.randn(seeds, noise.POSTERIOR, (moments.shape[1] // 2, *moments.shape[2:]))
    latents = tr.vae.sample(moments, eps)
    t = tr.sample_timesteps(seeds)
    n = tr.make_noise(seeds, latents.shape)
    n_in = tr.perturb(seeds, n)
    return diffusion_loss(tr, tr.model, latents, context, pooled, time_ids, t, n, n_in, mask).mean()


def micro_step(tr: Trainer, *inputs: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one micro-batch: `StepInputs`, then `scale` = (count, weight), two
    numbers (a tensor, so that a graph takes them as input). The gradients of weight * loss / count
    are added to the parameters'. Returns loss / count, detached. Device work only."""
    *batch, scale = inputs
    loss = micro_batch_loss(tr, *batch) / scale[0]
    tr.scaler.scale(loss * scale[1]).backward()
    return loss.detach()


def optimizer_update(tr: Trainer) -> torch.Tensor:
    """Clip, step, clear the gradients, update the EMA. Returns the gradient norm before clipping
    (a device tensor). Device work only: the LR schedule advances outside (`train_step`)."""
    tr.average_text_gradients()
    tr.scaler.unscale_(tr.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.params, tr.max_grad_norm)
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.optimizer.zero_grad(set_to_none=tr.grads_to_none)
    if tr.ema is not None:
        tr.ema.update()
    return grad_norm


def train_step(
    tr: Trainer, micro_batches: list[Batch], reg_batches: list[Batch]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over `grad_accum` micro-batches, each paired with a regularisation
    micro-batch when there are regularisation images (DreamBooth's prior preservation: the loss is
    the training loss plus --prior_loss_weight times theirs). Returns (training loss,
    regularisation loss, gradient norm) as device tensors: reading them is the caller's one sync
    with the device."""
    total, reg_total = torch.zeros((), device=tr.device), torch.zeros((), device=tr.device)
    # Each forward is followed by its backward (data parallelism allows no other order); with it,
    # gradients are averaged across processes on the step's last backward only.
    parts = [(batch, 1.0) for batch in micro_batches]
    parts += [(batch, tr.prior_loss_weight) for batch in reg_batches]
    # micro_step's (count, weight): one small tensor per weight, not one per micro-batch.
    weights = {weight for _, weight in parts}
    scales = {w: torch.tensor([len(micro_batches), w], device=tr.device) for w in weights}
    for i, (batch, weight) in enumerate(parts):
        sync = contextlib.nullcontext() if i == len(parts) - 1 else tr.no_sync()
        with sync:
            loss = tr.run_micro_step(*prepare(tr, batch), scales[weight])
        if i < len(micro_batches):
            total += loss
        else:
            reg_total += loss
    grad_norm = tr.run_update()
    tr.lr_scheduler.step()  # on the host; it fills a graph's learning-rate tensors in place
    return total, reg_total, grad_norm


@torch.no_grad()
def validate(
    tr: Trainer, batches: list[Batch], timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
) -> float:
    """Mean loss over the batches at fixed timesteps and fixed noise (seeded by the validation
    sample's index), so that numbers are comparable between steps and between runs. Runs the plain
    UNet (no data-parallel sync)."""
    losses = []
    for batch in batches:
        moments, context, pooled, time_ids, seeds, mask = prepare(tr, batch)
        shape = (moments.shape[1] // 2, *moments.shape[2:])
        latents = tr.vae.sample(moments, noise.randn(seeds, noise.VALIDATION, shape))
        for k, step in enumerate(timesteps):
            t = torch.full((latents.shape[0],), step, device=tr.device, dtype=torch.long)
            n = noise.randn(seeds, noise.VALIDATION + 1 + k, shape)
            loss = diffusion_loss(tr, tr.unet, latents, context, pooled, time_ids, t, n, n, mask)
            losses.append(loss.mean())
    return float(torch.stack(losses).mean()) if losses else 0.0


@contextlib.contextmanager
def borrowed(device: torch.device, *modules: torch.nn.Module) -> Iterator[None]:
    """The modules on `device` for the duration, then back where they were: the encoders that
    caches keep off the device, for validation images."""
    homes = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


def validation_images(
    tr: Trainer, parts: SDXLParts, prompts: list[str], args: argparse.Namespace, path: Path
) -> None:
    """Fixed-seed images of the validation prompts (prompt i from --seed + i) at --image_size, as
    one PNG grid, with the EMA weights if the run keeps them."""
    if tr.ema is not None:
        tr.ema.swap()
    dtype = tr.precision.compute_dtype
    pipe = Pipeline(tr.unet, parts.text_encoder, parts.vae, parts.schedule, tr.device, dtype)
    seeds = [args.seed + i for i in range(len(prompts))]
    size, steps = args.image_size, args.validation_sampling_steps
    with borrowed(tr.device, parts.text_encoder, parts.vae):
        images = generate_unique_batch(pipe, prompts, seeds, size, size, steps)
    if tr.ema is not None:
        tr.ema.swap()
    with atomic_write(path) as tmp:
        image_grid(images).save(tmp, format="PNG")
