"""SDXL from one file: the original (SGM) layout of Civitai-style checkpoints and fine-tunes.

A single-file SDXL checkpoint holds all four parts under the names of Stability's original code:

    model.diffusion_model.*                the UNet (input_blocks / middle_block / output_blocks)
    conditioner.embedders.0.transformer.*  CLIP ViT-L, as transformers names it
    conditioner.embedders.1.model.*        OpenCLIP ViT-bigG, as open_clip names it
    first_stage_model.*                    the VAE

diffusers' converters (`diffusers.loaders.single_file_utils`) rename each part to the diffusers
layout when a file is read; no hand-written table is involved. Writing one (`write_single_file`:
a full fine-tune's or a merged model's, for ComfyUI, AUTOMATIC1111 and Forge) maps the names the
other way by hand (`sgm_state_dict`), independently of those converters, so that reading a written
file back checks the writer. The file carries no configs and no tokenizers: those
come from the SDXL configs the project ships (`sdxl/configs/sdxl-base-1.0`, with OpenAI's CLIP
vocabulary), so loading never touches the network.

Memory: the file is read lazily, one tensor at a time as a converter asks for it, cast to the dtype
of the part it belongs to, so the whole file is never in memory at once; a part's tensors go into
its model without a second copy (the text encoders are copied once by transformers' loader).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdxl.text_encoders import SDXLTextEncoder
from sdxl.unet import UNet2DConditionModel, config_from_diffusers
from sdxl.weights import SafetensorsFile, WeightsError, load_state_dict_strict

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer."
CLIP_G = "conditioner.embedders.1.model."
VAE = "first_stage_model."
# What diffusers' detector calls the models that are not SDXL base, for the one-line error.
OTHER_MODELS = {
    "v1": "Stable Diffusion 1.x",
    "v2": "Stable Diffusion 2.x",
    "inpainting": "a Stable Diffusion 1.x inpainting model",
    "inpainting_v2": "a Stable Diffusion 2.x inpainting model",
    "xl_refiner": "the SDXL refiner (it needs the base model's UNet)",
    "xl_inpaint": "an SDXL inpainting model (9 input channels)",
    "playground-v2-5": "Playground v2.5",
    "sd3": "Stable Diffusion 3",
    "sd35_medium": "Stable Diffusion 3.5 Medium",
    "sd35_large": "Stable Diffusion 3.5 Large",
    "flux-dev": "Flux",
    "flux-schnell": "Flux",
    "flux-fill": "Flux",
    "flux-depth": "Flux",
}


class LazyCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of a single-file checkpoint, read when asked for and cast to `dtype` (floating
    point ones) on `device`. A .safetensors file is read a tensor at a time (sdxl/weights.py); a
    .ckpt / .pt file is memory-mapped with torch.load(weights_only=True), its `state_dict` wrapper
    unwrapped."""

    def __init__(
        self, path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ):
        self.path, self.dtype, self.device = path, dtype, device
        if path.suffix == ".safetensors":
            self.file = SafetensorsFile(path)
            self.names = self.file.names()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self.state = state.get("state_dict", state) if isinstance(state, dict) else {}
            self.names = [k for k, v in self.state.items() if isinstance(v, torch.Tensor)]
        self.known = set(self.names)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.known:
            raise KeyError(key)
        if self.path.suffix == ".safetensors":
            return self.file.read(key, self.dtype, self.device)
        t = self.state[key]
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, key: object) -> bool:
        return key in self.known


def open_checkpoint(path: Path, dtype: torch.dtype | None = None, device="cpu") -> LazyCheckpoint:
    """A single file, checked to be an SDXL base checkpoint: anything else is a one-line error
    that names what it looks like."""
    try:
        ckpt = LazyCheckpoint(path, dtype, device)
    except Exception as e:
        raise WeightsError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    names = ckpt.names
    if any("lora" in k for k in names[:1000]):
        raise WeightsError(f"{path} is a LoRA, not a model; load it with --lora-checkpoint")
    kind = infer_diffusers_model_type(ckpt)  # its fallback, "v1", is also its answer for unknowns
    sdxl = (
        "model.diffusion_model.label_emb.0.0.weight" in ckpt
        and f"{CLIP_L}text_model.final_layer_norm.weight" in ckpt
        and f"{CLIP_G}ln_final.weight" in ckpt
    )
    if kind == "xl_base" or (kind == "v1" and sdxl):
        return ckpt
    looks = OTHER_MODELS.get(kind, kind)
    if kind == "v1" and not any(k.startswith("model.diffusion_model.") for k in names):
        looks = "no Stable Diffusion model we know (no model.diffusion_model.* UNet)"
    raise WeightsError(f"{path} is not an SDXL base checkpoint: it looks like {looks}")


def load_unet_file(
    path: Path, configs: Path, dtype: torch.dtype, device="cpu"
) -> UNet2DConditionModel:
    """The UNet of a single file, built on the meta device and loaded strictly, by assignment."""
    config = json.loads((configs / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(config_from_diffusers(config))
    state = convert_ldm_unet_checkpoint(open_checkpoint(path, dtype, device), config)
    load_state_dict_strict(unet, state, f"UNet of {path}")
    return unet


def load_text_encoder_file(
    path: Path, configs: Path, dtype: torch.dtype, device="cpu", force_zeros: bool = True
) -> SDXLTextEncoder:
    """Both text encoders of a single file, with the shipped tokenizers and configs."""
    ckpt = open_checkpoint(path, dtype)
    config_1 = CLIPTextConfig.from_pretrained(configs / "text_encoder")
    config_2 = CLIPTextConfig.from_pretrained(configs / "text_encoder_2")
    state_1 = convert_ldm_clip_checkpoint(ckpt, remove_prefix=CLIP_L)
    # position_ids is a buffer transformers makes itself; some files carry it, some do not.
    state_1.pop("text_model.embeddings.position_ids", None)
    with torch.device("meta"):
        shape_of_2 = CLIPTextModelWithProjection(config_2)  # the converter reads its config
    state_2 = convert_open_clip_checkpoint(shape_of_2, ckpt, prefix=CLIP_G)
    return SDXLTextEncoder(
        CLIPTokenizer.from_pretrained(configs / "tokenizer"),
        CLIPTokenizer.from_pretrained(configs / "tokenizer_2"),
        _from_state(CLIPTextModel, config_1, state_1, dtype, f"text encoder 1 of {path}").to(
            device
        ),
        _from_state(
            CLIPTextModelWithProjection, config_2, state_2, dtype, f"text encoder 2 of {path}"
        ).to(device),
        force_zeros,
    )


def _from_state(cls, config, state: dict, dtype: torch.dtype, what: str):
    """A transformers model from a converted state dict; every key must match (transformers maps
    the `text_model.` names its version no longer uses, as it does for a model folder)."""
    model, info = cls.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
    )
    problems = {
        k: v
        for k, v in info.items()
        if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if problems:
        raise WeightsError(
            f"{what}: " + "; ".join(f"{k}: {sorted(v)[:3]}" for k, v in problems.items())
        )
    return model


def load_vae_file(path: Path, configs: Path, device="cpu") -> AutoencoderKL:
    """The VAE of a single file, in fp32 (the SDXL VAE overflows in fp16)."""
    config = json.loads((configs / "vae" / "config.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    state = convert_ldm_vae_checkpoint(open_checkpoint(path, torch.float32, device), config)
    load_state_dict_strict(vae, state, f"VAE of {path}")
    return vae


# ---------------------------------------------------------------------------------------------
# Writing: the diffusers layout -> the original names
# ---------------------------------------------------------------------------------------------


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
    rules: list[tuple[str, Callable[..., str]]] = [
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


def write_single_file(
    parts: dict[str, dict[str, torch.Tensor]],
    path: Path,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a model's four parts (diffusers-layout state dicts by name: unet, text_encoder,
    text_encoder_2, vae) as one SGM safetensors file, via a temporary name; `dtype` casts the
    floating-point tensors (the VAE's too, as single files hold it). Its metadata: Stability's
    model-spec keys (titled by the file's name), the project's mark, and `metadata`."""
    from safetensors.torch import save_file

    from sdxl.files import atomic_write
    from sdxl.lora_formats import WRITTEN_BY

    spec = {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": Path(path).stem,
            "modelspec.architecture": "stable-diffusion-xl-v1-base"}  # fmt: skip
    metadata = {**spec, **WRITTEN_BY, **(metadata or {})}
    layers_g = 1 + max(int(k.split(".")[3]) for k in parts["text_encoder_2"] if ".layers." in k)
    state = sgm_state_dict(
        parts["unet"], parts["text_encoder"], parts["text_encoder_2"], parts["vae"], layers_g
    )
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    return path
