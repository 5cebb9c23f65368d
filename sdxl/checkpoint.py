"""Training checkpoints as files: their names, their contents, every read and write of them, and what
generation reads from them. (Putting a run's state into one and back is training/checkpoint.py's.)

A checkpoint is one `.pt` file (plain containers and tensors, loaded with `weights_only=True`) that
holds everything a run needs to continue exactly where it stopped:

    format_version, step, epoch, position    where the run stands (position: samples of the epoch)
    smoothed_loss, best_loss
    lora          the adapters' state dict (None for full fine-tuning)
    unet_config   the UNet's architecture
    unet_file     full fine-tuning: the safetensors file beside it that holds the UNet (None for
                  LoRA): a single SGM file (UNet, text encoders, VAE), or the UNet alone
    sharded       --fsdp: the folder beside it (`name.dcp`) whose shards hold the UNet's weights,
                  the optimizer's state and the EMA (training/sharded.py); else None
    optimizer, lr_scheduler, scaler, ema, rng   (optimizer and ema None when sharded)
    config        the run's resolved configuration: its flags, paths made absolute, base_model
    tag_frequency the captions' tag counts per dataset folder (for the shared LoRA files' metadata)
    timestamp

Names, in the run's --output_dir (`lora_` for LoRA runs, `full_` for full fine-tuning):

    lora_step000100_20261130_101500.pt    every --save_interval steps, at the end, and on a signal
    lora_epoch0003_20261130_101500.pt     after each epoch
    lora_step000100_lowest_loss.pt        the lowest tracked loss so far (only the newest is kept)
                                          (the step's files linked under this name: no copy)

Beside each, under the same name, the weights to share: the LoRA in --lora_save_format, or the full
fine-tune as one SGM single file (UNet, both text encoders, VAE, in the original names: what
ComfyUI, AUTOMATIC1111 and Forge open as a model; --save_model_as sgm, the default), or its UNet
alone in diffusers' names (--save_model_as diffusers). Older formats are read as the current one
(`_read_as_current`): version 1 named full fine-tuning checkpoints `lora_*` with the UNet in
`unet_*.safetensors`; versions 1 and 2 keyed the UNet's adapters without `unet.` and kept one
alpha; versions 1 to 3 recorded the LoRA settings, the base model and the shared file's metadata
beside the config, which now says them once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxl.errors import UserError
from sdxl.files import TMP_SUFFIX, atomic_write, write_error
from sdxl.lora import Factors, LoRAModules
from sdxl.lora_formats import (
    WRITTEN_BY,
    model_name,
    modules_from_state_dict,
    read_lora_file,
    sharing_metadata,
)
from sdxl.unet import UNet2DConditionModel
from sdxl.weights import WeightsError, read_safetensors, read_safetensors_header

FORMAT_VERSION = 4


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the run."""


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def checkpoint_path(folder: Path, kind: str, step: int, epoch: int, lora: bool) -> Path:
    """The name of a "step", "epoch" or "lowest" checkpoint."""
    prefix = "lora" if lora else "full"
    time = datetime.now().strftime("%Y%m%d_%H%M%S")
    name = {
        "step": f"{prefix}_step{step:06d}_{time}",
        "epoch": f"{prefix}_epoch{epoch:04d}_{time}",
        "lowest": f"{prefix}_step{step:06d}_lowest_loss",
    }[kind]
    return folder / f"{name}.pt"


def remove_checkpoint(path: Path) -> None:
    """A checkpoint and the files that belong to it: the weights beside it, its shards (--fsdp),
    and the format-1 UNet name."""
    legacy = path.with_name("unet_" + path.stem.removeprefix("lora_") + ".safetensors")
    for p in (path, path.with_suffix(".safetensors"), legacy):
        p.unlink(missing_ok=True)
    shutil.rmtree(path.with_suffix(".dcp"), ignore_errors=True)  # --fsdp's shards


def link_checkpoint(source: Path, target: Path) -> None:
    """The checkpoint `source`, and the files beside it, under the name `target` too (a lowest-loss
    checkpoint is the step's own): hard links where the filesystem has them, so nothing is written
    twice, copies where not. Each file appears whole or not at all; the .pt, which marks a
    checkpoint complete, comes last. Readers find the files beside a checkpoint under its own name
    (`beside`)."""
    for suffix in (".safetensors", ".dcp", ".pt"):
        src, dst = source.with_suffix(suffix), target.with_suffix(suffix)
        if src.is_file():
            with atomic_write(dst) as tmp:
                tmp.unlink()
                _link(src, tmp)
        elif src.is_dir():  # --fsdp's shards
            tmp = dst.with_name(f".{dst.name}{TMP_SUFFIX}")
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp, copy_function=_link)
                shutil.rmtree(dst, ignore_errors=True)
                tmp.replace(dst)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise write_error(e, dst) or e from None


def _link(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # (no hard links here: a copy)
        shutil.copy2(src, dst)


def beside(path: Path, name: str) -> Path:
    """A file that belongs to the checkpoint `path`, recorded as `name` when it was written: the
    one under the checkpoint's own name (a linked checkpoint's, `link_checkpoint`), else the one
    recorded (format 1's unet_*.safetensors)."""
    own = path.with_suffix(Path(name).suffix)
    return own if own.exists() else path.parent / name


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
        remove_checkpoint(old)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_unet_file(path: Path, state: dict[str, torch.Tensor], info: dict) -> None:
    """A full UNet as safetensors in diffusers' key names: the one writer of such files (beside a
    full fine-tuning checkpoint, and extract_lora_weights.py's)."""
    metadata = {"format": "pt", **WRITTEN_BY, **{k: str(v) for k, v in info.items()}}
    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)


def write_checkpoint(path: Path, ckpt: dict) -> None:
    """Write one checkpoint (as the module docstring lists its contents), atomically."""
    ckpt = {"format_version": FORMAT_VERSION, **ckpt}
    ckpt["timestamp"] = datetime.now().isoformat(timespec="seconds")
    with atomic_write(path) as tmp:
        torch.save(ckpt, tmp)


def lora_metadata(ckpt: dict) -> dict[str, str | int | float]:
    """The metadata of a LoRA file made from this checkpoint, derived from what it records (the
    run's config, its step and the captions' tags): `sharing_metadata`'s keys and the step."""
    config = ckpt["config"]
    size = config["image_size"]
    resolution = (size, size) if isinstance(size, int) else tuple(size)
    rank, alpha = config["lora_rank"], config["lora_alpha"]
    network_args: dict[str, str] = {}
    if config.get("conv_rank"):
        conv_alpha = config.get("conv_alpha") or config["conv_rank"]
        network_args |= {
            "conv_dim": _number(config["conv_rank"]),
            "conv_alpha": _number(conv_alpha),
        }
    if dims := config.get("block_dims"):
        alphas = config.get("block_alphas") or dims
        network_args |= {"block_dims": ",".join(map(_number, dims))}
        network_args |= {"block_alphas": ",".join(map(_number, alphas))}
        largest = max(range(len(dims)), key=lambda k: dims[k])  # the rank the file mostly has
        rank, alpha = dims[largest], alphas[largest]
    kind = config.get("adapter") or ("dora" if config.get("use_dora") else "lora")
    if kind == "dora":
        network_args |= {"algo": "lora", "dora_wd": "True"}
    if kind in ("loha", "lokr"):  # as LyCORIS's kohya network writes them
        network_args = {"algo": kind} | network_args
    if kind == "lokr":
        network_args["factor"] = _number(config.get("lokr_factor", -1))
    target = config["lora_target_mode"] + ("+conv" if config.get("conv_rank") else "")
    return {
        **sharing_metadata(
            rank=rank,
            alpha=alpha,
            network_args=network_args,
            target_mode=target,
            base_model=config["pretrained_model"],
            resolution=resolution,
            steps=ckpt["step"],
            epoch=ckpt["epoch"],
            learning_rate=config["learning_rate"],
            unet_only=not config.get("train_text_encoder"),
            v_prediction=config.get("resolved_prediction_type") == "v_prediction",
            tag_frequency=ckpt.get("tag_frequency") or {},
            title=Path(config["output_dir"]).name,
        ),
        "step": ckpt["step"],
        "base_model": model_name(config["pretrained_model"]),
    }


def _number(value: float) -> str:
    """A network argument as kohya's command line would have it: 4, not 4.0."""
    return str(int(value)) if float(value).is_integer() else str(value)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A training checkpoint, loaded with weights_only=True (tensors and plain containers only), in
    the current format. With mmap the tensors are read from the file only when used (listing,
    exporting)."""
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
    version = ckpt.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this code reads "
            f"({FORMAT_VERSION}); update the project"
        )
    if version < FORMAT_VERSION:
        _read_as_current(ckpt, version)
    return ckpt


def _read_as_current(ckpt: dict, version: int) -> None:
    """Versions 1 and 2 keyed the UNet's adapters and EMA without "unet." and kept one alpha in
    lora_config; versions 1 to 3 kept base_model and the shared file's metadata beside config."""
    if version < 3 and ckpt.get("lora") is not None:
        alpha = torch.tensor(float(ckpt["lora_config"]["alpha"]))
        ckpt["lora"] = {f"unet.{k}": v for k, v in ckpt["lora"].items()}
        for key in [k for k in ckpt["lora"] if k.endswith(".lora.down.weight")]:
            ckpt["lora"][key.removesuffix("down.weight") + "alpha"] = alpha
    if version < 3 and ckpt.get("ema") is not None:
        ckpt["ema"]["shadow"] = {f"unet.{k}": v for k, v in ckpt["ema"]["shadow"].items()}
    ckpt["config"].setdefault("base_model", ckpt.pop("base_model", None))
    shared = ckpt.pop("lora_metadata", None) or {}
    ckpt["tag_frequency"] = json.loads(shared.get("ss_tag_frequency", "{}"))
    ckpt.pop("lora_config", None)
    ckpt["format_version"] = FORMAT_VERSION


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
    """A full fine-tuning checkpoint's UNet state dict (diffusers' names), from the file beside it:
    the single SGM file (--save_model_as sgm), or the UNet alone in diffusers' names."""
    from sdxl.single_file import UNET, unet_name
    from sdxl.unet import UNet2DConditionModel, UNetConfig
    from sdxl.weights import SafetensorsFile

    weights = beside(Path(path), ckpt["unet_file"])
    file = SafetensorsFile(weights)
    if not any(n.startswith(UNET) for n in file.names()):
        return read_safetensors(weights, dtype, device)
    config = ckpt["unet_config"]
    with torch.device("meta"):  # only for its key names
        keys = UNet2DConditionModel(UNetConfig(**config)).state_dict()
    layers = config["layers_per_block"]
    return {k: file.read(UNET + unet_name(k, layers), dtype, device) for k in keys}


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
        weights: LoRAModules | dict[str, torch.Tensor] = read_lora_file(path, unet)
    else:
        ckpt = load_checkpoint(path, mmap=True)
        weights = adapter_modules(ckpt) if ckpt["lora"] is not None else unet_weights(ckpt, path)
    for key, value in weights.items():
        if isinstance(value, torch.Tensor):
            tensors = [value]
        elif isinstance(value, Factors):
            tensors = list(value.tensors.values())
        else:
            tensors = [
                value.down,
                value.up,
                *([] if value.magnitude is None else [value.magnitude]),
            ]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise WeightsError(
                f"{path} holds NaN or Inf values (at {key}), which would make black images; "
                "use an earlier checkpoint of that run"
            )
    return weights


def recorded_base_model(path: str | Path) -> str | None:
    """The base model folder a training checkpoint records (shared LoRA files name their base
    model but do not locate it)."""
    path = Path(path)
    if path.suffix == ".pt":
        return load_checkpoint(path, mmap=True)["config"].get("base_model")
    read_safetensors_header(path)  # a file that is not safetensors fails here, in one line
    return None
