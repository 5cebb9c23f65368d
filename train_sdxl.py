"""Fine-tune SDXL's UNet with LoRA (or fully) on image + caption pairs.

A complete run on a CPU in about a minute (the tiny random SDXL and the shipped example data):

    uv run python train_sdxl.py --pretrained_model tiny --data_dir examples/shapes --use_lora \\
        --image_size 64 --max_train_steps 30 --output_dir outputs/tiny

LoRA on the real SDXL base at 512 px, on one GPU with under 12 GB:

    uv run python train_sdxl.py --data_dir my_dataset --use_lora --lora_rank 4 --lora_alpha 16 \\
        --batch_size 1 --gradient_accumulation_steps 4 --num_epochs 10 --learning_rate 1e-4 \\
        --output_dir ./outputs --pretrained_model ./weights/sdxl-base-1.0 --image_size 512

Outputs in --output_dir: config.json (the resolved arguments), metrics.jsonl, step / epoch / lowest-loss
checkpoints (`lora_step000100_<time>.pt`, ...). Resume with --resume CHECKPOINT or resume_training.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sampling.inference import Pipeline, generate_unique_batch, read_prompt_file, to_pil
from sdxl.errors import run_cli
from sdxl.lora import TARGET_MODES, apply_lora_to_unet, get_lora_state_dict, load_lora_state_dict
from sdxl.pretrained import DEFAULT_MODEL, cache_root, load_sdxl, resolve_model
from sdxl.weights import read_safetensors
from training.cache import CachedLatents, CachedText, folder_identity
from training.data_loader import (
    DataError,
    TrainingData,
    assign_buckets,
    batches,
    collate,
    samples_per_epoch,
    scan,
)
from training.ema import EMA
from training.precision_util import resolve_precision
from training.train_loop import (
    Trainer,
    TrainState,
    min_snr_weight,
    offset_noise,
    train_epoch,
    validate,
)
from training.train_util import (
    MetricsLog,
    atomic_torch_save,
    atomic_write_json,
    load_checkpoint,
    lr_lambda,
    prune_step_checkpoints,
    rng_state,
    set_rng_state,
    timestamp,
)


def split_records(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """A fixed validation subset (the same for every run with this seed) and the training rest."""
    if fraction <= 0:
        return records, []
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(records) * fraction))
    val = {i for i in order[:n_val]}
    return [r for i, r in enumerate(records) if i not in val], [
        r for i, r in enumerate(records) if i in val
    ]


def main(args: argparse.Namespace) -> Path:
    """Train; returns the path of the last checkpoint written."""
    # -- everything that can fail on bad input, before any model is loaded ---------------------
    records = scan(args.data_dir)
    train_records, val_records = split_records(records, args.validation_split, args.seed)
    rank, world, device = init_distributed(args.device)
    main_process = rank == 0
    samples_per_step = args.batch_size * world * args.gradient_accumulation_steps
    buckets = assign_buckets(train_records, args.image_size) if args.bucket else None
    data = TrainingData(
        train_records,
        args.image_size,
        args.center_crop,
        args.random_flip,
        args.caption_dropout,
        args.seed,
        buckets,
    )
    epoch_samples = samples_per_epoch(data, args.batch_size * world)
    steps_per_epoch = epoch_samples // samples_per_step
    if buckets and main_process:
        print_bucket_table(buckets)
    if steps_per_epoch == 0:
        raise DataError(
            f"{len(train_records)} training images are fewer than --batch_size x processes x "
            f"--gradient_accumulation_steps = {samples_per_step}; lower them or add images"
        )
    max_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    read_validation_prompts(args.validation_prompts)
    resume = load_checkpoint(args.resume) if args.resume else None
    model_folder = resolve_model(args.pretrained_model)
    precision = resolve_precision(args.precision, device, full_finetune=not args.use_lora)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else cache_root() / "cache"
    config = {  # plain values only: it goes into checkpoints loaded with weights_only=True
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "base_model": str(model_folder),
        "resolved_precision": precision.name,
        "resolved_device": str(device),
        "processes": world,
    }
    if main_process:
        atomic_write_json(config, output_dir / "config.json")

    # -- models ----------------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    parts = load_sdxl(model_folder, precision.unet_dtype, device, precision.text_dtype, args.vae)
    unet = parts.unet
    if args.use_lora:
        apply_lora_to_unet(
            unet, args.lora_rank, args.lora_alpha, args.lora_target_mode, args.lora_dropout
        )
    else:
        unet.requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(memory_format=torch.channels_last)  # the layout fast convolution kernels want
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=args.learning_rate, weight_decay=args.adam_weight_decay, eps=args.adam_epsilon
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.lr_scheduler, args.lr_warmup_steps, max_steps)
    )
    ema = (
        EMA([(n, p) for n, p in unet.named_parameters() if p.requires_grad], args.ema_decay)
        if args.use_ema
        else None
    )
    # Data parallel: DDP averages the gradients of the processes (NCCL on GPUs, gloo on the CPU).
    model = (
        DistributedDataParallel(unet, device_ids=[device] if device.type == "cuda" else None)
        if world > 1
        else unet
    )
    tr = Trainer(
        unet=unet,
        vae=parts.vae,
        schedule=parts.schedule,
        precision=precision,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        scaler=precision.grad_scaler(),
        device=device,
        encode_images=parts.vae.moments,
        encode_text=parts.text_encoder.encode,
        seed=args.seed,
        model=model,
        no_sync=model.no_sync if world > 1 else contextlib.nullcontext,
        grad_accum=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        loss_weight=min_snr_weight(parts.schedule, args.snr_gamma),
        make_noise=offset_noise(args.noise_offset),
        after_step=ema.update if ema is not None else (lambda: None),
    )
    state = TrainState()
    if resume is not None:
        restore(resume, tr, ema, state, Path(args.resume).parent)

    val_data = TrainingData(val_records, args.image_size, center_crop=True, seed=args.seed)
    if args.cache_latents:  # the first process writes the cache, the others then read it
        with first_process_first(world, main_process):
            vae_id = folder_identity(Path(args.vae or model_folder / "vae"))
            data = CachedLatents(data, parts.vae, cache_dir, vae_id)
            val_data = CachedLatents(val_data, parts.vae, cache_dir, vae_id)
        tr.encode_images = lambda moments: moments  # the batches carry the posterior moments
    if args.cache_text_embeddings:
        with first_process_first(world, main_process):
            text_id = folder_identity(model_folder / "text_encoder") + folder_identity(
                model_folder / "text_encoder_2"
            )
            captions = [r.caption for r in train_records + val_records]
            tr.encode_text = CachedText(captions, parts.text_encoder, cache_dir, text_id, device)
    if args.cache_latents and args.cache_text_embeddings and not args.validation_prompts:
        parts.vae.to("cpu")  # not needed on the device any more
        parts.text_encoder.to("cpu")
    val_batches = [
        collate([val_data[(i, i)] for i in range(s, min(s + args.batch_size, len(val_data)))])
        for s in range(0, len(val_data), args.batch_size)
    ]

    # -- the loop --------------------------------------------------------------------------------
    # Only the first process writes: metrics, W&B, checkpoints, validation images.
    metrics = MetricsLog(
        output_dir / "metrics.jsonl" if main_process else None, args.wandb_project, config
    )
    validation_prompts = read_validation_prompts(args.validation_prompts)

    def validation_images(step: int) -> None:
        """Fixed-seed images of the validation prompts, as one PNG grid (EMA weights if kept)."""
        if ema is not None:
            ema.swap()
        pipe = Pipeline(
            unet, parts.text_encoder, parts.vae, parts.schedule, device, precision.compute_dtype
        )
        seeds = [args.seed + i for i in range(len(validation_prompts))]
        images = generate_unique_batch(
            pipe,
            validation_prompts,
            seeds,
            args.image_size,
            args.image_size,
            args.validation_sampling_steps,
        )
        if ema is not None:
            ema.swap()
        path = output_dir / f"validation_step{step:06d}.png"
        image_grid(images).save(path)
        metrics.log_image("validation", path, step)

    lora_config = {
        "rank": args.lora_rank,
        "alpha": args.lora_alpha,
        "target_mode": args.lora_target_mode,
    }

    def save(kind: str) -> Path:
        ts = timestamp()
        name = {
            "step": f"lora_step{state.step:06d}_{ts}",
            "epoch": f"lora_epoch{state.epoch:04d}_{ts}",
            "lowest": f"lora_step{state.step:06d}_lowest_loss",
        }[kind]
        ckpt = {
            "format_version": 1,
            "step": state.step,
            "epoch": state.epoch,
            "position": state.position,
            "smoothed_loss": state.smoothed_loss,
            "best_loss": state.best_loss,
            "lora": get_lora_state_dict(unet) if args.use_lora else None,
            "lora_config": lora_config if args.use_lora else None,
            "unet_config": asdict(unet.config),
            "unet_file": None,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": tr.scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": rng_state(),
            "config": config,
            "base_model": str(model_folder),
            "timestamp": ts,
        }
        if not args.use_lora:  # the full UNet goes beside the checkpoint, as safetensors
            unet_file = output_dir / (name.replace("lora_", "unet_", 1) + ".safetensors")
            tmp = unet_file.with_name(unet_file.name + ".tmp")
            save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp)
            tmp.replace(unet_file)
            ckpt["unet_file"] = unet_file.name
        path = output_dir / f"{name}.pt"
        atomic_torch_save(ckpt, path)
        return path

    def checkpoint_event(kind: str) -> Path:
        """A step or epoch checkpoint, plus a lowest-loss one when the tracked loss improved."""
        path = save(kind)
        tracked = validate(tr, val_batches, seed=args.seed) if val_batches else state.smoothed_loss
        if tracked is not None and tracked < state.best_loss:
            state.best_loss = tracked
            for old in output_dir.glob("lora_step*_lowest_loss.pt"):
                old.unlink()
            save("lowest")
        if kind == "step":
            prune_step_checkpoints(output_dir, args.keep_last)
        return path

    stop = {"signal": None}

    def request_stop(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(
        total=max_steps,
        initial=state.step,
        desc="train",
        dynamic_ncols=True,
        disable=not main_process,
    )
    last: dict = {"time": time.perf_counter(), "path": None, "saved_step": -1}

    def on_step(st: TrainState, loss: float, grad_norm: float) -> None:
        now = time.perf_counter()
        ips = samples_per_step / (now - last["time"])
        last["time"] = now
        lr = lr_scheduler.get_last_lr()[0]
        record = {
            "step": st.step,
            "epoch": st.epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": ips,
        }
        if main_process and args.validation_steps and st.step % args.validation_steps == 0:
            if val_batches:
                record["val_loss"] = validate(tr, val_batches, seed=args.seed)
            if validation_prompts:
                validation_images(st.step)
        metrics.log(record)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.2f}")
        bar.update(1)
        if main_process and args.save_interval and st.step % args.save_interval == 0:
            last["path"], last["saved_step"] = checkpoint_event("step"), st.step
        if stop_requested(
            stop["signal"] is not None, world
        ):  # every process stops at the same step
            last["path"] = save("step") if main_process else None
            raise KeyboardInterrupt

    try:
        while state.step < max_steps:
            epoch = batches(
                data, args.batch_size, state.epoch, state.position, rank, world, args.num_workers
            )
            train_epoch(tr, state, epoch, samples_per_step, max_steps, on_step)
            if epoch_samples - state.position >= samples_per_step:
                break  # stopped mid-epoch by --max_train_steps
            state.epoch += 1
            state.position = 0
            if main_process:
                last["path"], last["saved_step"] = checkpoint_event("epoch"), state.step
        if main_process and last["saved_step"] != state.step:  # the final state, unless just saved
            last["path"] = checkpoint_event("step")
    except KeyboardInterrupt:
        print(
            f"\nstopped by signal at step {state.step}; checkpoint: {last['path']}", file=sys.stderr
        )
    finally:
        bar.close()
        metrics.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if world > 1:
            dist.destroy_process_group()
    return Path(last["path"]) if last["path"] else output_dir


def init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL
    with one GPU per process, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if world == 1:
        return (
            0,
            1,
            torch.device(device_arg if device_arg != "auto" else ("cuda" if cuda else "cpu")),
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def stop_requested(local: bool, world: int) -> bool:
    """Whether any process was asked to stop (a signal reaches each process at its own moment)."""
    if world == 1:
        return local
    flag = torch.tensor([float(local)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@contextlib.contextmanager
def first_process_first(world: int, main_process: bool) -> Iterator[None]:
    """Run the block on the first process, then on the others (e.g. filling a shared cache)."""
    if world > 1 and not main_process:
        dist.barrier()
    yield
    if world > 1 and main_process:
        dist.barrier()


def print_bucket_table(buckets: list[tuple[int, int]]) -> None:
    counts: dict[tuple[int, int], int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    print("aspect-ratio buckets (width x height: images):")
    for (w, h), n in sorted(counts.items()):
        print(f"  {w:5d} x {h:<5d} {n}")


def read_validation_prompts(path: str | None) -> list[str]:
    return [] if path is None else read_prompt_file(path)


def image_grid(images: torch.Tensor) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one PIL image, up to 4 per row."""
    n, _, h, w = images.shape
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(to_pil(img), ((i % cols) * w, (i // cols) * h))
    return grid


def restore(ckpt: dict, tr: Trainer, ema: EMA | None, state: TrainState, folder: Path) -> None:
    """Put a run back exactly where a checkpoint left it."""
    if ckpt["lora"] is not None:
        load_lora_state_dict(tr.unet, ckpt["lora"])
    else:
        weights = read_safetensors(
            folder / ckpt["unet_file"], next(tr.unet.parameters()).dtype, tr.device
        )
        tr.unet.load_state_dict(weights)
    tr.optimizer.load_state_dict(ckpt["optimizer"])
    tr.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    tr.scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt["ema"] is not None:
        ema.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"])
    state.step, state.epoch, state.position = ckpt["step"], ckpt["epoch"], ckpt["position"]
    state.smoothed_loss, state.best_loss = ckpt["smoothed_loss"], ckpt["best_loss"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data_dir",
        required=True,
        help="folder of name.jpg|jpeg|png|webp + name.txt pairs, or of WebDataset .tar shards",
    )
    g.add_argument(
        "--image_size",
        type=int,
        default=1024,
        help="training resolution (square crops); 512 fits under 12 GB",
    )
    g.add_argument(
        "--center_crop", action="store_true", help="crop the center instead of a random position"
    )
    g.add_argument("--random_flip", action="store_true", help="flip half the images horizontally")
    g.add_argument(
        "--caption_dropout",
        type=float,
        default=0.0,
        help="probability of training on the empty prompt (helps classifier-free guidance)",
    )
    g.add_argument(
        "--validation_split",
        type=float,
        default=0.0,
        help="fraction of the data held out for a validation loss",
    )
    g.add_argument(
        "--validation_steps",
        type=int,
        default=0,
        help="every N steps: the validation loss and the validation images (0: off)",
    )
    g.add_argument(
        "--validation_prompts",
        default=None,
        help="a text file of prompts (one a line) rendered every --validation_steps",
    )
    g.add_argument(
        "--validation_sampling_steps",
        type=int,
        default=20,
        help="sampling steps for validation images",
    )
    g.add_argument(
        "--bucket",
        action="store_true",
        help="aspect-ratio buckets of about image_size^2 pixels (sides in multiples of 64) instead of square crops",
    )
    g.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode every image with the VAE once, before training (crops and flips then fixed per image)",
    )
    g.add_argument(
        "--cache_text_embeddings",
        action="store_true",
        help="encode every caption once, before training",
    )
    g.add_argument(
        "--cache_dir",
        type=Path,
        default=None,
        help="where cached latents / embeddings go (default: ~/.cache/sdxl-lora/cache)",
    )
    g.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model",
        default=DEFAULT_MODEL,
        help="a diffusers-layout SDXL folder, or 'tiny' for a small random SDXL",
    )
    g.add_argument(
        "--vae", type=Path, default=None, help="another VAE folder (e.g. the fp16-fix VAE)"
    )
    g.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="UNet precision; auto = bf16 on CUDA, fp32 on the CPU",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute activations in backward (on by default: needed for <12 GB)",
    )
    g.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    g = p.add_argument_group("LoRA")
    g.add_argument(
        "--use_lora",
        action="store_true",
        help="train LoRA adapters; without it the whole UNet is fine-tuned",
    )
    g.add_argument("--lora_rank", type=int, default=8, help="adapter rank (4 fits under 12 GB)")
    g.add_argument(
        "--lora_alpha",
        type=float,
        default=32,
        help="adapter scale numerator: the update is scaled by alpha / rank",
    )
    g.add_argument(
        "--lora_target_mode",
        default="attention",
        choices=TARGET_MODES,
        help="which Linear layers get adapters",
    )
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapter input")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch_size", type=int, default=1, help="images per step per process")
    g.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="micro-batches per optimizer step",
    )
    g.add_argument("--num_epochs", type=int, default=1, help="passes over the data")
    g.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="optimizer steps in total (overrides --num_epochs)",
    )
    g.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=["constant", "linear", "cosine"],
        help="learning-rate schedule after warm-up",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="min-SNR loss weighting gamma (5 is usual); off by default",
    )
    g.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="noise offset strength (0.0357 is what SDXL base used); off by default",
    )
    g.add_argument(
        "--use_ema",
        action="store_true",
        help="keep an exponential moving average of the trained weights",
    )
    g.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay per step")
    g.add_argument(
        "--seed", type=int, default=0, help="seed for data order, crops, noise and timesteps"
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--output_dir",
        default="./outputs",
        help="where checkpoints, config.json and metrics.jsonl go",
    )
    g.add_argument(
        "--save_interval",
        type=int,
        default=0,
        help="save a step checkpoint every N steps (0: at epoch ends only)",
    )
    g.add_argument(
        "--keep_last",
        type=int,
        default=0,
        help="keep only the newest N step checkpoints (0: keep all)",
    )
    g.add_argument(
        "--wandb_project", default=None, help="also log to this Weights & Biases project"
    )
    g.add_argument("--resume", default=None, help="continue from this checkpoint (.pt)")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
