"""Write an SDXL model as one file in the original (SGM) layout, the inverse of diffusers' converters.

The project reads single files with diffusers' converters (sdxl/single_file.py). To test that
reader, and to measure it, the tests and the bench need such files, and SDXL weights cannot be
downloaded here; this writes one from any diffusers-layout model (the tiny SDXL, or full-size random
weights). It maps names in the other direction, independently of the converters it checks.

    uv run python bench/sgm_file.py --model tiny --output tiny-sdxl.safetensors
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UNET, CLIP_L, CLIP_G, VAE = (
    "model.diffusion_model.",
    "conditioner.embedders.0.transformer.",
    "conditioner.embedders.1.model.",
    "first_stage_model.",
)
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_name(key: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet key -> its SGM name (without the model.diffusion_model. prefix)."""
    n = layers_per_block + 1
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    module, _, param = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{param}"
    rules = [
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
            lambda b, j, s: f"input_blocks.{n * b + j + 1}.0.{_RESNET[s]}",
        ),
        (
            r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda b, j, s: f"input_blocks.{n * b + j + 1}.1.{s}",
        ),
        (
            r"down_blocks\.(\d+)\.downsamplers\.0\.conv",
            lambda b: f"input_blocks.{n * (b + 1)}.0.op",
        ),
        (r"mid_block\.resnets\.(\d+)\.(\w+)", lambda j, s: f"middle_block.{2 * j}.{_RESNET[s]}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda s: f"middle_block.1.{s}"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
            lambda b, j, s: f"output_blocks.{n * b + j}.0.{_RESNET[s]}",
        ),
        (
            r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda b, j, s: f"output_blocks.{n * b + j}.1.{s}",
        ),
        # The up path's levels 0 and 1 have attentions, so the upsampler is sub-module 2.
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv",
            lambda b: f"output_blocks.{n * b + n - 1}.2.conv",
        ),
    ]
    for pattern, name in rules:
        if m := re.fullmatch(pattern, module):
            groups = [int(g) if g.isdigit() else g for g in m.groups()]
            return f"{name(*groups)}.{param}"
    raise KeyError(f"no SGM name for UNet key {key}")


def vae_items(key: str, value: torch.Tensor, up_blocks: int = 4) -> tuple[str, torch.Tensor]:
    """A diffusers VAE key and tensor -> the LDM name and tensor (attention weights as 1x1 convs)."""
    name = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(
        r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name
    )
    # The decoder's up blocks are numbered from the other end.
    name = re.sub(
        r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
        lambda m: f"decoder.up.{up_blocks - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.",
        name,
    )
    name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
    attention = {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
    for ours, theirs in attention.items():
        name = name.replace(f"mid_block.attentions.0.{ours}.", f"mid.attn_1.{theirs}.")
    if ".attn_1." in name and value.ndim == 2:
        value = value[:, :, None, None]
    return name, value


def open_clip_items(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict -> open_clip's names."""
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
        "logit_scale": torch.tensor(4.6052),  # open_clip's, which SDXL files carry and do not use
    }
    for i in range(layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{ours}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(qkv)
            out[f"{theirs}attn.out_proj.{kind}"] = state[f"{ours}self_attn.out_proj.{kind}"]
            out[f"{theirs}ln_1.{kind}"] = state[f"{ours}layer_norm1.{kind}"]
            out[f"{theirs}ln_2.{kind}"] = state[f"{ours}layer_norm2.{kind}"]
            out[f"{theirs}mlp.c_fc.{kind}"] = state[f"{ours}mlp.fc1.{kind}"]
            out[f"{theirs}mlp.c_proj.{kind}"] = state[f"{ours}mlp.fc2.{kind}"]
    return out


def sgm_state_dict(unet: dict, clip_l: dict, clip_g: dict, vae: dict, layers_g: int) -> dict:
    """One SGM single-file state dict from the four parts' diffusers-layout state dicts."""
    state = {UNET + unet_name(k): v for k, v in unet.items()}
    # transformers 5 names CLIPTextModel's keys without the text_model. prefix that files use.
    state |= {CLIP_L + "text_model." + k.removeprefix("text_model."): v for k, v in clip_l.items()}
    state[CLIP_L + "text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as files carry
    state |= {CLIP_G + k: v for k, v in open_clip_items(clip_g, layers_g).items()}
    state |= {VAE + n: v for n, v in (vae_items(k, t) for k, t in vae.items())}
    return state


def write_sgm_file(folder: Path, path: Path, dtype: torch.dtype | None = None) -> Path:
    """Write the diffusers-layout model in `folder` as one SGM safetensors file."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdxl.unet import load_unet

    clip_g = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    state = sgm_state_dict(
        load_unet(folder / "unet").state_dict(),
        CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict(),
        clip_g.state_dict(),
        AutoencoderKL.from_pretrained(folder / "vae").state_dict(),
        clip_g.config.num_hidden_layers,
    )
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


if __name__ == "__main__":
    from sdxl.pretrained import resolve_model

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", help="a diffusers-layout SDXL folder, or tiny")
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    args = p.parse_args()
    print(write_sgm_file(resolve_model(args.model), Path(args.output)))
