"""LoRA files other programs load, and loading theirs into our models.

Every format goes through one plain representation, `LoRAModules` (sdxl/lora.py): an `Adapter`
(down, up, alpha, and for DoRA the magnitude) per layer, keyed by component and module path:

    {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": Adapter(...),
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": Adapter(...), ...}

The file layouts:

- native: our state dict, `<key>.lora.down.weight`, `.lora.up.weight`, `.lora.alpha`, and for DoRA
  `.lora.magnitude`. Older files have UNet keys without `unet.` and one alpha in the metadata.
- diffusers / peft: `<key>.lora_A.weight` / `.lora_B.weight` (and `.lora_magnitude_vector`, peft's
  DoRA magnitude: (out,) for a Linear, (1, out, 1, 1) for a Conv2d), with each component's peft
  LoraConfig (r, lora_alpha, target_modules, rank and alpha patterns, use_dora) in the
  `lora_adapter_metadata` header that `load_lora_weights` reads; without it alpha = rank, as
  diffusers assumes. Reading also accepts diffusers' older `.lora.down.weight` / `.lora.up.weight`
  names (without the header they read as native files, the same thing).
LoHa and LoKr adapters (`Factors`) keep LyCORIS's factor names in every layout: native
`<key>.lora.hada_w1_a`, ..., diffusers / peft `<key>.hada_w1_a`, ... (peft's LoHa and LoKr names,
with peft's LoHaConfig / LoKrConfig fields in the same header), kohya `<kohya name>.hada_w1_a`, ...,
`.lokr_w1`, ..., `.alpha` (LyCORIS's files, which ComfyUI, AUTOMATIC1111 and Forge read).

- kohya (ComfyUI, AUTOMATIC1111, Forge): `lora_unet_<original SDXL path, dots as _>`,
  `lora_te1_<CLIP-L path>` and `lora_te2_<bigG path>`, each with `.lora_down.weight`,
  `.lora_up.weight`, a scalar `.alpha`, and for DoRA `.dora_scale` (the magnitude as LyCORIS
  writes it: (out, 1) or (out, 1, 1, 1), which ComfyUI reads as a norm over each output channel).
  The UNet's names are the original `input_blocks` / `middle_block` / `output_blocks` ones. Reading
  also accepts kohya keys built from diffusers block names.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from cli.choices import LORA_FORMATS
from sdxl.files import atomic_write
from sdxl.lora import (
    ADAPTERS,
    AdaptedLayer,
    Adapter,
    DoRA,
    Factored,
    Factors,
    LoRA,
    LoRAModules,
    factorization,
)
from sdxl.names import COMPONENTS, LoRAError, by_component, canonical, sgm_path, split_component
from sdxl.weights import WeightsError, read_safetensors, read_safetensors_header

DORA_IN_KOHYA_FORMAT = (
    "warning: a DoRA file in kohya format loads correctly in ComfyUI and Forge only: AUTOMATIC1111 "
    "applies its dora_scale per input channel (wrong weights, without a word) and kohya's "
    "sd-scripts drops it (plain LoRA); README.md, 'Using the LoRA elsewhere'"
)
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Print a warning to stderr the first time it is given in this process."""
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr)


# In the metadata of every file the project writes for sharing, so that it can tell its own files.
WRITTEN_BY = {"written_by": "sdxl-lora"}
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def modules_from_state_dict(
    weights: dict[str, torch.Tensor], alpha: float | None = None
) -> LoRAModules:
    """Our state-dict layout (`get_lora_state_dict` of a model, or a native file) -> LoRAModules.
    An adapter without its own `.lora.alpha` (older files) gets `alpha` (default: its rank)."""
    modules: LoRAModules = {}
    for key, down in weights.items():
        if not key.endswith(".lora.down.weight"):
            continue
        path = key.removesuffix(".lora.down.weight")
        own_alpha = weights.get(f"{path}.lora.alpha")
        modules[canonical(path)] = Adapter(
            down,
            weights[f"{path}.lora.up.weight"],
            float(own_alpha) if own_alpha is not None else float(alpha or down.shape[0]),
            weights.get(f"{path}.lora.magnitude"),
        )
    for path, tensors in group_factors(weights, ".lora.").items():
        modules[canonical(path)] = factors(tensors, weights[f"{path}.lora.alpha"])
    return modules


def group_factors(
    tensors: dict[str, torch.Tensor], sep: str = "."
) -> dict[str, dict[str, torch.Tensor]]:
    """The LoHa and LoKr factors of a file, by module: `<module><sep><factor name>` -> {module:
    {factor name: tensor}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, name = key.rpartition(sep)
        if name.startswith(FACTOR_PREFIXES):
            grouped.setdefault(module, {})[name] = value
    return grouped


# LyCORIS's factor names, by adapter kind.
FACTOR_PREFIXES = ("hada_", "lokr_")
FACTOR_NAMES = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}


def factors(tensors: dict[str, torch.Tensor], alpha: torch.Tensor | float | None) -> Factors:
    """A LoHa or LoKr record from its factors (named as LyCORIS names them). Without an alpha
    the scale is 1 (alpha = rank), as LyCORIS and ComfyUI take it."""
    kind = "loha" if any(k.startswith("hada_") for k in tensors) else "lokr"
    unknown = [k for k in tensors if k not in FACTOR_NAMES[kind]]
    if unknown:
        raise LoRAError(f"{kind} factor {unknown[0]} is not one this project reads")
    whole = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= tensors.keys()
    if kind == "lokr":
        has = tensors.keys()
        whole = ("lokr_w1" in has or {"lokr_w1_a", "lokr_w1_b"} <= has) and (
            "lokr_w2" in has or {"lokr_w2_a", "lokr_w2_b"} <= has
        )
    if not whole:
        raise LoRAError(f"a {kind} adapter with only {sorted(tensors)}: the file is incomplete")
    rank = cast(type[Factored], ADAPTERS[kind]).rank_of(tensors)
    return Factors(kind, tensors, float(alpha) if alpha is not None else float(rank or 1))


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def kohya_name(key: str, layers_per_block: int = 2) -> str:
    """Our key -> kohya's module name: the UNet's under its original SDXL path, the text encoders'
    under their transformers path, dots as underscores."""
    component, path = split_component(key)
    if component == "unet":
        path = sgm_path(path, layers_per_block)
    return KOHYA_PREFIX[component] + path.replace(".", "_")


def kohya_names(unet: nn.Module) -> dict[str, str]:
    """kohya module name -> our key, for every Linear and Conv2d of the UNet that has an original
    name, under both the original block names and the diffusers block names."""
    layers = int(unet.config.layers_per_block)  # type: ignore[union-attr, arg-type]
    names = {}
    for path, module in unet.named_modules():
        if ".lora." in f"{path}.":  # an adapter's own layers (a UNet with adapters already)
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)) or hasattr(module, "lora"):
            try:
                names[kohya_name(f"unet.{path}", layers)] = f"unet.{path}"
            except LoRAError:  # a layer kohya never names
                continue
            names["lora_unet_" + path.replace(".", "_")] = f"unet.{path}"
    return names


# A text encoder's kohya name -> its module path (CLIP's layer names are regular). Files written
# from transformers 5's CLIP lack the text_model level; both forms are read.
_KOHYA_TEXT = re.compile(
    r"lora_te([12])_(?:text_model_)?encoder_layers_(\d+)_(self_attn|mlp)_(\w+)"
)


def kohya_key(name: str, unet_names: dict[str, str]) -> str:
    """kohya module name -> our key."""
    if name in unet_names:
        return unet_names[name]
    if m := _KOHYA_TEXT.fullmatch(name):
        component = "text_encoder" if m[1] == "1" else "text_encoder_2"
        return f"{component}.text_model.encoder.layers.{m[2]}.{m[3]}.{m[4]}"
    raise LoRAError(f"LoRA module {name} does not exist in this model (another architecture?)")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def peft_config(adapters: dict[str, Adapter | Factors]) -> dict:
    """The peft LoraConfig of one component's adapters: the commonest rank and alpha, the others
    as patterns. peft matches target names as suffixes of module names, so the text encoders'
    are given without `text_model.`: they then match CLIP built with or without that level."""
    adapters = {path.removeprefix("text_model."): a for path, a in adapters.items()}
    ranks = {p: peft_rank_alpha(a) for p, a in adapters.items()}
    r = Counter(r for r, _ in ranks.values()).most_common(1)[0][0]
    alpha = Counter(alpha for _, alpha in ranks.values()).most_common(1)[0][0]
    config = {
        "r": r,
        "target_modules": sorted(adapters),
        "rank_pattern": {p: ra[0] for p, ra in ranks.items() if ra[0] != r},
        "alpha_pattern": {p: ra[1] for p, ra in ranks.items() if ra[1] != alpha},
    }
    factored = [a for a in adapters.values() if isinstance(a, Factors)]
    if factored:  # peft's LoHaConfig / LoKrConfig
        names = {name for a in factored for name in a.tensors}
        config |= {"peft_type": factored[0].kind.upper(), "alpha": alpha}
        config["use_effective_conv2d"] = bool(names & {"hada_t1", "lokr_t2"})  # Tucker cores
        if factored[0].kind == "lokr":
            config |= {
                "decompose_both": "lokr_w1_a" in names,
                "decompose_factor": peft_factor(factored),
            }
        return config
    magnitudes = [a.magnitude for a in adapters.values() if isinstance(a, Adapter)]
    return config | {"lora_alpha": alpha, "use_dora": any(m is not None for m in magnitudes)}


def peft_factor(adapters: list[Factors]) -> int:
    """The one LoKr `decompose_factor` peft's config holds: the factor (-1, or a size) that splits
    every layer's output side as its w1 does; refused in one line if there is none."""
    sides = []
    for a in adapters:
        t = a.tensors
        w1_rows = t["lokr_w1"].shape[0] if "lokr_w1" in t else t["lokr_w1_a"].shape[0]
        if "lokr_w2" in t:
            w2_rows = t["lokr_w2"].shape[0]
        else:  # (b, r), or a Tucker mode (r, b)
            w2_rows = t["lokr_w2_a"].shape[1 if "lokr_t2" in t else 0]
        sides.append((w1_rows, w1_rows * w2_rows))
    for factor in [-1, *sorted({w1 for w1, _ in sides})]:
        if all(factorization(out, factor)[0] == w1 for w1, out in sides):
            return factor
    raise LoRAError("these LoKr adapters split their layers with different factors, which peft's "
                    "one decompose_factor cannot say; save them in kohya format")  # fmt: skip


def peft_rank_alpha(a: Adapter | Factors) -> tuple[int, float]:
    """The r and alpha peft's config gives an adapter. peft scales a LoKr by alpha / r even when
    both its factors are full matrices (LyCORIS by 1), and makes w2 full when r is at least half
    its larger side: such a LoKr is written with r = alpha = that side."""
    if isinstance(a, Factors) and a.rank == 0:
        side = max(a.tensors["lokr_w2"].shape[:2])
        return side, float(side)
    return a.rank, a.alpha


Tensors = dict[str, torch.Tensor]


def native_tensors(modules: LoRAModules, layers_per_block: int) -> tuple[Tensors, dict]:
    """Our state dict's layout."""
    tensors: Tensors = {}
    for key, a in modules.items():
        tensors[f"{key}.lora.alpha"] = torch.tensor(a.alpha)
        if isinstance(a, Factors):
            tensors |= {f"{key}.lora.{name}": t for name, t in a.tensors.items()}
            continue
        tensors |= {f"{key}.lora.down.weight": a.down, f"{key}.lora.up.weight": a.up}
        if a.magnitude is not None:
            tensors[f"{key}.lora.magnitude"] = a.magnitude
    return tensors, {}


def kohya_tensors(modules: LoRAModules, layers_per_block: int) -> tuple[Tensors, dict]:
    """kohya's layout, which ComfyUI, AUTOMATIC1111 and Forge read."""
    tensors: Tensors = {}
    for key, a in modules.items():
        name = kohya_name(key, layers_per_block)
        tensors[f"{name}.alpha"] = torch.tensor(a.alpha)
        if isinstance(a, Factors):  # LyCORIS's own names
            tensors |= {f"{name}.{factor}": t for factor, t in a.tensors.items()}
            continue
        tensors |= {f"{name}.lora_down.weight": a.down, f"{name}.lora_up.weight": a.up}
        if a.magnitude is not None:
            # (out, 1[, 1, 1]) per output channel, (1, in[, 1, 1]) per input channel: ComfyUI
            # tells the two apart by whether the first axis is the layer's output.
            lead = tuple(a.magnitude.shape) if a.magnitude.dim() == 2 else (-1, 1)
            tensors[f"{name}.dora_scale"] = a.magnitude.reshape(*lead, *[1] * (a.down.dim() - 2))
    return tensors, {}


def diffusers_tensors(modules: LoRAModules, layers_per_block: int) -> tuple[Tensors, dict]:
    """peft's layout, with each component's LoraConfig in the header load_lora_weights reads."""
    tensors: Tensors = {}
    for key, a in modules.items():
        if isinstance(a, Factors):  # peft's LoHa and LoKr names are LyCORIS's
            tensors |= {f"{key}.{factor}": t for factor, t in a.tensors.items()}
            continue
        tensors |= {f"{key}.lora_A.weight": a.down, f"{key}.lora_B.weight": a.up}
        if a.magnitude is not None and a.magnitude.dim() == 2:
            raise LoRAError(
                f"{key} has a DoRA magnitude per input channel, which peft's format cannot "
                "hold; save it in kohya format"
            )
        if a.magnitude is not None:  # peft's shapes
            shape = (1, -1, 1, 1) if a.down.dim() == 4 else (-1,)
            tensors[f"{key}.lora_magnitude_vector"] = a.magnitude.reshape(shape)
    # diffusers stores the peft LoraConfig of each component with the component's prefix.
    configs = {
        f"{component}.{k}": v
        for component, adapters in by_component(modules).items()
        for k, v in peft_config(adapters).items()
    }
    return tensors, {"lora_adapter_metadata": json.dumps(configs)}


# The file layouts, by --lora_save_format / --format name.
WRITERS = {"native": native_tensors, "diffusers": diffusers_tensors, "kohya": kohya_tensors}
assert tuple(WRITERS) == LORA_FORMATS


def to_state_dict(modules: LoRAModules, fmt: str, layers_per_block: int = 2) -> tuple[dict, dict]:
    """(tensors, extra metadata) of one file format, the keys as the files name them."""
    if fmt not in WRITERS:
        raise LoRAError(f"unknown LoRA format {fmt!r}; choose one of {LORA_FORMATS}")
    modules = {canonical(key): a for key, a in modules.items()}
    tensors, metadata = WRITERS[fmt](modules, layers_per_block)
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
    network_args: dict[str, str],
    target_mode: str,
    base_model: str,
    resolution: tuple[int, int],
    steps: int,
    epoch: int,
    learning_rate: float,
    unet_only: bool = True,
    v_prediction: bool = False,
    tag_frequency: dict[str, dict[str, int]] | None = None,
    title: str = "",
) -> dict[str, str]:
    """What other programs read from a LoRA file's metadata: kohya's `ss_*` keys (AUTOMATIC1111
    lists a LoRA under an SDXL checkpoint only when ss_base_model_version starts with sdxl_, and
    shows ss_tag_frequency; `ss_network_args` describes the adapter as kohya's and LyCORIS's
    network arguments: conv_dim, conv_alpha, block_dims, block_alphas, and LyCORIS's algo: lora
    with dora_wd for DoRA, loha, lokr with its factor) and Stability's model-spec keys. The base model is named, not located.
    """
    lycoris = "algo" in network_args  # DoRA, LoHa, LoKr are LyCORIS's, not networks.lora's
    width, height = resolution
    return {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(network_args),
        "ss_network_train_unet_only": str(unet_only),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_v_parameterization": str(v_prediction),
        "ss_sd_model_name": model_name(base_model),
        "ss_resolution": f"({width}, {height})",
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_learning_rate": str(learning_rate),
        "ss_tag_frequency": json.dumps(tag_frequency or {}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.date": datetime.now().strftime("%Y-%m-%d"),
        "rank": str(rank),
        "alpha": str(alpha),
        "target_mode": target_mode,
    }


def written_here(path: str | Path) -> bool:
    """Whether a safetensors file is one this project wrote (its metadata says so), which its
    scripts may replace."""
    try:
        metadata = read_safetensors_header(path)[0].get("__metadata__", {})
    except WeightsError:
        return False
    # Exports before WRITTEN_BY was recorded carried a lora_format entry.
    return metadata.get("written_by") == WRITTEN_BY["written_by"] or "lora_format" in metadata


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
    if fmt == "kohya" and any(getattr(a, "magnitude", None) is not None for a in modules.values()):
        warn_once(DORA_IN_KOHYA_FORMAT)
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


def detect_format(keys: list[str], metadata: dict[str, str]) -> str:
    if keys and all(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if keys and "lora_adapter_metadata" in metadata:  # diffusers' header, with either key style
        return "diffusers"
    if keys and all(".lora." in k for k in keys):
        return "native"
    if keys and all(k.startswith(COMPONENTS) and (".lora_" in k or ".hada_" in k or ".lokr_" in k)
                    for k in keys):  # fmt: skip
        return "diffusers"
    raise LoRAError(
        f"not a LoRA file this project knows (first key: {keys[0] if keys else 'none'})"
    )


def from_state_dict(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], unet: nn.Module
) -> LoRAModules:
    """Any of the three formats -> LoRAModules (the UNet's module names resolve kohya's)."""
    fmt = detect_format(list(tensors), metadata)
    if fmt == "kohya":
        names = kohya_names(unet)
        known: tuple[str, ...] = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")
        known += tuple(f".{n}" for names_ in FACTOR_NAMES.values() for n in names_)
        unknown = [k for k in tensors if not k.endswith(known)]
        if unknown:  # IA3, OFT, a bias diff...: not an adapter this project builds
            raise LoRAError(
                f"{len(unknown)} keys of the LoRA file are of no adapter kind this project "
                f"knows (first: {unknown[0]}); LoRA, LoCon, DoRA, LoHa and LoKr keys load"
            )
        modules: LoRAModules = {}
        for name, found in group_factors(tensors).items():
            if f"{name}.dora_scale" in tensors:
                raise LoRAError(f"{name} is a LyCORIS adapter with weight decomposition "
                                "(dora_scale), which this project does not read")  # fmt: skip
            modules[kohya_key(name, names)] = factors(found, tensors.get(f"{name}.alpha"))
        for key, down in tensors.items():
            if not key.endswith(".lora_down.weight"):
                continue
            name = key.removesuffix(".lora_down.weight")
            alpha = tensors.get(f"{name}.alpha")
            up = tensors.get(f"{name}.lora_up.weight")
            if up is None:
                raise LoRAError(f"the LoRA file has {name}.lora_down.weight but no lora_up")
            magnitude = tensors.get(f"{name}.dora_scale")
            if magnitude is not None:  # per output channel if the first axis is the output's
                magnitude = (
                    magnitude.flatten()
                    if magnitude.shape[0] == up.shape[0]
                    else magnitude.reshape(1, -1)
                )
            modules[kohya_key(name, names)] = Adapter(
                down,
                up,
                float(alpha) if alpha is not None else float(down.shape[0]),
                magnitude,
            )
        return modules
    if fmt == "native":
        # Older native files hold the UNet's adapters without the "unet." prefix.
        prefixed = {
            k if k.split(".")[0] in COMPONENTS else f"unet.{k}": v for k, v in tensors.items()
        }
        default = float(metadata["alpha"]) if "alpha" in metadata else None
        return modules_from_state_dict(prefixed, default)
    configs: dict[str, dict] = {c: {} for c in COMPONENTS}
    if "lora_adapter_metadata" in metadata:
        for k, v in json.loads(metadata["lora_adapter_metadata"]).items():
            component, _, field = k.partition(".")
            configs.setdefault(component, {})[field] = v
    modules = {}
    for path, found in group_factors(tensors).items():
        component, inner = split_component(path)
        config = configs.get(component, {})
        alpha = config.get("alpha_pattern", {}).get(inner, config.get("alpha"))
        record = factors(found, alpha)
        if record.rank == 0 and alpha is not None:
            # peft scales a LoKr of two full matrices by alpha / r as well; LyCORIS by 1
            r = config.get("rank_pattern", {}).get(inner, config.get("r", 1))
            record.tensors["lokr_w1"] = record.tensors["lokr_w1"] * (float(alpha) / r)
        modules[path] = record
    # peft's names, or the older ones diffusers also writes (convert_state_dict_to_diffusers)
    for down_suffix, up_suffix in (
        (".lora_A.weight", ".lora_B.weight"),
        (".lora.down.weight", ".lora.up.weight"),
    ):
        for key, down in tensors.items():
            if not key.endswith(down_suffix):
                continue
            path = key.removesuffix(down_suffix)
            component, inner = split_component(path)
            config = configs.get(component, {})
            alpha = config.get("alpha_pattern", {}).get(inner, config.get("lora_alpha"))
            magnitude = tensors.get(f"{path}.lora_magnitude_vector")
            modules[path] = Adapter(
                down,
                tensors[path + up_suffix],
                float(alpha if alpha is not None else down.shape[0]),
                magnitude.flatten() if magnitude is not None else None,
            )
    return modules


def read_lora_file(path: str | Path, unet: nn.Module) -> LoRAModules:
    """Read a LoRA safetensors file in any of the three formats."""
    header, _ = read_safetensors_header(path)
    metadata = header.get("__metadata__", {})
    return from_state_dict(read_safetensors(path), metadata, unet)


# ---------------------------------------------------------------------------------------------
# Into the models: adapters read from a file, and a kind only other programs write
# ---------------------------------------------------------------------------------------------


def input_channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each input channel's weights, over every axis but the second.
    (out, in, ...) -> (1, in)"""
    return torch.linalg.vector_norm(weight.transpose(0, 1).flatten(1), dim=1)[None]


class DoRAOnInputs(DoRA):
    """DoRA with one magnitude per input channel, (1, in): what OneTrainer writes by default and
    older LyCORIS wrote, and ComfyUI reads. Only read from files; training makes DoRA."""

    norm = staticmethod(input_channel_norm)

    @staticmethod
    def along_channels(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(1, in) -> (1, in[, 1, 1])"""
        return v.reshape(1, -1, *[1] * (weight.dim() - 2))

    def output(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        # A scale per input channel does not factor out of the output: use the whole weight.
        merged = self.merged_weight(layer.base_weight(torch.float32))
        return layer.op(x, merged.to(x.dtype), layer.bias)


@torch.no_grad()
def attach_adapters(model: nn.Module, adapters: dict[str, Adapter | Factors]) -> None:
    """Wrap exactly the named layers with adapters holding the given weights (from a file): a
    DoRA adapter where there is a magnitude (DoRAOnInputs where it is one per input channel),
    LoHa or LoKr for their factors, else LoRA."""
    model.requires_grad_(False)
    own = dict(model.named_modules())
    for name, adapter in adapters.items():
        if name not in own:  # the model may lack the files' text_model level (see canonical)
            name = name.removeprefix("text_model.")
        base = own.get(name)
        if not (type(base) is nn.Linear or isinstance(base, nn.Conv2d)):
            raise LoRAError(f"LoRA targets {name}, which is not a Linear or Conv2d of this model")
        assert isinstance(base, (nn.Linear, nn.Conv2d))
        parent, _, child = name.rpartition(".")
        if isinstance(adapter, Factors):
            kind = cast(type[Factored], ADAPTERS[adapter.kind])
            try:
                update = kind.holding(adapter, tuple(base.weight.shape))
            except LoRAError as e:
                raise LoRAError(f"at {name}: {e} (another architecture?)") from None
            update = update.to(base.weight.device)
            setattr(model.get_submodule(parent), child, AdaptedLayer(base, update))
            continue
        lora_kind: type[LoRA] = LoRA
        if adapter.magnitude is not None:
            lora_kind = DoRAOnInputs if adapter.magnitude.dim() == 2 else DoRA
        lora = lora_kind(base, adapter.rank, adapter.alpha)
        shapes_fit = adapter.down.numel() == lora.down.weight.numel() and (
            adapter.up.numel() == lora.up.weight.numel()
        )
        if isinstance(lora, DoRA):
            shapes_fit &= adapter.magnitude.numel() == lora.magnitude.numel()  # type: ignore[union-attr]
        if not shapes_fit or adapter.down.shape[1] != lora.down.weight.shape[1]:
            raise LoRAError(
                f"LoRA shape mismatch at {name}: file has down {tuple(adapter.down.shape)} / up "
                f"{tuple(adapter.up.shape)}, this model's layer is {tuple(base.weight.shape)} "
                "(another architecture?)"
            )
        lora.load(adapter)
        setattr(model.get_submodule(parent), child, AdaptedLayer(base, lora))


def attach_lora(models: dict[str, nn.Module], modules: LoRAModules) -> None:
    """Put adapters read from a file into the models they name (by component)."""
    for component, adapters in by_component(modules).items():
        if component not in models:
            raise LoRAError(f"the LoRA adapts the {component}, which is not loaded here")
        attach_adapters(models[component], adapters)
