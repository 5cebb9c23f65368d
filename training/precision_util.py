"""The device and the precision policy, resolved once before training or generation.

- LoRA (and generation): the frozen UNet is stored in bf16 (or fp16) and the adapters in fp32 (see
  sdxl/lora.py), so no autocast is needed: each adapter casts its input up and its output back.
- Full fine-tuning: the UNet's trainable weights stay fp32 (master weights for AdamW) and the forward
  runs under autocast in bf16 / fp16.
- fp16 needs a gradient scaler (its range underflows small gradients); bf16 and fp32 do not, and the
  scaler is then a no-op.
- The VAE always runs in fp32 (the SDXL VAE overflows in fp16); the text encoders in fp16 on CUDA.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from sdxl.errors import UserError
from sdxl.options import PRECISIONS

DTYPES = dict(zip(PRECISIONS, (torch.bfloat16, torch.float16, torch.float32)))


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise UserError(
            f"--device {name!r} is not a device this project runs on; use cuda, cpu or auto"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


@dataclass(frozen=True)
class Precision:
    name: str
    device_type: str
    unet_dtype: torch.dtype  # how the UNet's weights are stored
    compute_dtype: torch.dtype  # the dtype of the UNet's inputs
    use_autocast: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.name])

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    @property
    def text_dtype(self) -> torch.dtype:
        return torch.float16 if self.device_type == "cuda" else torch.float32


def resolve_precision(name: str, device: torch.device, full_finetune: bool = False) -> Precision:
    """`auto` is bf16 on CUDA (fp32's range, so nothing overflows) and fp32 on the CPU (where bf16
    works but is slow on most CPUs). The same rule serves training and generation."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise UserError(f"unknown precision {name!r}; choose bf16, fp16 or fp32")
    low = DTYPES[name]
    if full_finetune:
        return Precision(
            name, device.type, torch.float32, torch.float32, use_autocast=name != "fp32"
        )
    return Precision(name, device.type, low, low, use_autocast=False)
