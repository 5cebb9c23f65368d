"""LoRA files other programs load, and loading theirs into our UNet.

Every format goes through one plain representation, keyed by the diffusers module path:

    {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (down, up, alpha), ...}

with down (rank x in), up (out x rank) and the update scale alpha / rank. The file layouts:

- native: our state dict, `<path>.lora.down.weight` / `<path>.lora.up.weight`; rank, alpha and target
  mode in the safetensors metadata.
- diffusers / peft: `unet.<path>.lora_A.weight` / `.lora_B.weight`, with the peft LoraConfig (r,
  lora_alpha, target_modules) in the `lora_adapter_metadata` header that `load_lora_weights` reads.
  Reading also accepts the older `.lora.down.weight` / `.lora.up.weight` names; without metadata
  alpha = rank, as diffusers assumes.
- kohya (ComfyUI, AUTOMATIC1111, Forge): `lora_unet_<original SDXL path, dots as _>.lora_down.weight`,
  `.lora_up.weight` and a scalar `.alpha`, with the original `input_blocks` / `middle_block` /
  `output_blocks` names. Reading also accepts kohya keys built from diffusers block names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections import Counter
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from sdxl.files import atomic_write
from sdxl.lora import LoRAError, LoRALinearWrapper
from sdxl.options import LORA_FORMATS
from sdxl.unet import UNet2DConditionModel
from sdxl.weights import read_safetensors, read_safetensors_header

log = logging.getLogger(__name__)

LoRAModules = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
# In the metadata of every file the project writes for sharing, so that it can tell its own files.
WRITTEN_BY = {"written_by": "sdxl-lora"}


def modules_from_state_dict(
    weights: dict[str, torch.Tensor],
    alpha: float,
    suffixes: tuple[str, str] = (".lora.down.weight", ".lora.up.weight"),
) -> LoRAModules:
    """A state dict of `<path><down suffix>` / `<path><up suffix>` pairs (by default ours, as
    `get_lora_state_dict` returns it) -> LoRAModules, every adapter with the given alpha."""
    down, up = suffixes
    return {
        key.removesuffix(down): (value, weights[key.removesuffix(down) + up], alpha)
        for key, value in weights.items()
        if key.endswith(down)
    }


@torch.no_grad()
def attach_lora(unet: nn.Module, modules: LoRAModules, scale: float = 1.0) -> None:
    """Wrap exactly the named Linear layers with adapters holding the given weights; the update is
    multiplied by `scale` (a generation-time LoRA strength)."""
    unet.requires_grad_(False)
    own = dict(unet.named_modules())
    for name, (down, up, alpha) in modules.items():
        base = own.get(name)
        if type(base) is not nn.Linear:
            raise LoRAError(f"LoRA targets {name}, which is not a Linear layer of this UNet")
        if down.shape[1] != base.in_features or up.shape[0] != base.out_features:
            raise LoRAError(
                f"LoRA shape mismatch at {name}: file has down {tuple(down.shape)} / up {tuple(up.shape)}, "
                f"this model's layer is {base.in_features} -> {base.out_features} (another architecture?)"
            )
        wrapper = LoRALinearWrapper(base, rank=down.shape[0], alpha=alpha * scale)
        wrapper.lora.down.weight.copy_(down)
        wrapper.lora.up.weight.copy_(up)
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, wrapper)


# ---------------------------------------------------------------------------------------------
# Original (SGM) module names, for kohya files
# ---------------------------------------------------------------------------------------------


def sgm_path(path: str, layers_per_block: int) -> str:
    """diffusers module path -> original SDXL path. Each level has layers_per_block + 1 slots in
    input_blocks (ResNets/transformers, then the downsample), the first slot being conv_in; the
    transformer of a slot is its sub-module 1."""
    n = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"input_blocks.{n * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"output_blocks.{n * int(m[1]) + int(m[2])}.1.{m[3]}"
    raise LoRAError(f"no original SDXL name for {path}")


def kohya_names(unet: UNet2DConditionModel) -> dict[str, str]:
    """kohya module name -> diffusers path, for every Linear inside the UNet's transformers, under
    both the original block names and the diffusers block names."""
    layers = unet.config.layers_per_block
    names = {}
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, LoRALinearWrapper)) and ".attentions." in path:
            names["lora_unet_" + sgm_path(path, layers).replace(".", "_")] = path
            names["lora_unet_" + path.replace(".", "_")] = path
    return names


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def to_state_dict(modules: LoRAModules, fmt: str, layers_per_block: int = 2) -> tuple[dict, dict]:
    """(tensors, extra metadata) of one file format."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    if fmt == "native":
        for path, (down, up, _) in modules.items():
            tensors[f"{path}.lora.down.weight"] = down
            tensors[f"{path}.lora.up.weight"] = up
    elif fmt == "kohya":
        for path, (down, up, alpha) in modules.items():
            name = "lora_unet_" + sgm_path(path, layers_per_block).replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    elif fmt == "diffusers":
        for path, (down, up, _) in modules.items():
            tensors[f"unet.{path}.lora_A.weight"] = down
            tensors[f"unet.{path}.lora_B.weight"] = up
        ranks = Counter(d.shape[0] for d, _, _ in modules.values())
        alphas = Counter(a for _, _, a in modules.values())
        r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
        config = {
            "r": r,
            "lora_alpha": alpha,
            "target_modules": sorted(modules),
            "rank_pattern": {p: d.shape[0] for p, (d, _, _) in modules.items() if d.shape[0] != r},
            "alpha_pattern": {p: a for p, (_, _, a) in modules.items() if a != alpha},
        }
        # diffusers stores the peft LoraConfig of each component with the component's prefix.
        metadata["lora_adapter_metadata"] = json.dumps({f"unet.{k}": v for k, v in config.items()})
    else:
        raise LoRAError(f"unknown LoRA format {fmt!r}; choose one of {LORA_FORMATS}")
    return {k: v.contiguous() for k, v in tensors.items()}, metadata


def model_name(base_model: str | Path) -> str:
    """How shared files name a base model: a Hub id as it is, a folder or file by its own name,
    never by where it lies on the training machine."""
    text = str(base_model)
    return (
        text
        if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not Path(text).exists()
        else Path(text).name
    )


def sharing_metadata(
    *,
    rank: int,
    alpha: float,
    base_model: str,
    resolution: int,
    steps: int,
    epoch: int,
    learning_rate: float,
    v_prediction: bool = False,
    tag_frequency: dict[str, dict[str, int]] | None = None,
    title: str = "",
) -> dict[str, str]:
    """What other programs read from a LoRA file's metadata: kohya's `ss_*` keys (AUTOMATIC1111
    lists a LoRA under an SDXL checkpoint only when ss_base_model_version starts with sdxl_, and
    shows ss_tag_frequency) and Stability's model-spec keys. The base model is named, not located.
    """
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_v_parameterization": str(v_prediction),
        "ss_sd_model_name": model_name(base_model),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_learning_rate": str(learning_rate),
        "ss_tag_frequency": json.dumps(tag_frequency or {}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.date": datetime.now().strftime("%Y-%m-%d"),
    }


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """kohya's `sshs_model_hash`: the SHA-256 of the tensor data as safetensors lays it out (the
    bytes after the header), so that it does not change with the metadata."""
    data = safetensors_bytes(tensors)
    (header_length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header_length :]).hexdigest()


def save_lora_file(
    path: str | Path,
    modules: LoRAModules,
    fmt: str,
    info: dict[str, str | int | float],
    dtype: torch.dtype | None = None,
    layers_per_block: int = 2,
) -> None:
    """Write a safetensors LoRA file (via a temporary name, then renamed into place). `info` is
    recorded as metadata (`sharing_metadata`, and rank, alpha, target mode, step), with the hash of
    the tensors as written."""
    tensors, metadata = to_state_dict(modules, fmt, layers_per_block)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata.update({k: str(v) for k, v in info.items()})
    metadata.update(WRITTEN_BY)
    metadata["format"] = "pt"
    metadata["lora_format"] = fmt
    metadata["sshs_model_hash"] = tensors_hash(tensors)
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def detect_format(keys: list[str]) -> str:
    if keys and all(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder")) for k in keys):
        return "diffusers"
    if keys and all(".lora." in k for k in keys):
        return "native"
    raise LoRAError(
        f"not a LoRA file this project knows (first key: {keys[0] if keys else 'none'})"
    )


def from_state_dict(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], unet: UNet2DConditionModel
) -> LoRAModules:
    """Any of the three formats -> LoRAModules for this UNet. Text-encoder LoRAs are skipped with a
    warning (this project trains and applies UNet LoRAs only)."""
    fmt = detect_format(list(tensors))
    text = [k for k in tensors if k.startswith(("lora_te", "text_encoder"))]
    if text:
        log.warning(
            "skipping %d text-encoder LoRA tensors (only the UNet LoRA is applied)", len(text)
        )
    modules: LoRAModules = {}
    if fmt == "kohya":
        names = kohya_names(unet)
        for key, down in tensors.items():
            if not key.startswith("lora_unet_") or not key.endswith(".lora_down.weight"):
                continue
            name = key.removesuffix(".lora_down.weight")
            if name not in names:
                raise LoRAError(
                    f"LoRA module {name} does not exist in this UNet (another architecture?)"
                )
            alpha_tensor = tensors.get(f"{name}.alpha")
            modules[names[name]] = (
                down,
                tensors[f"{name}.lora_up.weight"],
                float(alpha_tensor) if alpha_tensor is not None else float(down.shape[0]),
            )
        return modules
    if fmt == "native":
        modules = modules_from_state_dict(tensors, 0.0)
        return {
            p: (d, u, float(metadata.get("alpha", d.shape[0]))) for p, (d, u, _) in modules.items()
        }
    config = {}
    if "lora_adapter_metadata" in metadata:
        raw = json.loads(metadata["lora_adapter_metadata"])
        config = {k.removeprefix("unet."): v for k, v in raw.items() if k.startswith("unet.")}
    unet_tensors = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    # peft's names, or the older ones diffusers also wrote
    for suffixes in (
        (".lora_A.weight", ".lora_B.weight"),
        (".lora.down.weight", ".lora.up.weight"),
    ):
        for path, (d, u, _) in modules_from_state_dict(unet_tensors, 0.0, suffixes).items():
            rank = d.shape[0]
            alpha = config.get("alpha_pattern", {}).get(path, config.get("lora_alpha", rank))
            modules[path] = (d, u, float(alpha))
    return modules


def read_lora_file(path: str | Path, unet: UNet2DConditionModel) -> LoRAModules:
    """Read a LoRA safetensors file in any of the three formats."""
    header, _ = read_safetensors_header(path)
    metadata = header.get("__metadata__", {})
    return from_state_dict(read_safetensors(path), metadata, unet)
