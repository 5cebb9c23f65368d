"""Metrics logging, stopping on a signal, and the global random state."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from sdxl.files import atomic_write, write_error

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
# Metrics
# ---------------------------------------------------------------------------------------------


def _step(line: str) -> float:
    """A metrics line's step (a line cut short by a crash counts as after every step)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def write_lines(path: Path, lines: list[str]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


class MetricsLog:
    """Always a local JSONL file (one object per optimizer step); W&B and TensorBoard too when
    asked. With no path (a data-parallel process other than the first) it writes nothing.

    A resumed run continues the same records: the JSONL file drops the lines after the resumed
    step, and TensorBoard's writer marks the steps after it as purged, so that its reader shows
    each step once, as the resumed run logged it."""

    def __init__(
        self,
        path: Path | None,
        wandb_project: str | None = None,
        config: dict | None = None,
        resumed_at: int = 0,
        tensorboard_dir: Path | None = None,
    ):
        if path is not None and path.is_file():  # a resumed run's file: drop what followed its step
            write_lines(path, [r for r in path.read_text().splitlines() if _step(r) <= resumed_at])
        self.file = open(path, "a") if path is not None else None
        self.wandb = None
        if wandb_project and path is not None:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(path.parent))
        self.tensorboard = None
        if tensorboard_dir is not None and path is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=resumed_at + 1)

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as e:
                raise write_error(e, Path(self.file.name)) or e from None
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in record.items() if k != "step"}, step=record.get("step")
            )
        if self.tensorboard is not None:
            for name, value in record.items():
                if name not in ("step", "time"):
                    self.tensorboard.add_scalar(name, value, record["step"], record["time"])
            self.tensorboard.flush()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_image(self, name: str, path: Path, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(str(path))}, step=step)
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
            self.tensorboard.add_image(name, pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


# ---------------------------------------------------------------------------------------------
# Stopping on a signal
# ---------------------------------------------------------------------------------------------


class Timer:
    """Images per second of each step, from the time since the previous call."""

    def __init__(self) -> None:
        self.tick = time.perf_counter()

    def images_per_s(self, images: int) -> float:
        tock, self.tick = self.tick, time.perf_counter()
        return images / (self.tick - tock)


class StopSignals:
    """Inside the `with` block, SIGINT (Ctrl-C) and SIGTERM are recorded instead of ending the
    process, so that the loop can finish its step, save, and stop."""

    def __init__(self) -> None:
        self.received: int | None = None

    def _record(self, signum: int, _frame: object) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        self._previous = {
            s: signal.signal(s, self._record) for s in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
