"""Reading safetensors files tensor by tensor, and strict loading into meta-built models.

The reader converts each tensor to the requested dtype and device as it is read, so loading an fp32
file into a bf16 model never holds more than one fp32 tensor at a time (no full fp32 copy, and no
memory-mapped file pages kept resident).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from sdxl.errors import UserError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WeightsError(UserError, ValueError):
    """A weights file or folder that cannot be used; the message says what is wrong."""


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where tensor data starts."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            # The header's length comes first; a text file read this way gives absurd lengths.
            if n > path.stat().st_size - 8:
                raise ValueError(f"its header length {n} is larger than the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except (OSError, ValueError, struct.error) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    return header, 8 + n


class SafetensorsFile:
    """One safetensors file, read a tensor at a time with plain reads (not a memory map, whose pages
    would stay resident), each tensor cast to `dtype` (floating-point ones) and moved to `device`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self.start = read_safetensors_header(self.path)
        self.header.pop("__metadata__", None)

    def names(self) -> list[str]:
        """The tensors' names, in file order."""
        return sorted(self.header, key=lambda name: self.header[name]["data_offsets"][0])

    def read(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        info = self.header[name]
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(buf.numpy().data) != end - begin:
                raise WeightsError(f"{self.path}: file is truncated (tensor {name})")
        t = buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)


def read_safetensors(
    path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; floating-point ones are cast to `dtype` on the way in."""
    file = SafetensorsFile(path)
    return {name: file.read(name, dtype, device) for name in file.names()}


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise WeightsError naming the first missing, unexpected or mis-shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs expected {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (first: {'; '.join(wrong[:3])})")
    if problems:
        raise WeightsError(f"{what}: " + "; ".join(problems))


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Check keys and shapes, then load by assignment (the model may live on the meta device)."""
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True, assign=True)
