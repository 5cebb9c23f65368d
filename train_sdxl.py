"""Fine-tune SDXL's UNet with LoRA (or fully) on image + caption pairs.

A complete run on a CPU (the tiny random SDXL and the shipped example data):

    uv run python train_sdxl.py --pretrained_model tiny --data_dir examples/shapes --use_lora \\
        --image_size 64 --max_train_steps 30 --output_dir outputs/tiny

LoRA on the real SDXL base at 512 px, on one GPU with under 12 GB:

    uv run python train_sdxl.py --data_dir my_dataset --use_lora --lora_rank 4 --lora_alpha 16 \\
        --batch_size 1 --gradient_accumulation_steps 4 --num_epochs 10 --learning_rate 1e-4 \\
        --output_dir ./outputs --pretrained_model ./weights/sdxl-base-1.0 --image_size 512

On a GPU the UNet step runs as replayed CUDA graphs (--cuda_graph auto, the default; off for eager
steps); add --compile for compiled blocks on top (README.md, "GPU speed").

Outputs in --output_dir: config.json (the resolved arguments), metrics.jsonl, step / epoch / lowest-loss
checkpoints (`lora_step000100_<time>.pt`, ...; sdxl/checkpoint.py describes them). Resume with
--resume CHECKPOINT or resume_training.py.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.options import run_cli
from cli.train import check_args, parse_args, resolved_config, trackers, training_specs
from sdxl.errors import StoppedBySignal
from training.specs import TrainSpecs

if TYPE_CHECKING:  # names for the annotations only: the heavy imports wait for the flags' checks
    from sampling.inference import EncodedPrompts
    from sdxl.device import Distributed, Precision
    from sdxl.pretrained import SDXLParts
    from training.train_loop import Trainer, TrainState


def main(args: argparse.Namespace) -> Path | int:
    """Train; returns the path of the last checkpoint written. A run stopped by SIGINT or SIGTERM
    saves a checkpoint, then raises StoppedBySignal (exit code 130 or 143)."""
    check_args(args)  # every flag, before the heavy imports (about 20 s on a small machine)
    specs = training_specs(args)
    if args.estimate_memory:
        return estimate_memory(args, specs)
    import torch
    from tqdm import tqdm

    from sampling.inference import save_grid
    from training.checkpoint import checkpoint_kinds, save_checkpoints
    from training.train_loop import TrainingError, train_step, validate, validation_images
    from training.train_util import MetricsLog, StopSignals, Timer

    run = set_up(args, specs)
    tr, state, dist, output_dir = run.trainer, run.state, run.dist, run.output_dir

    # -- the loop: one optimizer step an iteration; only the first process writes ----------------
    last, stopped = None, 0
    wandb_project, tensorboard_dir = trackers(args)
    metrics = MetricsLog(run.metrics_file, wandb_project, run.config, state.step, tensorboard_dir)
    bar = tqdm(total=run.max_steps, initial=state.step, desc="train", disable=not dist.main)
    timer = Timer()
    with run.lock, metrics, bar, StopSignals() as stop:
        for (micro, epoch, position), reg_micro in zip(run.steps, run.reg_steps):
            # The step's one device sync: its losses (training, regularisation) and gradient norm.
            train_loss, reg_loss, grad_norm = torch.stack(train_step(tr, micro, reg_micro)).tolist()
            # AdamW's learning rate is a device tensor, filled before that sync: no wait.
            lr = float(tr.lr_scheduler.get_last_lr()[0])
            loss = train_loss + specs.loss.prior_loss_weight * reg_loss
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss is {loss}; stopping without saving "
                    "(try a lower --learning_rate, or --precision bf16/fp32)"
                )
            record = {"step": state.step + 1, "epoch": state.epoch, "loss": loss, "lr": lr}
            images = sum(len(batch[3]) for batch in micro) * dist.world  # (datasets differ)
            record |= {"grad_norm": grad_norm, "images_per_s": timer.images_per_s(images)}
            record |= {"train_loss": train_loss, "reg_loss": reg_loss} if run.reg else {}
            epoch_done = epoch > state.epoch
            state.advance(loss, epoch, position)
            # Every process stops at the same step, whichever of them got the signal.
            if dist.any(stop.received is not None):
                stopped = stop.received or signal.SIGTERM
            kinds = checkpoint_kinds(
                state.step, run.max_steps, args.save_interval, epoch_done, bool(stopped)
            )
            validating = bool(args.validation_steps) and state.step % args.validation_steps == 0
            takes_part = dist.main or tr.sharded  # (sharded: every process validates and saves)
            if takes_part and run.val_batches and (validating or kinds) and not stopped:
                record["val_loss"] = float(validate(tr, run.val_batches))
            if takes_part and run.prompts and validating:
                n, size = args.validation_sampling_steps, specs.data.size
                grid = validation_images(
                    tr, run.parts, run.prompts, seed=args.seed, size=size, steps=n
                )
                path = output_dir / f"validation_step{state.step:06d}.png"
                if dist.main:
                    save_grid(grid, path)
                    metrics.log_image("validation", path, state.step)
            metrics.log(record)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            if takes_part and kinds:  # the lowest-loss checkpoint follows val_loss if there is one
                lowest = not stopped and state.improves(record.get("val_loss", state.smoothed_loss))
                saved = save_checkpoints(output_dir, kinds, lowest, tr, state, run.config, run.tags)
                last = saved or last
            if stopped:
                break
    dist.close()
    if dist.main:
        print(f"checkpoints, config.json and metrics.jsonl are in {output_dir.resolve()}")
    if run.predicted is not None:  # the memory preflight against what this run took
        measured = torch.cuda.max_memory_reserved(dist.device) / 2**30
        print(
            f"max_memory_reserved: predicted {run.predicted / 2**30:.2f} GiB, measured {measured:.2f}"
        )
    if stopped:
        raise StoppedBySignal(
            stopped, f"stopped by a signal at step {state.step}; saved {last}", last
        )
    return last or output_dir


@dataclass
class Run:
    """What the loop works with, as `set_up` made it."""

    trainer: Trainer
    state: TrainState  # where the run stands
    dist: Distributed  # this process, its device, the collectives
    parts: SDXLParts  # the models (validation images decode with the VAE)
    steps: Iterator  # each step's micro-batches, epoch and position, from where the run stands
    reg_steps: Iterator  # the regularisation micro-batches paired with them
    reg: bool
    val_batches: list
    prompts: EncodedPrompts | None  # the validation prompts, encoded at the start
    max_steps: int
    config: dict
    tags: dict
    output_dir: Path
    metrics_file: Path | None
    lock: contextlib.AbstractContextManager
    predicted: int | None  # bytes of max_memory_reserved the preflight predicted (on CUDA)


def set_up(args: argparse.Namespace, specs: TrainSpecs) -> Run:
    """Everything before the loop, in the order that fails fastest on bad input: the optimizer's
    arguments, the data, the processes, the model, the output folder; then the models, encoders
    (or caches), trainer, and a resumed run's state."""
    import torch

    from sampling.prompts import read_prompt_file
    from sdxl.checkpoint import load_checkpoint
    from sdxl.device import default_allocator, init_distributed, resolve_precision
    from sdxl.files import write_json
    from sdxl.pretrained import resolve_model, schedule_of
    from training.checkpoint import claim_output_dir, restore_checkpoint, tag_frequency
    from training.data_loader import (
        bucket_table,
        fixed_batches,
        optimizer_steps,
        paired_steps,
        read_data,
        steps_per_epoch,
    )
    from training.optimizers import check_optimizer
    from training.preflight import predict_on_cuda
    from training.train_loop import TrainState

    alloc_conf = default_allocator()  # before CUDA starts
    check_optimizer(specs.optimizer)  # a bad --optimizer_args key, before the model loads
    records, data, val_data, reg_data = read_data(specs.data)
    prompts = read_prompt_file(args.validation_prompts) if args.validation_prompts else []
    resume = load_checkpoint(args.resume) if args.resume else None
    accum = args.gradient_accumulation_steps
    dist = init_distributed(args.device, args.ddp_timeout, group=args.fsdp)
    lock = None
    try:  # (a failure from here on leaves neither the folder's lock nor the process group held)
        if specs.data.bucket and dist.main:
            print(bucket_table(data.targets))
        per_epoch = steps_per_epoch(data, args.batch_size, dist.world, accum)
        max_steps = args.max_train_steps or args.num_epochs * per_epoch
        precision = resolve_precision(
            args.precision, dist.device, not args.use_lora, args.full_bf16
        )
        model_folder = resolve_model(
            args.pretrained_model, half=precision.unet_dtype != torch.float32
        )
        schedule = schedule_of(model_folder, args.prediction_type, args.zero_terminal_snr)
        predicted = None
        if dist.device.type == "cuda" and dist.main:  # stops here if the run would not fit the card
            val = validation_of(args, prompts)
            predicted = predict_on_cuda(specs, model_folder, val, dist.device, dist.world)
        output_dir = Path(args.output_dir)
        config = resolved_config(args, model_folder, precision.name, schedule.prediction_type)
        config |= {"resolved_device": str(dist.device), "processes": dist.world}
        config["cuda_alloc_conf"] = alloc_conf
        # One run per folder: a folder that holds another run is refused (see --overwrite).
        lock = claim_output_dir(output_dir, args.resume, args.overwrite) if dist.main else None
        if lock is not None:
            write_json(config, output_dir / "config.json")
        sets = [data, val_data, reg_data]
        parts, (data, val_data, reg_data), tr, encoded = load_models(
            args, specs, model_folder, precision, dist, sets, max_steps, prompts
        )
        state = TrainState()
        if resume is not None:
            restore_checkpoint(resume, Path(args.resume), tr, state)
    except BaseException:
        if lock is not None:
            lock.release()
        dist.close()
        raise
    # Every step's micro-batches, from where the run stands (mid-epoch, for a resumed run), and
    # the regularisation micro-batches paired with them (none without --reg_data_dir).
    steps = optimizer_steps(
        data, args.batch_size, accum, state.epoch, state.position, dist, args.num_workers
    )
    return Run(
        trainer=tr,
        state=state,
        dist=dist,
        parts=parts,
        steps=itertools.islice(steps, max_steps - state.step),
        reg_steps=paired_steps(
            reg_data, args.batch_size, accum, state.step, dist, args.num_workers
        ),
        reg=reg_data is not None,
        val_batches=fixed_batches(val_data, args.batch_size),
        prompts=encoded,
        max_steps=max_steps,
        config=config,
        tags=tag_frequency(records, specs.data.data_dir),
        output_dir=output_dir,
        metrics_file=output_dir / "metrics.jsonl" if dist.main else None,
        lock=lock if lock is not None else contextlib.nullcontext(),
        predicted=predicted,
    )


def load_models(
    args: argparse.Namespace,
    specs: TrainSpecs,
    model_folder: Path,
    precision: Precision,
    dist: Distributed,
    sets: list,
    max_steps: int,
    prompts: list[str],
) -> tuple[SDXLParts, list, Trainer, EncodedPrompts | None]:
    """The models (loaded into CPU memory), the data sets as the encoders see them (cached
    latents, if asked), and the trainer (training/train_loop.py: place_and_build)."""
    import torch

    from sdxl.pretrained import load_sdxl
    from training.train_loop import place_and_build, text_encoder_dtype

    torch.manual_seed(args.seed)
    parts = load_sdxl(
        model_folder,
        precision.unet_dtype,
        device="cpu",
        text_dtype=text_encoder_dtype(specs.adapter, precision),
        vae_folder=args.vae,
        prediction_type=args.prediction_type,
        zero_terminal_snr=args.zero_terminal_snr,
        vae_tile_size=args.vae_tile_size,
    )
    sets, tr, encoded = place_and_build(specs, parts, precision, dist, sets, max_steps, prompts)
    return parts, sets, tr, encoded


def estimate_memory(args: argparse.Namespace, specs: TrainSpecs) -> int:
    """--estimate_memory: the run's predicted GPU memory, phase by phase; nothing else is done."""
    from sampling.prompts import read_prompt_file
    from training.preflight import report

    prompts = read_prompt_file(args.validation_prompts) if args.validation_prompts else []
    validation = validation_of(args, prompts)
    print(report(specs, args.pretrained_model, validation, args.num_processes or 1))
    return 0


def validation_of(args: argparse.Namespace, prompts: list[str]) -> Any:
    """What the run validates, for the memory preflight (training/preflight.py: Validation)."""
    from training.preflight import Validation

    return Validation(args.validation_split > 0, len(prompts) if args.validation_steps else 0)


if __name__ == "__main__":
    run_cli(main, lambda: parse_args(sys.argv[1:], __doc__))
