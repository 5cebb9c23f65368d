"""SDXL base models as users have them, checked and loaded: a diffusers-layout folder, a single
file, a Hugging Face Hub id, or `tiny`.

- A folder in the Hugging Face repository's layout (`uv run hf download stabilityai/stable-diffusion-
  xl-base-1.0 --local-dir weights/sdxl-base-1.0`): model_index.json, unet/, vae/, text_encoder/,
  text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/.
- A single `.safetensors` (or `.ckpt`) file in the original SGM layout, as Civitai fine-tunes come:
  read by sdxl/single_file.py with the configs and tokenizers this project ships.
- A Hub id (`stabilityai/stable-diffusion-xl-base-1.0`, or a fine-tune's repo): downloaded into the
  usual Hugging Face cache (only the files the loader reads; the fp16 files for a half-precision
  run), or taken from that cache when offline (HF_HUB_OFFLINE=1).
- `tiny`: a small SDXL with random weights in exactly the folder layout, written once into a cache
  folder, so every script and test runs on a CPU in seconds.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from cli.choices import DOWNLOAD_HINT
from sdxl.diffusion import NoiseSchedule
from sdxl.files import cache_root, folder_identity
from sdxl.single_file import (
    SINGLE_FILE_SUFFIXES,
    load_text_encoder_file,
    load_unet_file,
    load_vae_file,
)
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


def resolve_model(name: str | Path, half: bool = False) -> Path:
    """The model's folder or single file: `tiny` -> the cached tiny SDXL (built on first use); an
    existing folder or single file -> itself, checked; a Hub id -> its snapshot in the Hugging Face
    cache (downloaded when needed; `half` prefers the fp16 files)."""
    if str(name) == "tiny":
        return tiny_sdxl()
    path = Path(name)
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise WeightsError(
                f"{path}: a single-file model is {' or '.join(SINGLE_FILE_SUFFIXES)}"
            )
        return path
    if not path.exists() and is_hub_id(str(name)):
        path = hub_snapshot(str(name), half)
    check_model_folder(path)
    return path


def config_folder(model: Path) -> Path:
    """Where a model's configs and tokenizers are: its folder, or for a single file (which carries
    none) the SDXL configs the project ships."""
    return model if model.is_dir() else SDXL_CONFIGS


def model_identity(model: Path) -> str:
    """A model's identity for the folders made with it: the configs, and the size, first and last
    MiB of each weight file (sdxl/files.py: folder_identity), of its four parts or its one file.
    A retrained or replaced model changes it; reading it takes milliseconds."""
    parts = ["unet", "vae", "text_encoder", "text_encoder_2"] if model.is_dir() else [""]
    return "".join(folder_identity(model / part if part else model) for part in parts)


def schedule_of(
    model: Path, prediction_type: str | None = None, zero_terminal_snr: bool | None = None
) -> NoiseSchedule:
    """The model's noise schedule, from its scheduler config (the shipped one for a single file),
    with the prediction type and zero terminal SNR overridden when given."""
    config = config_folder(model) / "scheduler" / "scheduler_config.json"
    return NoiseSchedule.from_config(config, prediction_type, zero_terminal_snr)


def meta_models(model: Path) -> dict[str, torch.nn.Module]:
    """The UNet and both text encoders of a model, built on the meta device from its configs (no
    weights): for checking that a LoRA fits before anything is loaded."""
    parts = config_parts(model)
    return {
        "unet": parts.unet,
        "text_encoder": parts.text_encoder.text_encoder,
        "text_encoder_2": parts.text_encoder.text_encoder_2,
    }


def model_configs(name: str) -> tuple[Path, str]:
    """Where the preflight reads the model's configs, and a note when it is not the model named:
    its folder (or for a single file, the shipped configs), else the shipped SDXL base configs."""
    path = Path(name)
    if name == "tiny":
        return tiny_sdxl(), ""
    if path.exists():
        return path, ""
    return SDXL_CONFIGS, f"(model {name} is not here: the shipped SDXL base configs are used)"


def config_parts(
    model: Path,
    unet_dtype: torch.dtype = torch.float32,
    text_dtype: torch.dtype = torch.float32,
    prediction_type: str | None = None,
    zero_terminal_snr: bool | None = None,
    vae_tile_size: int = 0,
    device: torch.device | str = "meta",
) -> SDXLParts:
    """Every part of a model (a folder, a single file, or only its configs) built from its configs
    on `device`, in the dtypes a run stores them in, without its weights: on the meta device, what
    the memory preflights trace (sdxl/memory.py); elsewhere, randomly initialised, what
    bench/gpu_report.py times. The tokenizers are real: prompts are tokenized on the host."""
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    configs = config_folder(model)
    unet_config = json.loads((configs / "unet" / "config.json").read_text())
    vae_config = json.loads((configs / "vae" / "config.json").read_text())
    with torch.device(device):
        unet = UNet2DConditionModel(config_from_diffusers(unet_config)).to(unet_dtype)
        text_1 = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
        text_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(configs / "text_encoder_2")
        )
        vae = AutoencoderKL(**{k: v for k, v in vae_config.items() if not k.startswith("_")})
    text_encoder = SDXLTextEncoder(
        CLIPTokenizer.from_pretrained(configs / "tokenizer"),
        CLIPTokenizer.from_pretrained(configs / "tokenizer_2"),
        text_1.to(text_dtype),
        text_2.to(text_dtype),
    )
    return SDXLParts(
        unet=unet,
        text_encoder=text_encoder,
        vae=SDXLVAE(vae, vae_tile_size),
        schedule=schedule_of(model, prediction_type, zero_terminal_snr),
        text_sources=(),
        vae_source=model,
    )


def is_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


# Files of a diffusers-layout repository the loader reads (none of the .bin, .ckpt or ONNX copies).
_HUB_FILES = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer*/*"]
_HUB_WEIGHTS = {
    False: [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder*/model.safetensors",
    ],
    True: [
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder*/model.fp16.safetensors",
    ],
}


def hub_snapshot(repo: str, half: bool) -> Path:
    """A Hub repository's files in the Hugging Face cache: fetched with huggingface_hub (with its
    progress bars) unless they are there already, or, without a network or with HF_HUB_OFFLINE=1,
    taken from the cache. The fp16 weights for a half-precision run, the fp32 ones otherwise (and
    when a repository has no fp16 files)."""
    from huggingface_hub import snapshot_download

    hint = (
        f"there is no folder {repo} here either: give an existing model folder, or a Hub id "
        f"(owner/name) and a network (or uv run hf download {repo} where there is one)"
    )
    for variant in (half, False):
        patterns = _HUB_FILES + _HUB_WEIGHTS[variant]
        try:
            folder = Path(snapshot_download(repo, allow_patterns=patterns))
        except Exception as online_error:
            try:
                folder = Path(
                    snapshot_download(repo, allow_patterns=patterns, local_files_only=True)
                )
            except Exception:
                raise WeightsError(
                    f"Hub model {repo} is not in the Hugging Face cache and cannot be fetched "
                    f"({type(online_error).__name__}); {hint}"
                ) from None
        try:
            check_model_folder(folder)
            return folder
        except WeightsError:
            continue  # no fp16 files: fetch the fp32 ones
    raise WeightsError(f"Hub model {repo} is not an SDXL model in the diffusers layout; {hint}")


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
    """What a training or generation run loads from a model, and where each part came from (the
    caches key their entries by those files)."""

    unet: UNet2DConditionModel
    text_encoder: SDXLTextEncoder
    vae: SDXLVAE
    schedule: NoiseSchedule
    text_sources: tuple[Path, ...]  # the text encoders' folders, or the single file
    vae_source: Path  # the VAE's folder, or the single file


def load_sdxl(
    folder: Path,
    unet_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    text_dtype: torch.dtype | None = None,
    vae_folder: Path | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool | None = None,
    vae_tile_size: int = 0,
) -> SDXLParts:
    """Every component of a checked SDXL folder or single file: UNet in `unet_dtype`, VAE in fp32,
    text encoders in fp16 on CUDA (fp32 on the CPU) unless `text_dtype` says otherwise. The noise
    schedule follows the scheduler config (the shipped one for a single file), with the prediction
    type and zero terminal SNR overridden when given (a v-prediction fine-tune may not say so).
    The VAE tiles images above `vae_tile_size` pixels (0: never; see sdxl/vae.py)."""
    if text_dtype is None:
        text_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    configs = config_folder(folder)
    index = json.loads((configs / "model_index.json").read_text())
    zeros = bool(index.get("force_zeros_for_empty_prompt", True))
    if folder.is_dir():
        unet = load_unet(folder / "unet", unet_dtype, device)
        text_encoder = SDXLTextEncoder.from_pretrained(folder, text_dtype, device, zeros)
        text_sources: tuple[Path, ...] = (folder / "text_encoder", folder / "text_encoder_2")
    else:
        unet = load_unet_file(folder, configs, unet_dtype, device)
        text_encoder = load_text_encoder_file(folder, configs, text_dtype, device, zeros)
        text_sources = (folder,)
    if vae_folder is not None or folder.is_dir():
        vae_source = Path(vae_folder or folder / "vae")
        vae = SDXLVAE.from_pretrained(vae_source, torch.float32, device)
    else:
        vae_source, vae = folder, SDXLVAE(load_vae_file(folder, configs, device))
    vae.set_tile_size(vae_tile_size)
    return SDXLParts(
        unet=unet,
        text_encoder=text_encoder,
        vae=vae,
        schedule=schedule_of(folder, prediction_type, zero_terminal_snr),
        text_sources=text_sources,
        vae_source=vae_source,
    )


@functools.lru_cache(maxsize=1)
def frozen_parts(model: str, vae: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The weights a full fine-tune leaves as they are, read once from its base model (a folder,
    a single file, a Hub id, tiny; `vae` another VAE folder): both text encoders in fp16, as SDXL's
    own single file holds them, and the VAE in fp32 (it overflows in fp16). For the single file
    written beside each checkpoint."""
    folder = resolve_model(model)
    configs = config_folder(folder)
    if folder.is_dir():
        text = SDXLTextEncoder.from_pretrained(folder, torch.float16)
    else:
        text = load_text_encoder_file(folder, configs, torch.float16)
    if vae is not None or folder.is_dir():
        autoencoder = SDXLVAE.from_pretrained(Path(vae or folder / "vae"), torch.float32).vae
    else:
        autoencoder = load_vae_file(folder, configs)
    return {
        "text_encoder": text.text_encoder.state_dict(),
        "text_encoder_2": text.text_encoder_2.state_dict(),
        "vae": autoencoder.state_dict(),
    }


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
