"""Checkpoints, atomic writes, metrics logging and the learning-rate schedule."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from sdxl.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be read."""


# ---------------------------------------------------------------------------------------------
# Atomic files: written to a temporary name, then renamed into place
# ---------------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint, loaded with weights_only=True (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {type(e).__name__}"
        ) from None
    if not isinstance(ckpt, dict) or "step" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint of this project")
    return ckpt


def checkpoint_lora_modules(
    ckpt: dict, ema: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A LoRA checkpoint's adapters as (down, up, alpha) per module path, from the live weights or
    (ema=True) their moving averages."""
    weights = ckpt["lora"]
    if ema:
        if ckpt.get("ema") is None:
            raise CheckpointError(
                "this checkpoint has no EMA weights (it was trained without --use_ema)"
            )
        weights = ckpt["ema"]["shadow"]
    alpha = float(ckpt["lora_config"]["alpha"])
    return {
        key.removesuffix(".lora.down.weight"): (
            down,
            weights[key.replace(".lora.down.", ".lora.up.")],
            alpha,
        )
        for key, down in weights.items()
        if key.endswith(".lora.down.weight")
    }


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d_%H%M%S")


def prune_step_checkpoints(output_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step checkpoints (epoch and lowest-loss ones are never pruned)."""
    if keep_last <= 0:
        return
    steps = sorted(
        p for p in output_dir.glob("lora_step*.pt") if not p.stem.endswith("_lowest_loss")
    )
    for old in steps[:-keep_last]:
        unet_file = old.with_name(old.stem.replace("lora_", "unet_", 1) + ".safetensors")
        old.unlink()
        unet_file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Random state
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The global generators' states (per-sample randomness is seeded from sample ids instead)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base learning rate at optimizer step s: linear warm-up, then constant,
    linear decay to 0, or cosine decay to 0."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown lr scheduler {kind!r}")
    return f


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """Always a local JSONL file (one object per optimizer step); W&B too when a project is given.
    With no path (a data-parallel process other than the first) it writes nothing."""

    def __init__(
        self, path: Path | None, wandb_project: str | None = None, config: dict | None = None
    ):
        self.file = open(path, "a") if path is not None else None
        self.wandb = None
        if wandb_project and path is not None:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(path.parent))

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in record.items() if k != "step"}, step=record.get("step")
            )

    def log_image(self, name: str, path: Path, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
