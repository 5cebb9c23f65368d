"""Names of SDXL's modules: the original (SGM) paths that kohya's and ComfyUI's names use, kohya's
block numbers, and the keys our adapters go by.

An adapter key is "<component>.<module path>", the component one of COMPONENTS. The text encoders'
paths are written with CLIP's `text_model.` level (`canonical`), as the weight files, kohya,
ComfyUI and diffusers have them, also where transformers 5 builds CLIPTextModel without it.
"""

from __future__ import annotations

import re
from typing import TypeVar

from sdxl.errors import UserError

T = TypeVar("T")

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class LoRAError(UserError, ValueError):
    """A LoRA file or option that does not fit the model."""


def split_component(key: str) -> tuple[str, str]:
    """ "unet.down_blocks..." -> ("unet", "down_blocks...")."""
    component, _, path = key.partition(".")
    if component not in COMPONENTS:
        raise LoRAError(f"adapter key {key} names no model part ({', '.join(COMPONENTS)})")
    return component, path


def canonical(key: str) -> str:
    """An adapter key as the files name it: CLIP's layers under `text_model.`, as the weight files,
    kohya, ComfyUI and diffusers have them (transformers 5 builds CLIPTextModel without that
    level)."""
    component, path = split_component(key)
    if component != "unet" and path.startswith("encoder."):
        return f"{component}.text_model.{path}"
    return key


def by_component(modules: dict[str, T]) -> dict[str, dict[str, T]]:
    """{"unet": {path: adapter}, "text_encoder": {...}, ...}, for the parts that have adapters."""
    parts: dict[str, dict[str, T]] = {}
    for key, adapter in modules.items():
        component, path = split_component(key)
        parts.setdefault(component, {})[path] = adapter
    return parts


_RESNET_SGM = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}


def sgm_path(path: str, layers_per_block: int) -> str:
    """diffusers UNet module path -> the original SDXL (SGM) path, which kohya's and ComfyUI's
    names use. Each level has layers_per_block + 1 slots in input_blocks (a ResNet and its
    transformer, then the downsample), input_blocks.0 being conv_in, and as many in output_blocks;
    in a slot the ResNet is sub-module 0, the transformer 1, an upsample the last (2: SDXL's
    upsampling levels all have transformers)."""
    n = layers_per_block + 1
    if path in _TOP_SGM:
        return _TOP_SGM[path]
    p = path.split(".")
    if p[0] == "mid_block":  # ResNet, transformer, ResNet: middle_block.0-2, no slots
        if p[1] == "attentions":
            return "middle_block.1." + ".".join(p[3:])
        if p[1] == "resnets" and len(p) == 4 and p[3] in _RESNET_SGM:
            return f"middle_block.{2 * int(p[2])}.{_RESNET_SGM[p[3]]}"
    elif p[0] in ("down_blocks", "up_blocks"):
        level, kind = int(p[1]), p[2]
        if kind == "downsamplers":
            return f"input_blocks.{n * (level + 1)}.0.op"
        if kind == "upsamplers":
            return f"output_blocks.{n * level + n - 1}.2.conv"
        down = p[0] == "down_blocks"
        slot = f"input_blocks.{n * level + int(p[3]) + 1}" if down else f"output_blocks.{n * level + int(p[3])}"  # fmt: skip
        if kind == "attentions":
            return f"{slot}.1." + ".".join(p[4:])
        if kind == "resnets" and len(p) == 5 and p[4] in _RESNET_SGM:
            return f"{slot}.0.{_RESNET_SGM[p[4]]}"
    raise LoRAError(f"no original SDXL name for {path}")


def block_index(sgm: str) -> int:
    """kohya's SDXL block number of an original module path, 0-22: 0 the time and label
    embeddings, 1-9 input_blocks.0-8, 10-12 middle_block.0-2, 13-21 output_blocks.0-8, 22 out."""
    if m := re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.", sgm):
        return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m[1]] + int(m[2])
    return 22 if sgm.startswith("out.") else 0
