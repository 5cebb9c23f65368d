"""One optimizer step (`train_step`) and a validation loss at fixed timesteps and noise (`validate`).

`build_trainer` makes the model trainable as the specs say and chooses, once, how the step's two
device functions run: `micro_step` (forward, loss and backward of one micro-batch) and
`optimizer_update` (clip, step, EMA). They run eagerly; or, on CUDA, as replayed CUDA graphs
(sdxl/capture.py), one per input shape, with the learning rate a device tensor that the schedule
fills between replays; and with --compile, over compiled blocks. The loss itself is
training/loss.py's.

A step has a host side and a device side. `prepare` runs the encoders (or reads the caches) and
moves a micro-batch to the device; the two device functions then only launch work on the device:
every random number is drawn there from the samples' seeds (training/noise.py), and nothing is read
back. The loss and the gradient norm come back as device tensors; the loop reads them once per
optimizer step, when it logs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sampling.inference import EncodedPrompts, Pipeline, generate_unique_batch
from sdxl.capture import Graphed, compile_blocks
from sdxl.device import Distributed, Precision
from sdxl.diffusion import NoiseSchedule
from sdxl.errors import UserError
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
from training.cache import ImageEncoder, TextEncoder, encoders
from training.data_loader import Batch, sample_seed
from training.ema import EMA
from training.loss import noised_loss, training_loss
from training.optimizers import build_optimizer, tensor_learning_rates
from training.sharded import full_tensor, gradients_kept, is_sharded, shard_unet
from training.specs import AdapterSpec, LossSpec, TrainSpecs


class TrainingError(UserError):
    """The run cannot continue (e.g. the loss became NaN); nothing broken is written."""


@dataclass
class TrainState:
    """Where the run stands: the loop's books, which the checkpoints record."""

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

    def improves(self, loss: float | None) -> bool:
        """Whether `loss` is the lowest tracked so far; if so it becomes the best."""
        if loss is None or not loss < self.best_loss:
            return False
        self.best_loss = loss
        return True


@dataclass(frozen=True)
class DeviceStep:
    """What the step's device side reads: the models, the loss and the optimizer."""

    unet: UNet2DConditionModel
    model: torch.nn.Module  # what the forward runs: the UNet, or its DDP wrapper
    vae: SDXLVAE
    # images -> VAE moments: the VAE's encoder, or with cached latents the moments as they come.
    # Inside the step, so that a CUDA graph's memory serves the encoder and the UNet in turn.
    encode_images: ImageEncoder
    schedule: NoiseSchedule
    loss: LossSpec
    precision: Precision
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    max_grad_norm: float
    average_text_gradients: Callable[[], None]  # across processes (DDP has only the UNet's)
    grads_to_none: bool  # eager steps free the gradients; a graph keeps them (zeroed) in place


@dataclass(frozen=True)
class Trainer:
    """The trained models, the two device functions as `build_trainer` chose to run them, and what
    the host side of a step needs."""

    models: torch.nn.ModuleDict  # what is trained: the UNet, and the text encoders with their LoRA
    step: DeviceStep
    micro_step: Callable[..., torch.Tensor]  # `micro_step` over `step`: eager, graphed or compiled
    optimizer_update: Callable[[], torch.Tensor]  # `optimizer_update` over `step`, likewise
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    encode_text: TextEncoder
    no_sync: Callable[[], contextlib.AbstractContextManager]  # DDP, FSDP: skip the gradient sync
    dist: Distributed
    seed: int

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def sharded(self) -> bool:
        """--fsdp: every process holds a share of the weights, so all of them run every forward
        (validation too) and write every checkpoint (training/sharded.py)."""
        return is_sharded(self.step.unet)

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.step.unet

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step.optimizer

    @property
    def ema(self) -> EMA | None:
        return self.step.ema


def build_trainer(
    specs: TrainSpecs,
    parts: SDXLParts,
    encode_images: ImageEncoder,
    encode_text: TextEncoder,
    precision: Precision,
    dist: Distributed,
    max_steps: int,
) -> Trainer:
    """Make `parts.unet` trainable as the specs say (adapters or the whole UNet, gradient
    checkpointing), build its optimizer, and choose how the step runs. The script, the benches and
    the tests all build their trainer here."""
    unet = parts.unet
    # Adapters and fp8 storage while the UNet is on the host: the UNet then arrives in the form it
    # trains in, and a bf16 copy never reaches the device (which would set max_memory_reserved).
    models = torch.nn.ModuleDict(make_trainable(specs.adapter, specs.step.fp8_base, parts))
    if not specs.step.fsdp:  # (sharding moves each unit's shards there itself)
        unet.to(dist.device)
    if specs.step.gradient_checkpointing:
        unet.enable_gradient_checkpointing(specs.step.checkpoint_interval)
    if specs.step.fsdp:  # after the checkpointing: FSDP gathers a unit's weights for its recompute
        shard_unet(unet, precision, dist)  # (contiguous weights only: no channels_last)
    else:
        unet.to(memory_format=torch.channels_last)  # the layout fast convolution kernels want
    trained = [(n, p) for n, p in models.named_parameters() if p.requires_grad]
    if specs.optimizer.fused_backward_pass and dist.world > 1:
        raise UserError("--fused_backward_pass steps each parameter inside the backward pass, "
                        "before DistributedDataParallel averages its gradient: one process only")  # fmt: skip
    per_parameter = specs.step.full_bf16 or specs.optimizer.fused_backward_pass
    optimizer, lr_scheduler = build_optimizer(
        trained,
        list(models),
        specs.optimizer,
        max_steps,
        per_parameter,
        dist.device,
        specs.step.seed,
    )
    tensor_learning_rates(optimizer, dist.device)  # what a graph needs; eager steps alike
    if dist.main and specs.adapter is not None:
        print(describe_adapters(dict(models.items())))
    if specs.step.compile:  # last: the compiled blocks include the adapters and the checkpointing
        compile_blocks(unet, specs.step.compile_backend)
    model = unet if specs.step.fsdp else dist.wrap(unet)
    graphs = use_graphs(specs, dist)
    step = DeviceStep(
        unet=unet,
        model=model,
        vae=parts.vae,
        encode_images=encode_images,
        schedule=parts.schedule.to(dist.device),  # its table beside the UNet: no copy per step
        loss=specs.loss,
        precision=precision,
        params=[p for _, p in trained],
        optimizer=optimizer,
        scaler=precision.grad_scaler(),
        ema=EMA(trained, specs.optimizer.ema_decay) if specs.optimizer.ema_decay else None,
        max_grad_norm=specs.optimizer.max_grad_norm,
        average_text_gradients=dist.averager(
            [p for n, p in trained if n.startswith("text_encoder")]
        ),
        grads_to_none=graphs is None,
    )
    if graphs is not None:  # a graph reads and writes fixed tensors: the gradients stay allocated
        for p in step.params:
            p.grad = torch.zeros_like(p)
    # How the two device functions run: as CUDA graphs, one per input shape (on the CPU the same
    # path uncaptured), or eagerly (with --compile, the first run of each shape, the compiling, told).
    micro: Callable[..., torch.Tensor] = functools.partial(micro_step, step)
    update: Callable[[], torch.Tensor] = functools.partial(optimizer_update, step)
    if graphs is not None:
        micro, update = Graphed(micro, graphs, "--cuda_graph training step"), Graphed(
            update, graphs
        )
    elif specs.step.compile:
        micro = Graphed(micro, capture=False, label="--compile")
    return Trainer(
        models=models,
        step=step,
        micro_step=micro,
        optimizer_update=update,
        lr_scheduler=lr_scheduler,
        encode_text=encode_text,
        no_sync=(
            functools.partial(gradients_kept, unet)
            if specs.step.fsdp
            else getattr(model, "no_sync", contextlib.nullcontext)
        ),
        dist=dist,
        seed=specs.data.seed,
    )


def text_encoder_dtype(adapter: AdapterSpec | None, precision: Precision) -> torch.dtype:
    """Text encoders that train are stored as the UNet is (bf16 on CUDA); frozen ones in fp16."""
    train = adapter is not None and adapter.train_text_encoder
    return precision.unet_dtype if train else precision.text_dtype


def place_and_build(
    specs: TrainSpecs,
    parts: SDXLParts,
    precision: Precision,
    dist: Distributed,
    sets: list,
    max_steps: int,
    prompts: list[str],
    make_encoders: Callable = encoders,
) -> tuple[list, Trainer, EncodedPrompts | None]:
    """From models on the host to a trainer, with on the device only what each phase needs, in
    this order: the VAE's encoder and the text encoders (the caches are built before the UNet
    arrives: encoding full-size images in fp32 is the VAE's peak; the validation prompts are
    encoded then too); an encoder that a cache replaces leaves for good; then the UNet, in the form
    it trains in (`build_trainer`). Returns the data sets as the encoders see them (cached latents,
    if asked), the trainer and the encoded validation prompts. The memory preflight
    (training/preflight.py) runs this same function on the meta device."""
    parts.vae.encode_on(dist.device)  # the decoder stays on the host (`validation_images`)
    parts.text_encoder.to(dist.device)
    with torch.no_grad():
        encoded = EncodedPrompts(parts.text_encoder, prompts, dist.device) if prompts else None
    sets, encode_images, encode_text = make_encoders(parts, sets, specs.data, dist)
    parts.vae.encode_on("cpu" if specs.data.cache_latents else dist.device)
    parts.text_encoder.to("cpu" if specs.data.cache_text_embeddings else dist.device)
    tr = build_trainer(specs, parts, encode_images, encode_text, precision, dist, max_steps)
    return sets, tr, encoded


def use_graphs(specs: TrainSpecs, dist: Distributed) -> bool | None:
    """Whether the step runs as CUDA graphs: True (captured), False (the same path, uncaptured: what
    a CPU can test), or None (eager steps; on CUDA, one printed line says why)."""
    mode = specs.step.cuda_graph
    if mode == "uncaptured":
        return False
    # (meta: the memory preflight's stand-in for a GPU, whose graphs it simulates)
    if mode != "auto" or dist.device.type not in ("cuda", "meta"):
        return None
    obstacle = cuda_graph_obstacle(specs, dist)
    if obstacle is not None and dist.main:
        print(f"--cuda_graph auto: the training step runs eagerly, since {obstacle}")
    return True if obstacle is None else None


def cuda_graph_obstacle(specs: TrainSpecs, dist: Distributed) -> str | None:
    """Why the training step cannot be replayed as CUDA graphs under these specs (None: it can)."""
    if specs.step.fsdp:
        return "FSDP's gathers and reductions are not captured here (--fsdp)"
    if dist.world > 1:
        return "DistributedDataParallel's gradient all-reduce is not captured here (torchrun)"
    if specs.step.precision == "fp16":
        return "fp16's gradient scaler reads its overflow check back every step (use bf16)"
    if specs.adapter is not None and specs.adapter.train_text_encoder:
        return "--train_text_encoder trains through the text encoders, which run outside the step"
    if specs.optimizer.name != "adamw":
        return f"--optimizer {specs.optimizer.name} cannot step inside a graph (torch's adamw can)"
    if specs.optimizer.fused_backward_pass or specs.step.full_bf16:
        return "the optimizer steps each parameter on its own (--full_bf16, --fused_backward_pass)"
    return None


def make_trainable(
    adapter: AdapterSpec | None, fp8_base: bool, parts: SDXLParts
) -> dict[str, torch.nn.Module]:
    """Adapters as the spec says (no spec: the whole UNet trainable); returns the trained models
    by component name."""
    if adapter is None:
        return components(parts.unet.requires_grad_(True))
    apply_lora_to_unet(
        parts.unet,
        adapter.rank,
        adapter.alpha,
        adapter.target_mode,
        adapter.dropout,
        kind=adapter.kind,
        conv_rank=adapter.conv_rank,
        conv_alpha=adapter.conv_alpha,
        block_ranks=list(adapter.block_dims) if adapter.block_dims else None,
        block_alphas=list(adapter.block_alphas) if adapter.block_alphas else None,
        lokr_factor=adapter.lokr_factor,
    )
    if fp8_base:  # after the adapters, which stay in fp32 (sdxl/frozen.py)
        store_in_fp8(parts.unet)
    if not adapter.train_text_encoder:
        return components(parts.unet)
    apply_lora_to_text_encoders(
        parts.text_encoder,
        adapter.rank,
        adapter.alpha,
        adapter.dropout,
        adapter.kind,
        adapter.lokr_factor,
    )
    return components(parts.unet, parts.text_encoder)


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------

# One micro-batch on the device: images (B, 3, H, W), or their VAE moments (B, 8, h, w) when
# latents are cached; context (B, 77, 2048), pooled (B, 1280), time ids (B, 6), per-sample seeds
# (B,), loss masks (B, 1, h, w).
StepInputs = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]


def prepare(tr: Trainer, batch: Batch) -> StepInputs:
    """The host side of a micro-batch: encode the captions (or read the caches) and move it all to
    the device (the images are encoded in the step). Each sample's seed comes from the run's seed
    and its sample id, so its random draws do not depend on the batching."""
    images, time_ids, captions, ids, masks = batch
    context, pooled = tr.encode_text(captions)
    seeds = torch.tensor([sample_seed(tr.seed, int(i)) for i in ids], dtype=torch.int64)
    return (
        images.to(tr.device),
        context,
        pooled,
        time_ids.to(tr.device),
        seeds.to(tr.device),
        masks.to(tr.device),
    )


def micro_step(s: DeviceStep, *inputs: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one micro-batch: `StepInputs`, then `scale` = (count, weight), two
    numbers (a tensor, so that a graph takes them as input). The gradients of weight * loss / count
    are added to the parameters' (weight: 1, or --prior_loss_weight for a regularisation batch).
    Returns loss / count, detached. Device work only."""
    images, *batch, scale = inputs
    moments = s.encode_images(images)  # (no gradient: the VAE is frozen)
    loss = training_loss(s.model, s.vae, s.schedule, s.loss, s.precision, moments, *batch)
    loss = loss.mean() / scale[0]
    s.scaler.scale(loss * scale[1]).backward()
    return loss.detach()


def optimizer_update(s: DeviceStep) -> torch.Tensor:
    """Clip, step, clear the gradients, update the EMA. Returns the gradient norm before clipping
    (a device tensor). Device work only: the LR schedule advances outside (`train_step`)."""
    s.average_text_gradients()
    s.scaler.unscale_(s.optimizer)
    # (max_grad_norm 0: no clipping, the norm only measured)
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, s.max_grad_norm or float("inf"))
    grad_norm = full_tensor(grad_norm)  # (FSDP: a DTensor)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=s.grads_to_none)
    if s.ema is not None:
        s.ema.update()
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
    parts += [(batch, tr.step.loss.prior_loss_weight) for batch in reg_batches]
    # micro_step's (count, weight): one small tensor per weight, not one per micro-batch.
    weights = {weight for _, weight in parts}
    scales = {w: torch.tensor([len(micro_batches), w], device=tr.device) for w in weights}
    for i, (batch, weight) in enumerate(parts):
        sync = contextlib.nullcontext() if i == len(parts) - 1 else tr.no_sync()
        with sync:
            loss = tr.micro_step(*prepare(tr, batch), scales[weight])
        if i < len(micro_batches):
            total += loss
        else:
            reg_total += loss
    grad_norm = tr.optimizer_update()
    tr.lr_scheduler.step()  # on the host; it fills a graph's learning-rate tensors in place
    return total, reg_total, grad_norm


@torch.no_grad()
def validate(
    tr: Trainer, batches: list[Batch], timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
) -> torch.Tensor:
    """Mean loss over the batches at fixed timesteps and fixed noise (seeded by the validation
    sample's index), so that numbers are comparable between steps and between runs, as a device
    tensor (reading it is the caller's sync). Runs the plain UNet (no data-parallel sync)."""
    s = tr.step
    losses = []
    for batch in batches:
        images, context, pooled, time_ids, seeds, mask = prepare(tr, batch)
        moments = s.encode_images(images)
        shape = (moments.shape[1] // 2, *moments.shape[2:])
        x0 = s.vae.sample(moments, noise.randn(seeds, noise.VALIDATION, shape))
        for k, step in enumerate(timesteps):
            t = torch.full((x0.shape[0],), step, device=tr.device, dtype=torch.long)
            eps = noise.randn(seeds, noise.VALIDATION + 1 + k, shape)
            cond = (context, pooled, time_ids, t, eps, eps, mask)
            loss = noised_loss(s.unet, s.schedule, s.loss, s.precision, x0, *cond)
            losses.append(loss.mean())
    return torch.stack(losses).mean() if losses else torch.zeros((), device=tr.device)


def validation_images(
    tr: Trainer,
    parts: SDXLParts,
    prompts: EncodedPrompts,
    *,
    seed: int,
    size: tuple[int, int],
    steps: int,
) -> torch.Tensor:
    """Fixed-seed images of the validation prompts (prompt i from seed + i) at `size` (width,
    height), with the EMA weights if the run keeps them: (N, 3, height, width) in [0, 1].

    Memory: the prompts were encoded at the start, so the text encoders need not come back to the
    device; the images are made one at a time; and they are decoded on the host, where training
    keeps the VAE's decoder (its weights and activations would otherwise sit on top of the step's
    CUDA graphs; a 1024 px decode takes seconds on a CPU)."""
    if tr.ema is not None:
        tr.ema.swap()
    dtype = tr.step.precision.compute_dtype
    pipe = Pipeline(tr.unet, prompts, parts.vae, parts.schedule, tr.device, dtype)
    images = [
        generate_unique_batch(pipe, [prompt], [seed + i], size[1], size[0], steps)
        for i, prompt in enumerate(prompts.prompts)
    ]
    if tr.ema is not None:
        tr.ema.swap()
    return torch.cat(images)
