"""The memory preflight of a training run (`train_sdxl.py --estimate_memory`): the run's own set-up
and steps, in its order, on the meta device (sdxl/memory.py says how), in seconds and without
weights, data or a GPU.

It runs `place_and_build` (the VAE and text encoders arriving, the caches built, encoders leaving,
the UNet arriving as it trains), two `train_step`s at the largest input the data gives (the first
warms up and captures the CUDA graphs, the second replays them), the validation loss, and the
validation images (the encoders borrowed back, sampling, decoding). The caches are built with one
image and one caption, the largest: the peak does not grow with their number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sdxl.device import Distributed, Precision, resolve_precision
from sdxl.errors import UserError
from sdxl.files import cache_root
from sdxl.memory import WORKSPACE, GiB, MemoryTrace, Phase, nbytes, simulated_cuda_graphs
from sdxl.pretrained import SDXLParts, config_parts, model_configs
from training.cache import ImageEncoder, TextEncoder, moments_as_given
from training.data_loader import Batch, assign_buckets
from training.scan import scan
from training.sharded import unit_sizes
from training.specs import DataSpec, OptimizerSpec, TrainSpecs
from training.train_loop import (
    place_and_build,
    text_encoder_dtype,
    train_step,
    validate,
    validation_images,
)

TOKENS = 75  # a caption of this many tokens per chunk: the largest the encoders take


@dataclass(frozen=True)
class Validation:
    """What the run validates: a held-out loss and how many prompts' images (0: none)."""

    loss: bool = False
    prompts: int = 0


class Phases(Protocol):
    """What watches the run's phases: sdxl/memory.py's MemoryTrace (the preflight), or what
    measures them on a GPU (bench/gpu_report.py)."""

    def phase(self, name: str) -> contextlib.AbstractContextManager: ...

    def row(self, name: str | None) -> None: ...


def stand_in(specs: TrainSpecs, processes: int = 1) -> tuple[TrainSpecs, str | None]:
    """The specs the trace runs, and why they are not the run's (None: they are). The trace runs
    the real step on the meta device (--full_bf16 and --fused_backward_pass included), which an
    optimizer that reads values back cannot take: such a run is traced with AdamW, and its own
    state modelled (`modelled`). A sharded run (--fsdp) is traced in one process with each
    parameter stepped in the backward pass (so no full set of gradients exists, as under FSDP),
    and the sharding over `processes` modelled."""
    reasons = []
    if specs.optimizer.name != "adamw":
        reasons.append(f"--optimizer {specs.optimizer.name} reads values back, which a trace on "
                       "the meta device cannot; its state is modelled")  # fmt: skip
    optimizer = dataclasses.replace(specs.optimizer, name="adamw", extra={})
    if specs.step.fsdp:
        reasons.append(f"--fsdp: one process traced, its parameters each stepped in the backward "
                       f"pass; the sharding over {processes} processes modelled")  # fmt: skip
        optimizer = dataclasses.replace(optimizer, fused_backward_pass=True, max_grad_norm=0.0)
    if not reasons:
        return specs, None
    note = "traced with AdamW's step in place of this run's: " + "; ".join(reasons)
    step = dataclasses.replace(specs.step, fsdp=False)
    return dataclasses.replace(specs, optimizer=optimizer, step=step), note


def estimate_training(
    specs: TrainSpecs, model: Path, validation: Validation = Validation(), processes: int = 1
) -> MemoryTrace:
    """The run's phases traced (MemoryTrace.report() prints them), with batches of the data
    spec's size and batch size (`at_largest` makes them the run's largest batch); a run the trace
    cannot take as it is, as `stand_in` says, with what it could not run modelled."""
    traced = stand_in(specs, processes)[0]
    precision = resolve_precision(
        traced.step.precision, torch.device("cuda"), traced.adapter is None, traced.step.full_bf16
    )
    parts = config_parts(
        model,
        precision.unet_dtype,
        text_encoder_dtype(traced.adapter, precision),
        traced.model.prediction_type,
        traced.model.zero_terminal_snr,
        traced.model.vae_tile_size,
    )
    dist = Distributed(0, 1, torch.device("meta"))
    trace = MemoryTrace()
    quiet = contextlib.redirect_stdout(io.StringIO())  # the run's own lines (adapters, graphs)
    with quiet, trace, simulated_cuda_graphs(trace):
        run_phases(traced, parts, precision, dist, traced.data.size, validation, trace)
    trained = [p for p in parts.unet.parameters() if p.requires_grad]
    if specs.optimizer.name != "adamw":
        delta = state_bytes(specs.optimizer, trained) - state_bytes(traced.optimizer, trained)
        trace.modelled(f"{specs.optimizer.name}'s state in place of AdamW's", delta, "step 1")
    if specs.step.fsdp:
        sharded(trace, parts.unet, trained, precision, processes)
    return trace


def state_bytes(optimizer: OptimizerSpec, params: Sequence[torch.Tensor]) -> int:
    """The bytes of the optimizer's state for these parameters (fp32 where not said):
    AdamW: two moments. adamw8bit (bitsandbytes): two 8-bit moments and an fp32 scale per block
    of 256, for tensors of 4,096 elements or more (smaller ones: two fp32 moments). Adafactor
    (transformers): a factored second moment, rows and columns, for tensors of 2 or more
    dimensions (the full one otherwise), plus a first moment if beta1 is set. Prodigy: two
    moments, its s and the initial weights."""
    total = 0
    for p in params:
        n, shape = p.numel(), p.shape
        if optimizer.name == "adamw8bit":
            total += 2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n
        elif optimizer.name == "adafactor":
            factored = 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
            total += factored if p.dim() >= 2 else 4 * n
            total += 4 * n if optimizer.extra.get("beta1") is not None else 0
        elif optimizer.name == "prodigy":
            total += 16 * n
        else:
            total += 8 * n
    return total


def sharded(
    trace: MemoryTrace,
    unet: torch.nn.Module,
    trained: Sequence[torch.Tensor],
    precision: Precision,
    processes: int,
) -> None:
    """--fsdp, modelled on the one-process trace of fused steps (weights W and AdamW's state S
    whole, gradients freed as they come): W, S and the fp32 gradients G sharded over the
    processes, plus what a process holds gathered: the UNet's own weights (kept for the whole
    step), two units' (the one running and the one prefetched), and the largest unit's gradient in
    the compute dtype and in fp32 for its reduce-scatter. The optimizer's step after the backward
    pass is a row of its own: W, G and S sharded, and AdamW's temporaries (a copy of W's shard)."""
    weights = nbytes(list(trained))
    adam, grads = state_bytes(OptimizerSpec(), trained), weights
    low = 2 if precision.use_autocast else 4
    own, root = unit_sizes(unet)
    largest = max(own)
    gathered = low * (root + 3 * largest) + 4 * largest
    arrive = weights // processes - weights  # each unit's shard arrives, not the whole UNet
    trace.modelled(f"FSDP over {processes} processes: the weights sharded", arrive, "the UNet")
    rest = (grads + adam) // processes - adam + gathered
    trace.modelled("the gradients and AdamW's state sharded, units gathered", rest, "step 1")
    step = (weights + grads + adam + weights) // processes + WORKSPACE
    trace.peak = max(trace.peak, step)
    trace.phases.append(
        Phase("the optimizer step on the shards (modelled)", step, trace.peak, step)
    )


def run_phases(
    specs: TrainSpecs,
    parts: SDXLParts,
    precision: Precision,
    dist: Distributed,
    size: tuple[int, int],
    validation: Validation,
    phases: Phases,
    steps: int = 2,
) -> None:
    """The run's set-up and steps as train_sdxl.py takes them, from `parts` on the host, with
    batches of `size` (width, height): `place_and_build`, then `steps` optimizer steps (the first
    warms up and captures the CUDA graphs, the others replay them), then the validation loss and
    images if the run has them. Each phase is one of `phases`' rows."""
    width, height = size
    chunks = specs.data.max_token_length // 75
    caption = " ".join(["word"] * TOKENS * chunks)  # (a word is a token or more)
    batch = synthetic_batch(specs.data, width, height, caption)
    make_encoders = functools.partial(synthetic_caches, phases, size, caption)
    prompts = [caption] * validation.prompts
    _, tr, encoded = place_and_build(
        specs, parts, precision, dist, [None] * 3, steps, prompts, make_encoders
    )
    accumulation = specs.data.gradient_accumulation_steps
    reg = [batch] * accumulation if specs.data.regularised else []
    with phases.phase("step 1: the micro-steps and the update (warm-up, capture)"):
        train_step(tr, [batch] * accumulation, reg)
    with phases.phase(f"steps 2-{steps} (replays)" if steps > 2 else "step 2 (replays)"):
        for _ in range(steps - 1):
            train_step(tr, [batch] * accumulation, reg)
    if validation.loss:
        with phases.phase("validation loss"):
            validate(tr, [batch])
    if encoded is not None:
        with phases.phase("validation images: sampling and decoding"):
            validation_images(tr, parts, encoded, seed=0, size=size, steps=2)


def synthetic_caches(
    phases: Phases,
    size: tuple[int, int],
    caption: str,
    parts: SDXLParts,
    sets: list,
    spec: DataSpec,
    dist: Distributed,
) -> tuple[list, ImageEncoder, TextEncoder]:
    """training/cache.py's `encoders` without data: for each cache the run builds, one image
    through the VAE or one caption through the text encoders (the largest), for their memory and
    time; and the encoders the steps then use: the VAE and text encoders, or what the caches give
    back (zeros of their shapes)."""
    width, height = size
    chunks = spec.max_token_length // 75
    encode_images: ImageEncoder = parts.vae.moments
    encode_text: TextEncoder = functools.partial(parts.text_encoder.encode, chunks=chunks)
    if spec.cache_latents:
        with phases.phase("latent cache: an image through the VAE"):
            parts.vae.moments(torch.zeros(1, 3, height, width, device=dist.device))
        encode_images = moments_as_given
    if spec.cache_text_embeddings:
        with phases.phase("text cache: a caption through the text encoders"):
            parts.text_encoder.encode([caption], chunks)
        text = parts.text_encoder
        width_ctx = text.text_encoder.config.hidden_size + text.text_encoder_2.config.hidden_size
        pooled = text.text_encoder_2.config.projection_dim

        def encode_text(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            b, device, dtype = len(captions), dist.device, text.dtype
            context = torch.zeros(b, chunks * 77, width_ctx, device=device, dtype=dtype)
            return context, torch.zeros(b, pooled, device=device, dtype=dtype)

    return sets, encode_images, encode_text


def synthetic_batch(spec: DataSpec, width: int, height: int, caption: str) -> Batch:
    """A batch of the spec's size at (width, height), as the data loader hands it over: pixels, or
    the VAE moments when latents are cached."""
    b = spec.batch_size
    if spec.cache_latents:
        images = torch.zeros(b, 8, height // 8, width // 8)
    else:
        images = torch.zeros(b, 3, height, width)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * b, dtype=torch.float32)
    masks = torch.ones(b, 1, height // 8, width // 8)
    return images, time_ids, [caption] * b, torch.arange(b), masks


# ---------------------------------------------------------------------------------------------
# What the script asks: the estimate of its run, and flags that fit a card
# ---------------------------------------------------------------------------------------------


def at_largest(specs: TrainSpecs) -> TrainSpecs:
    """The specs with the data's size and batch size those of the run's largest batch: with
    buckets, the largest bucket the images fall into (when their folders are there); with a
    dataset config, the dataset whose largest batch has the most pixels."""
    data, index = specs.data, (specs.data.cache_dir or cache_root() / "cache") / "scan"
    scans = [
        functools.partial(scan, data.data_dir, index, caption_extension=data.caption_extension)
    ]
    kinds = [(data.size, data.batch_size, data.bucket, [data.data_dir], scans)]
    if data.datasets:  # (a subset reads its folder's own images)
        kinds = [
            (d.size, d.batch_size, d.bucket, [s.image_dir for s in d.subsets], [
                functools.partial(scan, s.image_dir, index, caption_extension=s.caption_extension,
                                  subfolders=False, class_tokens=s.class_tokens)
                for s in d.subsets
            ])
            for d in data.datasets
        ]  # fmt: skip
    largest = []
    for size, batch_size, bucket, folders, scans in kinds:
        sizes = [size]
        if bucket and all(f.is_dir() for f in folders):
            sizes = list(set(assign_buckets([r for read in scans for r in read()], size)))
        top = max(sizes, key=lambda s: s[0] * s[1])
        largest.append((top[0] * top[1] * batch_size, top, batch_size))
    _, size, batch_size = max(largest)
    return dataclasses.replace(
        specs, data=dataclasses.replace(data, size=size, batch_size=batch_size)
    )


# The flag changes tried, in order, when a run does not fit the card: (flags, specs changed).
ALTERNATIVES: list[tuple[str, Callable[[TrainSpecs], TrainSpecs | None]]] = [
    (
        "--cache_latents --cache_text_embeddings",
        lambda s: _data(s, cache_latents=True, cache_text_embeddings=True),
    ),
    ("--fp8_base", lambda s: None if s.adapter is None else _step(s, fp8_base=True)),
    (
        "--gradient_checkpointing_interval 1",
        lambda s: _step(s, checkpoint_interval=1) if s.step.gradient_checkpointing else None,
    ),
    (
        "--gradient_checkpointing",
        lambda s: _step(s, gradient_checkpointing=True, checkpoint_interval=1),
    ),
    ("--cuda_graph off", lambda s: _step(s, cuda_graph="off")),
    ("--image_size 768", lambda s: _smaller(s, 768)),
    ("--image_size 512", lambda s: _smaller(s, 512)),
]


def _data(s: TrainSpecs, **changes: Any) -> TrainSpecs | None:
    new = dataclasses.replace(s, data=dataclasses.replace(s.data, **changes))
    return None if new == s else new


def _smaller(s: TrainSpecs, side: int) -> TrainSpecs | None:
    """A smaller training size (a dataset config sets its datasets' sizes itself)."""
    return _data(s, size=(side, side)) if max(s.data.size) > side and not s.data.datasets else None


def _step(s: TrainSpecs, **changes: Any) -> TrainSpecs | None:
    new = dataclasses.replace(s, step=dataclasses.replace(s.step, **changes))
    return None if new == s else new


def check_fits(
    specs: TrainSpecs,
    model: Path,
    validation: Validation,
    total: int,
    predicted: int,
    alternatives: list = ALTERNATIVES,
) -> None:
    """A run predicted not to fit the card stops here, with one line naming flag changes that
    would fit (each of `alternatives` estimated in turn; the first two that fit)."""
    if predicted <= total:
        return
    fits = []
    for flags, change in alternatives:
        other = change(specs)
        if other is None:
            continue
        peak = estimate_training(at_largest(other), model, validation).peak
        if peak <= total:
            fits.append(f"{flags} ({peak / GiB:.1f} GiB)")
        if len(fits) == 2:
            break
    advice = "; ".join(fits) if fits else "none of the usual flag changes does; a larger card"
    raise UserError(
        f"this run is predicted to need {predicted / GiB:.1f} GiB of GPU memory, more than the "
        f"card's {total / GiB:.1f} GiB; flags that would fit: {advice}"
    )


def report(specs: TrainSpecs, model_name: str, validation: Validation, processes: int = 1) -> str:
    """--estimate_memory's table: the run's phases and the predicted max_memory_reserved (of
    each process, with `processes` of them)."""
    model, note = model_configs(model_name)
    trace = estimate_training(at_largest(specs), model, validation, processes)
    return "\n".join([note, stand_in(specs, processes)[1] or "", trace.report()]).strip()


def predict_on_cuda(
    specs: TrainSpecs,
    model: Path,
    validation: Validation,
    device: torch.device,
    processes: int = 1,
) -> int:
    """At the start of a run on a GPU: the predicted max_memory_reserved, printed in one line; a
    run that would not fit the card stops here (`check_fits`)."""
    trace = estimate_training(at_largest(specs), model, validation, processes)
    total = torch.cuda.get_device_properties(device).total_memory
    print(
        f"memory preflight: predicted max_memory_reserved {trace.peak / GiB:.2f} GiB of the "
        f"card's {total / GiB:.1f} GiB (--estimate_memory shows each phase)"
    )
    note = stand_in(specs, processes)[1]
    if note is not None:  # not this run's own trace: it does not stop the run
        print(f"memory preflight: {note}")
        return trace.peak
    check_fits(specs, model, validation, total, trace.peak)
    return trace.peak
