"""SDXL model folders: checking and loading the diffusers layout, and a tiny random SDXL.

The folder layout is the Hugging Face repository's (`uv run hf download stabilityai/stable-diffusion-xl-base-1.0
--local-dir weights/sdxl-base-1.0`): model_index.json, unet/, vae/, text_encoder/, text_encoder_2/,
tokenizer/, tokenizer_2/, scheduler/. `tiny` names a small SDXL with random weights in exactly that
layout, written once into a cache folder, so every script and test runs on a CPU in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxl.diffusion import NoiseSchedule
from sdxl.files import cache_root
from sdxl.options import DOWNLOAD_HINT
from sdxl.text_encoders import SDXLTextEncoder
from sdxl.unet import UNet2DConditionModel, config_from_diffusers, load_unet
from sdxl.vae import SDXLVAE
from sdxl.weights import WeightsError

SDXL_CONFIGS = Path(__file__).parent / "configs" / "sdxl-base-1.0"
TINY_VERSION = 1

# What each component folder must hold (any one of the alternatives).
_REQUIRED: dict[str, list[list[str]]] = {
    ".": [["model_index.json"]],
    "unet": [
        ["config.json"],
        ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"],
    ],
    "vae": [
        ["config.json"],
        ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"],
    ],
    "text_encoder": [["config.json"], ["model.safetensors", "model.fp16.safetensors"]],
    "text_encoder_2": [["config.json"], ["model.safetensors", "model.fp16.safetensors"]],
    "tokenizer": [["vocab.json"], ["merges.txt"], ["tokenizer_config.json"]],
    "tokenizer_2": [["vocab.json"], ["merges.txt"], ["tokenizer_config.json"]],
    "scheduler": [["scheduler_config.json"]],
}


def resolve_model(name: str | Path) -> Path:
    """`tiny` -> the cached tiny SDXL (built on first use); anything else -> a checked folder."""
    if str(name) == "tiny":
        return tiny_sdxl()
    folder = Path(name)
    check_model_folder(folder)
    return folder


def check_model_folder(folder: Path) -> None:
    """Fail before any heavy work, with one line naming what is missing."""
    if not folder.is_dir():
        raise WeightsError(f"model folder {folder} does not exist; {DOWNLOAD_HINT}")
    for sub, groups in _REQUIRED.items():
        for alternatives in groups:
            if not any((folder / sub / f).is_file() for f in alternatives):
                where = folder / sub / alternatives[0] if sub != "." else folder / alternatives[0]
                raise WeightsError(
                    f"model folder {folder} is incomplete: {where} is missing; {DOWNLOAD_HINT}"
                )


@dataclass
class SDXLParts:
    """What a training or generation run loads from a model folder."""

    unet: UNet2DConditionModel
    text_encoder: SDXLTextEncoder
    vae: SDXLVAE
    schedule: NoiseSchedule
    folder: Path
    vae_folder: Path


def load_sdxl(
    folder: Path,
    unet_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    text_dtype: torch.dtype | None = None,
    vae_folder: Path | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool | None = None,
) -> SDXLParts:
    """Every component of a checked SDXL folder: UNet in `unet_dtype`, VAE in fp32, text encoders in
    fp16 on CUDA (fp32 on the CPU) unless `text_dtype` says otherwise. The noise schedule follows
    the folder's scheduler config, with the prediction type and zero terminal SNR overridden when
    given (a v-prediction fine-tune's config may not say so)."""
    index = json.loads((folder / "model_index.json").read_text())
    vae_folder = Path(vae_folder or folder / "vae")
    return SDXLParts(
        unet=load_unet(folder / "unet", unet_dtype, device),
        text_encoder=SDXLTextEncoder.from_pretrained(
            folder, text_dtype, device, bool(index.get("force_zeros_for_empty_prompt", True))
        ),
        vae=SDXLVAE.from_pretrained(vae_folder, torch.float32, device),
        schedule=NoiseSchedule.from_config(
            folder / "scheduler" / "scheduler_config.json", prediction_type, zero_terminal_snr
        ),
        folder=folder,
        vae_folder=vae_folder,
    )


# ---------------------------------------------------------------------------------------------
# The tiny SDXL
# ---------------------------------------------------------------------------------------------


def tiny_cache_dir() -> Path:
    return cache_root() / f"tiny-sdxl-v{TINY_VERSION}"


def tiny_sdxl() -> Path:
    """The tiny SDXL folder in the cache, written on first use."""
    folder = tiny_cache_dir()
    if not (folder / "model_index.json").is_file():
        write_tiny_sdxl(folder)
    return folder


def clip_byte_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP-format BPE vocabulary with no merges: the 256 byte symbols of CLIP's byte-to-unicode
    table, the same with the end-of-word mark, then <|startoftext|> and <|endoftext|> (which must be
    the largest id: the pooled token is found by argmax over ids). "!" is id 0, SDXL's tokenizer_2 pad.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = [chr(b) for b in printable]
    n = 0
    for b in range(256):
        if b not in printable:
            symbols.append(chr(256 + n))
            n += 1
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, ["#version: 0.2"]


def tiny_configs(vocab_size: int) -> dict[str, dict]:
    """SDXL's configs with small widths: text encoders 32 + 64 wide (context 96, pooled 64)."""
    unet = json.loads((SDXL_CONFIGS / "unet" / "config.json").read_text())
    unet.update(
        block_out_channels=[32, 64, 64],
        transformer_layers_per_block=[1, 1, 2],
        attention_head_dim=[1, 2, 2],
        cross_attention_dim=96,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=64 + 6 * 8,
        norm_num_groups=8,
        sample_size=8,
    )
    vae = json.loads((SDXL_CONFIGS / "vae" / "config.json").read_text())
    vae.update(
        block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64
    )
    vae.pop("_name_or_path", None)
    text = {
        "vocab_size": vocab_size,
        "max_position_embeddings": 77,
        "num_hidden_layers": 2,
        "eos_token_id": 2,  # SDXL's legacy value: the pooled token is the argmax id (<|endoftext|>)
        "bos_token_id": 0,
        "pad_token_id": 1,
    }
    te1 = dict(
        text,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        hidden_act="quick_gelu",
        projection_dim=32,
    )
    te2 = dict(
        text,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        hidden_act="gelu",
        projection_dim=64,
    )
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}


def write_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Write a complete tiny SDXL folder (random weights from `seed`), atomically."""
    return write_random_sdxl(folder, tiny_configs(len(clip_byte_vocab()[0])), seed)


def write_random_sdxl(folder: Path, configs: dict[str, dict], seed: int = 0) -> Path:
    """Write an SDXL-layout folder with random weights for the given component configs (as
    `tiny_configs` returns), atomically."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    torch.manual_seed(seed)
    vocab, merges = clip_byte_vocab()

    for name in ("tokenizer", "tokenizer_2"):
        (tmp / name).mkdir()
        shutil.copy(SDXL_CONFIGS / name / "tokenizer_config.json", tmp / name)
        shutil.copy(SDXL_CONFIGS / name / "special_tokens_map.json", tmp / name)
        (tmp / name / "vocab.json").write_text(json.dumps(vocab))
        (tmp / name / "merges.txt").write_text("\n".join(merges) + "\n")
    (tmp / "scheduler").mkdir()
    shutil.copy(SDXL_CONFIGS / "scheduler" / "scheduler_config.json", tmp / "scheduler")
    shutil.copy(SDXL_CONFIGS / "model_index.json", tmp)

    unet = UNet2DConditionModel(config_from_diffusers(configs["unet"]))
    with torch.no_grad():
        # Non-trivial norms and biases, so that parity tests see every weight.
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    (tmp / "unet").mkdir()
    (tmp / "unet" / "config.json").write_text(json.dumps(configs["unet"], indent=2))
    save_file(unet.state_dict(), tmp / "unet" / "diffusion_pytorch_model.safetensors")

    AutoencoderKL(
        **{k: v for k, v in configs["vae"].items() if not k.startswith("_")}
    ).save_pretrained(tmp / "vae")
    CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).save_pretrained(tmp / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])).save_pretrained(
        tmp / "text_encoder_2"
    )

    if folder.exists():  # a concurrent writer got there first; keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    return folder
