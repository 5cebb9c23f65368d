"""A training run's folder and its checkpoints: claiming --output_dir, saving the run's state (and
the weights to share beside it), and putting a run back where a checkpoint left it. The file
format itself is sdxl/checkpoint.py's.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sdxl.checkpoint import (
    CheckpointError,
    beside,
    checkpoint_path,
    link_checkpoint,
    lora_metadata,
    prune_step_checkpoints,
    remove_checkpoint,
    unet_weights,
    write_checkpoint,
    write_unet_file,
)
from sdxl.errors import UserError
from sdxl.files import FolderLock, make_folder, remove_stale_tmp
from sdxl.lora import get_lora_state_dict, load_lora_state_dict
from sdxl.lora_formats import modules_from_state_dict, save_lora_file
from sdxl.pretrained import frozen_parts
from sdxl.single_file import write_single_file
from training.optimizers import tensor_learning_rates
from training.scan import Record
from training.sharded import gathered_unet, load_sharded, save_sharded
from training.train_loop import Trainer, TrainState
from training.train_util import rng_state, set_rng_state

# ---------------------------------------------------------------------------------------------
# The run's folder: one run per --output_dir
# ---------------------------------------------------------------------------------------------

# What a training run writes into its --output_dir, besides its lock and temporary files.
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "validation_step*.png",
    "wandb",
    "tensorboard",
    *(f"{prefix}_*.{ext}" for prefix in ("lora", "full", "unet") for ext in ("pt", "safetensors")),
    "full_*.dcp",
)
# What a run leaves before its first checkpoint: a run that failed early, nothing to keep.
START_FILES = ("config.json", "metrics.jsonl", "tensorboard")


def claim_output_dir(folder: Path, resume: str | None, overwrite: bool) -> FolderLock:
    """Take --output_dir for this run, before anything is written there: create it, lock it (one
    run at a time), remove an interrupted run's temporary files, and make sure it holds no other
    run's files. A folder that holds a run is refused, unless this run resumes one of that run's
    checkpoints (it then continues the run, and metrics.jsonl continues from the checkpoint's step)
    or --overwrite is given (the old run's files are deleted first). A run that stopped before its
    first checkpoint (a bad flag found late, say) left nothing worth keeping: its config.json and
    metrics.jsonl are replaced without asking."""
    make_folder(folder, "--output_dir")
    lock = FolderLock(folder, "--output_dir").acquire()
    if removed := remove_stale_tmp(folder):
        print(f"removed {removed} temporary files an interrupted run left in {folder}")
    existing = sorted({p for pattern in RUN_FILES for p in folder.glob(pattern)})
    continuing = resume is not None and Path(resume).resolve().parent == folder.resolve()
    unfinished = all(p.name in START_FILES for p in existing)
    if existing and not continuing and not unfinished and not overwrite:
        lock.release()
        raise UserError(
            f"--output_dir {folder} holds another run ({len(existing)} files, e.g. "
            f"{existing[0].name}); choose another folder, --resume one of its checkpoints "
            "to continue it, or pass --overwrite to delete it first"
        )
    if existing and not continuing:
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return lock


def tag_frequency(records: list[Record], data_dir: Path) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per dataset folder (a "10_name" concept, or the data folder), how
    often each tag occurs in its captions."""
    frequency: dict[str, Counter] = {}
    for r in records:
        tags = [t.strip() for t in r.caption.split(",") if t.strip()]
        frequency.setdefault(r.concept or data_dir.name, Counter()).update(tags)
    return {folder: dict(counts) for folder, counts in frequency.items()}


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    path: Path, tr: Trainer, state: TrainState, config: dict, tags: dict[str, dict[str, int]]
) -> Path:
    """Write one checkpoint and, beside it under the same name, the weights to share: the LoRA in
    --lora_save_format (its metadata derived from the checkpoint), or for full fine-tuning the
    UNet. `config` is the run's resolved configuration: plain values only, as weights_only loading
    requires. Sharded (--fsdp), every process calls it: each writes its shards into `name.dcp`, the
    full weights are gathered for the shared file, and the first process writes the rest."""
    lora = bool(config["use_lora"])
    unet: dict[str, Any] | None  # the full fine-tune's weights, for the file beside
    if tr.sharded:
        ema = tr.ema.shadow if tr.ema is not None else None
        save_sharded(path.with_suffix(".dcp"), tr.dist, tr.unet, tr.optimizer, ema)
        unet = gathered_unet(tr.unet)
        if not tr.dist.main:
            return path
    else:
        unet = None if lora else tr.unet.state_dict()
    ckpt: dict[str, Any] = {
        "step": state.step,
        "epoch": state.epoch,
        "position": state.position,
        "smoothed_loss": state.smoothed_loss,
        "best_loss": state.best_loss,
        "lora": get_lora_state_dict(tr.models) if lora else None,
        "unet_config": asdict(tr.unet.config),
        "unet_file": None if lora else path.with_suffix(".safetensors").name,
        # --fsdp: the weights, optimizer state and EMA are the shards beside
        "sharded": path.with_suffix(".dcp").name if tr.sharded else None,
        "optimizer": None if tr.sharded else tr.optimizer.state_dict(),
        "lr_scheduler": tr.lr_scheduler.state_dict(),
        "scaler": tr.step.scaler.state_dict(),
        "ema": tr.ema.state_dict() if tr.ema is not None and not tr.sharded else None,
        "rng": rng_state(),
        "config": config,
        "tag_frequency": tags,
    }
    shared = path.with_suffix(".safetensors")
    if unet is not None and config.get("save_model_as") == "diffusers":  # the UNet alone
        write_unet_file(shared, unet, {"step": state.step})
    elif unet is not None:  # the whole model as one SGM file, the UNet in its training precision
        frozen = frozen_parts(config["pretrained_model"], config.get("vae"))
        write_single_file({"unet": unet, **frozen}, shared, metadata={"step": str(state.step)})
    elif config["lora_save_format"] != "none":  # ready for ComfyUI, AUTOMATIC1111, diffusers
        modules = modules_from_state_dict(ckpt["lora"])
        fmt, layers = config["lora_save_format"], tr.unet.config.layers_per_block
        save_lora_file(shared, modules, fmt, lora_metadata(ckpt), layers_per_block=layers)
    write_checkpoint(path, ckpt)
    return path


def checkpoint_kinds(
    step: int, max_steps: int, save_interval: int, epoch_done: bool, stopped: bool
) -> list[str]:
    """Which checkpoints to write after `step`:

    "step"   every --save_interval steps, when a signal stops the run, and at the last step
             (unless that step ends an epoch, whose checkpoint is the last one then)
    "epoch"  at the end of each epoch
    """
    kinds = []
    interval = save_interval and step % save_interval == 0
    if interval or stopped or (step == max_steps and not epoch_done):
        kinds.append("step")
    if epoch_done:
        kinds.append("epoch")
    return kinds


def save_checkpoints(
    folder: Path,
    kinds: list[str],
    lowest: bool,
    tr: Trainer,
    state: TrainState,
    config: dict,
    tags: dict[str, dict[str, int]],
) -> Path | None:
    """The checkpoints the loop asks for: each of `kinds` ("step", "epoch"), then with `lowest` the
    last of them under the lowest-loss name too (linked, not written again), replacing the previous
    lowest-loss checkpoint (removed after), then pruning to the newest --keep_last step
    checkpoints. Returns the path of the last step or epoch checkpoint written. Reads the run's
    state; changes nothing in it. Sharded, every process calls it, and the first one's names and
    decisions are everyone's."""
    lora = bool(config["use_lora"])
    names = [checkpoint_path(folder, k, state.step, state.epoch, lora) for k in kinds]
    names = tr.dist.from_main(names) if tr.sharded else names
    for name in names:
        save_checkpoint(name, tr, state, config, tags)
    if not tr.dist.main or not names:
        return None
    if lowest:
        name = checkpoint_path(folder, "lowest", state.step, state.epoch, lora)
        link_checkpoint(names[-1], name)
        for old in folder.glob("*_step*_lowest_loss.pt"):
            if old != name:
                remove_checkpoint(old)
    if "step" in kinds:
        prune_step_checkpoints(folder, config["keep_last"])
    return names[-1]


# ---------------------------------------------------------------------------------------------
# Restoring
# ---------------------------------------------------------------------------------------------


def restore_checkpoint(ckpt: dict, path: Path, tr: Trainer, state: TrainState) -> None:
    """Put a run back exactly where a checkpoint left it."""
    lora = ckpt["lora"] is not None
    if lora != bool(get_lora_state_dict(tr.models)):
        raise CheckpointError(
            f"{path} was trained {'with' if lora else 'without'} --use_lora; resume with the "
            "flags it was trained with (resume_training.py --auto DIR does this)"
        )
    if ckpt.get("sharded"):  # the weights, the optimizer's state and the EMA from the shards
        kept = ckpt["config"].get("use_ema")  # (if the run had none, the EMA starts anew)
        ema = tr.ema.shadow if tr.ema is not None and kept else None
        load_sharded(beside(path, ckpt["sharded"]), tr.unet, tr.optimizer, ema)
    elif tr.sharded:
        raise CheckpointError(
            f"{path} was saved without --fsdp; resume it without --fsdp (its optimizer state is "
            "whole, a sharded run reads shards)"
        )
    else:
        if lora:
            load_lora_state_dict(tr.models, ckpt["lora"])
        else:
            dtype = next(tr.unet.parameters()).dtype
            tr.unet.load_state_dict(unet_weights(ckpt, path, dtype, tr.device))
        tr.optimizer.load_state_dict(ckpt["optimizer"])
    tensor_learning_rates(tr.optimizer, tr.device)  # the saved learning rates may be floats
    tr.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    tr.step.scaler.load_state_dict(ckpt["scaler"])
    if tr.ema is not None and ckpt["ema"] is not None:
        tr.ema.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"])
    state.step, state.epoch, state.position = ckpt["step"], ckpt["epoch"], ckpt["position"]
    state.smoothed_loss, state.best_loss = ckpt["smoothed_loss"], ckpt["best_loss"]
