"""Training checkpoints: their names, their contents, and every read and write of them.

A checkpoint is one `.pt` file (plain containers and tensors, loaded with `weights_only=True`) that
holds everything a run needs to continue exactly where it stopped: the trained weights (LoRA
adapters), optimizer, LR schedule, gradient scaler, EMA, random state, step / epoch / position in
the epoch, the smoothed and best loss, and the resolved configuration.

Names, in the run's --output_dir (`lora_` for LoRA runs, `full_` for full fine-tuning):

    lora_step000100_20261130_101500.pt    every --save_interval steps, at the end, and on a signal
    lora_epoch0003_20261130_101500.pt     after each epoch
    lora_step000100_lowest_loss.pt        the lowest tracked loss so far (only the newest is kept)

A full fine-tuning checkpoint keeps the UNet beside it as safetensors under the same name
(`full_step000100_<time>.safetensors`, diffusers key names) and records that name in `unet_file`.
Format version 1 named full fine-tuning checkpoints `lora_*` with the UNet in `unet_*.safetensors`;
they still load, and are pruned with their UNet file. Version 3 keys the adapters (and EMA) by
component, `unet.<path>.lora.*` and `text_encoder(_2).<path>.lora.*`, each adapter with its own
alpha; versions 1 and 2 (the UNet's adapters only, one alpha) are read as version 3.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxl.diffusion import NoiseSchedule
from sdxl.errors import UserError
from sdxl.files import TMP_SUFFIX, FolderLock, atomic_write, make_folder, remove_stale_tmp
from sdxl.lora import get_lora_state_dict, load_lora_state_dict
from sdxl.lora_formats import (
    LoRAModules,
    model_name,
    modules_from_state_dict,
    read_lora_file,
    save_lora_file,
    sharing_metadata,
)
from sdxl.unet import UNet2DConditionModel
from sdxl.weights import WeightsError, read_safetensors, read_safetensors_header
from training.optimizers import tensor_learning_rates
from training.scan import Record
from training.train_loop import Trainer, TrainState
from training.train_util import rng_state, set_rng_state

FORMAT_VERSION = 3
KINDS = ("step", "epoch", "lowest")


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the run."""


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def checkpoint_path(folder: Path, kind: str, state: TrainState, lora: bool) -> Path:
    prefix = "lora" if lora else "full"
    time = datetime.now().strftime("%Y%m%d_%H%M%S")
    name = {
        "step": f"{prefix}_step{state.step:06d}_{time}",
        "epoch": f"{prefix}_epoch{state.epoch:04d}_{time}",
        "lowest": f"{prefix}_step{state.step:06d}_lowest_loss",
    }[kind]
    return folder / f"{name}.pt"


def _companions(path: Path) -> list[Path]:
    """The files that belong to a checkpoint: the weights beside it (and the format-1 name)."""
    legacy = path.with_name("unet_" + path.stem.removeprefix("lora_") + ".safetensors")
    return [path.with_suffix(".safetensors"), legacy]


def _remove(path: Path) -> None:
    for p in [path, *_companions(path)]:
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The run's folder: one run per --output_dir
# ---------------------------------------------------------------------------------------------

# What a training run writes into its --output_dir, besides its lock and temporary files.
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "validation_step*.png",
    "wandb",
    *(f"{prefix}_*.{ext}" for prefix in ("lora", "full", "unet") for ext in ("pt", "safetensors")),
)


def claim_output_dir(folder: Path, resume: str | None, overwrite: bool) -> FolderLock:
    """Take --output_dir for this run, before anything is written there: create it, lock it (one
    run at a time), remove an interrupted run's temporary files, and make sure it holds no other
    run's files. A folder that holds a run is refused, unless this run resumes one of that run's
    checkpoints (it then continues the run, and metrics.jsonl continues from the checkpoint's step)
    or --overwrite is given (the old run's files are deleted first)."""
    make_folder(folder, "--output_dir")
    lock = FolderLock(folder, "--output_dir").acquire()
    if removed := remove_stale_tmp(folder):
        print(f"removed {removed} temporary files an interrupted run left in {folder}")
    existing = sorted({p for pattern in RUN_FILES for p in folder.glob(pattern)})
    continuing = resume is not None and Path(resume).resolve().parent == folder.resolve()
    if existing and not continuing:
        if not overwrite:
            lock.release()
            raise UserError(
                f"--output_dir {folder} holds another run ({len(existing)} files, e.g. "
                f"{existing[0].name}); choose another folder, --resume one of its checkpoints "
                "to continue it, or pass --overwrite to delete it first"
            )
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return lock


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def lora_file_metadata(
    config: dict, records: list[Record], schedule: NoiseSchedule
) -> dict[str, str]:
    """The metadata of the LoRA files written beside the checkpoints, but for their step and epoch:
    `sharing_metadata` from the run's configuration, and the counts of the captions' tags."""
    # kohya's ss_tag_frequency: per dataset folder (a "10_name" concept, or the data folder), how
    # often each tag occurs in its captions.
    frequency: dict[str, Counter] = {}
    for r in records:
        tags = [t.strip() for t in r.caption.split(",") if t.strip()]
        frequency.setdefault(r.concept or Path(config["data_dir"]).name, Counter()).update(tags)
    return {
        **sharing_metadata(
            rank=config["lora_rank"],
            alpha=config["lora_alpha"],
            base_model=config["pretrained_model"],
            resolution=config["image_size"],
            steps=0,
            epoch=0,
            learning_rate=config["learning_rate"],
            v_prediction=schedule.prediction_type == "v_prediction",
            tag_frequency={folder: dict(counts) for folder, counts in frequency.items()},
            title=Path(config["output_dir"]).name,
        ),
        "rank": str(config["lora_rank"]),
        "alpha": str(config["lora_alpha"]),
        "target_mode": config["lora_target_mode"],
        "base_model": model_name(config["pretrained_model"]),
    }


def save_checkpoint(
    path: Path, tr: Trainer, state: TrainState, config: dict, share: dict[str, str]
) -> Path:
    """Write one checkpoint, atomically, and beside it under the same name the weights to share:
    the LoRA in --lora_save_format (with `share` and the step in its metadata), or for full
    fine-tuning the UNet. `config` is the run's resolved configuration: plain values only, as
    weights_only loading requires."""
    lora = bool(config["use_lora"])
    ckpt = {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "epoch": state.epoch,
        "position": state.position,
        "smoothed_loss": state.smoothed_loss,
        "best_loss": state.best_loss,
        "lora": get_lora_state_dict(tr.models) if lora else None,
        "lora_config": (
            {
                "rank": config["lora_rank"],
                "alpha": config["lora_alpha"],
                "target_mode": config["lora_target_mode"],
            }
            if lora
            else None
        ),
        "unet_config": asdict(tr.unet.config),
        "unet_file": None,
        "optimizer": tr.optimizer.state_dict(),
        "lr_scheduler": tr.lr_scheduler.state_dict(),
        "scaler": tr.scaler.state_dict(),
        "ema": tr.ema.state_dict() if tr.ema is not None else None,
        "rng": rng_state(),
        "config": config,
        "base_model": config["base_model"],
        "lora_metadata": share if lora else None,  # what extract_lora_weights.py writes too
        "timestamp": datetime.now().isoformat(timespec="seconds"),
    }
    if not lora:  # the whole UNet goes beside the checkpoint, as safetensors
        unet_file = path.with_suffix(".safetensors")
        with atomic_write(unet_file) as tmp:
            save_file({k: v.contiguous() for k, v in tr.unet.state_dict().items()}, tmp)
        ckpt["unet_file"] = unet_file.name
    elif config["lora_save_format"] != "none":  # a LoRA ready for ComfyUI, AUTOMATIC1111, diffusers
        modules = modules_from_state_dict(ckpt["lora"])
        info: dict[str, str | int | float] = {**share, "step": state.step}
        info |= {"ss_steps": state.step, "ss_epoch": state.epoch}
        layers = tr.unet.config.layers_per_block
        save_lora_file(
            path.with_suffix(".safetensors"),
            modules,
            config["lora_save_format"],
            info,
            layers_per_block=layers,
        )
    with atomic_write(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def save_checkpoints(
    folder: Path,
    kinds: list[str],
    tr: Trainer,
    state: TrainState,
    config: dict,
    tracked_loss: float | None,
    keep_last: int,
    share: dict[str, str],
) -> Path:
    """The checkpoints a save event asks for ("step" and / or "epoch"); then, if `tracked_loss` is
    the lowest so far, a lowest-loss checkpoint that replaces the previous one (written before the
    old one is removed); then pruning to the newest `keep_last` step checkpoints. Returns the path
    of the last step or epoch checkpoint written."""
    lora = bool(config["use_lora"])
    improved = tracked_loss is not None and tracked_loss < state.best_loss
    if improved:
        state.best_loss = tracked_loss  # type: ignore[assignment]
    paths = [
        save_checkpoint(checkpoint_path(folder, k, state, lora), tr, state, config, share)
        for k in kinds
    ]
    if improved:
        lowest = save_checkpoint(
            checkpoint_path(folder, "lowest", state, lora), tr, state, config, share
        )
        for old in folder.glob("*_step*_lowest_loss.pt"):
            if old != lowest:
                _remove(old)
    if "step" in kinds:
        prune_step_checkpoints(folder, keep_last)
    return paths[-1]


def prune_step_checkpoints(folder: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step checkpoints (epoch and lowest-loss ones are never pruned)."""
    if keep_last <= 0:
        return
    steps = sorted(
        p
        for prefix in ("lora", "full")
        for p in folder.glob(f"{prefix}_step*.pt")
        if not p.stem.endswith("_lowest_loss")
    )
    for old in steps[:-keep_last]:
        _remove(old)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A training checkpoint, loaded with weights_only=True (tensors and plain containers only).
    With mmap the tensors are read from the file only when used (listing, exporting)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {type(e).__name__}"
        ) from None
    if not isinstance(ckpt, dict) or "step" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint of this project")
    if ckpt.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {ckpt['format_version']}, newer than this code reads "
            f"({FORMAT_VERSION}); update the project"
        )
    if ckpt.get("format_version", 1) < 3:
        _read_as_version_3(ckpt)
    return ckpt


def _read_as_version_3(ckpt: dict) -> None:
    """Versions 1 and 2 keyed the UNet's adapters and EMA without "unet." and kept one alpha in
    lora_config."""
    if ckpt.get("lora") is not None:
        alpha = torch.tensor(float(ckpt["lora_config"]["alpha"]))
        ckpt["lora"] = {f"unet.{k}": v for k, v in ckpt["lora"].items()}
        for key in [k for k in ckpt["lora"] if k.endswith(".lora.down.weight")]:
            ckpt["lora"][key.removesuffix("down.weight") + "alpha"] = alpha
    if ckpt.get("ema") is not None:
        ckpt["ema"]["shadow"] = {f"unet.{k}": v for k, v in ckpt["ema"]["shadow"].items()}


def find_checkpoints(folder: Path) -> list[tuple[Path, dict]]:
    """Every loadable checkpoint in the folder, oldest first by (step, file time). Unreadable ones
    (truncated by a crash, say) are skipped with a warning."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of checkpoints")
    if stale := len(list(folder.glob(f".*{TMP_SUFFIX}"))):
        print(
            f"warning: {folder} holds {stale} temporary files left by an interrupted write; "
            "the next training run into this folder removes them",
            file=sys.stderr,
        )
    found = []
    for path in sorted(folder.glob("*.pt")):
        try:
            found.append((path, load_checkpoint(path, mmap=True)))
        except CheckpointError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    if not found:
        raise UserError(f"no loadable training checkpoint (.pt) in {folder}")
    return sorted(found, key=lambda pc: (pc[1]["step"], pc[0].stat().st_mtime))


def restore_checkpoint(ckpt: dict, path: Path, tr: Trainer, state: TrainState) -> None:
    """Put a run back exactly where a checkpoint left it."""
    lora = ckpt["lora"] is not None
    if lora != bool(get_lora_state_dict(tr.models)):
        raise CheckpointError(
            f"{path} was trained {'with' if lora else 'without'} --use_lora; resume with the "
            "flags it was trained with (resume_training.py --auto DIR does this)"
        )
    if lora:
        load_lora_state_dict(tr.models, ckpt["lora"])
    else:
        tr.unet.load_state_dict(
            unet_weights(ckpt, path, next(tr.unet.parameters()).dtype, tr.device)
        )
    tr.optimizer.load_state_dict(ckpt["optimizer"])
    tensor_learning_rates(tr.optimizer, tr.device)  # the saved learning rates may be floats
    tr.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    tr.scaler.load_state_dict(ckpt["scaler"])
    if tr.ema is not None and ckpt["ema"] is not None:
        tr.ema.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"])
    state.step, state.epoch, state.position = ckpt["step"], ckpt["epoch"], ckpt["position"]
    state.smoothed_loss, state.best_loss = ckpt["smoothed_loss"], ckpt["best_loss"]


def adapter_modules(ckpt: dict, ema: bool = False) -> LoRAModules:
    """A LoRA checkpoint's adapters, from the live weights or (ema=True) their moving averages."""
    weights = ckpt["lora"]
    if ema:
        if ckpt.get("ema") is None:
            raise CheckpointError(
                "this checkpoint has no EMA weights (it was trained without --use_ema)"
            )
        weights = {**weights, **ckpt["ema"]["shadow"]}  # the alphas are not averaged
    return modules_from_state_dict(weights)


def unet_weights(
    ckpt: dict, path: Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """A full fine-tuning checkpoint's UNet state dict, from the safetensors file beside it."""
    return read_safetensors(Path(path).parent / ckpt["unet_file"], dtype, device)


# ---------------------------------------------------------------------------------------------
# What generation reads: a checkpoint or an exported LoRA file
# ---------------------------------------------------------------------------------------------


def read_lora_weights(
    path: str | Path, unet: UNet2DConditionModel
) -> LoRAModules | dict[str, torch.Tensor]:
    """A training checkpoint (.pt) or an exported LoRA safetensors file in any supported format ->
    LoRA modules; a full fine-tuning checkpoint -> the UNet state dict it references."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"LoRA file {path} does not exist")
    if path.suffix != ".pt":
        return read_lora_file(path, unet)
    ckpt = load_checkpoint(path, mmap=True)
    return adapter_modules(ckpt) if ckpt["lora"] is not None else unet_weights(ckpt, path)


def recorded_base_model(path: str | Path) -> str | None:
    """The base model folder a training checkpoint records (shared LoRA files name their base
    model but do not locate it)."""
    path = Path(path)
    if path.suffix == ".pt":
        return load_checkpoint(path, mmap=True).get("base_model")
    read_safetensors_header(path)  # a file that is not safetensors fails here, in one line
    return None
