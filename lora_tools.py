"""LoRA tools: resize a LoRA's rank, extract a LoRA from a fine-tune, merge LoRAs into a model,
combine several LoRAs into one (sdxl/lora_svd.py has the mathematics).

    uv run python lora_tools.py resize my_lora.safetensors --rank 8 --output my_lora_r8.safetensors
    uv run python lora_tools.py resize my_lora.safetensors --dynamic sv_fro --param 0.95 --rank 32 \\
        --output my_lora_dynamic.safetensors
    uv run python lora_tools.py extract --base stabilityai/stable-diffusion-xl-base-1.0 \\
        --tuned my_finetune.safetensors --rank 32 --conv_rank 16 --output extracted.safetensors
    uv run python lora_tools.py merge --base ./weights/sdxl-base-1.0 style.safetensors:0.8 \\
        subject.safetensors --output merged_sdxl.safetensors
    uv run python lora_tools.py combine style.safetensors:0.8 subject.safetensors \\
        --output both.safetensors
    uv run python lora_tools.py combine a_loha.safetensors b.safetensors --rank 32 --output ab.safetensors
    uv run python lora_tools.py resize tiny_lora.safetensors --model tiny --rank 2 --output t.safetensors

Any adapter kind goes in (LoRA, LoCon, LoHa, LoKr; DoRA into merge); what resize, extract and combine
write is a plain LoRA (conv layers included) in kohya's layout by default, with kohya's metadata.
merge writes one single-file SDXL checkpoint in the original (SGM) names, which ComfyUI,
AUTOMATIC1111, Forge and this project open as a model. Outputs are written under a temporary name
and renamed; a file this project did not write is never replaced (unless --overwrite).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from cli.lora_tools import check_args, lora_and_scale, parse_args
from cli.options import run_cli
from sdxl.errors import UserError


def main(args: argparse.Namespace) -> Path:
    check_args(args)  # every flag, before the heavy imports
    import torch

    from sdxl.device import DTYPES

    output, dtype = Path(args.output), DTYPES[args.dtype]
    refuse_foreign(output, args.overwrite)
    with torch.no_grad():
        if args.command == "merge":
            return merge(args, output, dtype)
        if args.command == "extract":
            modules, note = extract(args)
        elif args.command == "resize":
            modules, note = resize(args)
        else:
            modules, note = combine(args)
        write_lora(output, modules, args.format, dtype, note)
    return output


def refuse_foreign(output: Path, overwrite: bool) -> None:
    """Never replace a file this project did not write."""
    from sdxl.lora_formats import written_here

    if output.exists() and not overwrite and not written_here(output):
        raise UserError(f"--output {output} exists and this project did not write it; choose "
                        "another name or pass --overwrite")  # fmt: skip


def shapes_and_unet(model: str | None) -> tuple[dict[str, tuple[int, ...]], Any]:
    """The weight shape of every Linear and Conv2d of the model (UNet and both text encoders) by
    LoRA key, from its configs on the meta device (default: the shipped SDXL configs), and that
    UNet (for kohya's names)."""
    from torch import nn

    from sdxl.names import canonical
    from sdxl.pretrained import SDXL_CONFIGS, meta_models, resolve_model

    models = meta_models(resolve_model(model) if model else SDXL_CONFIGS)
    shapes = {
        canonical(f"{component}.{name}"): tuple(m.weight.shape)
        for component, model in models.items()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    }
    return shapes, models["unet"]


def read_adapters(path: Path, unet: Any) -> Any:
    """A LoRA file or checkpoint's adapters; a full fine-tune's checkpoint is refused."""
    from sdxl.checkpoint import read_lora_weights
    from sdxl.lora import Adapter, Factors

    modules = read_lora_weights(path, unet)
    if not all(isinstance(v, Adapter | Factors) for v in modules.values()):
        raise UserError(f"{path} is a full fine-tune, not a LoRA; extract one with "
                        "lora_tools.py extract --base MODEL --tuned CHECKPOINT")  # fmt: skip
    kinds = {v.kind for v in modules.values() if isinstance(v, Factors)}
    kinds |= {
        "dora" for v in modules.values() if isinstance(v, Adapter) and v.magnitude is not None
    }
    if kinds:
        print(f"note: {path.name} holds {' and '.join(sorted(kinds))} adapters; the output is "
              "a plain LoRA of their updates")  # fmt: skip
    return modules


def resize(args: argparse.Namespace) -> tuple[Any, str]:
    from sdxl.lora_svd import resize as resize_modules

    shapes, unet = shapes_and_unet(args.model)
    modules = read_adapters(Path(args.input), unet)
    resized, kept = resize_modules(modules, shapes, args.rank, args.dynamic, args.param)
    for key, fraction in kept.items():
        print(f"{key}: rank {modules[key].rank} -> {resized[key].rank}, {fraction:.2%} of the "
              "update's Frobenius norm kept")  # fmt: skip
    mean = sum(kept.values()) / len(kept)
    print(f"{len(kept)} layers, mean {mean:.2%} of the Frobenius norm kept")
    how = (
        f"--rank {args.rank}" if args.dynamic is None else f"--dynamic {args.dynamic} {args.param}"
    )
    return resized, f"resized from {Path(args.input).name} ({how}); mean norm kept {mean:.4f}"


def extract(args: argparse.Namespace) -> tuple[Any, str]:
    from sdxl.lora_svd import extract as extract_modules

    base, tuned = layer_weights(args.base), layer_weights(args.tuned)
    modules = extract_modules(base, tuned, args.rank, args.conv_rank, args.threshold)
    if not modules:
        raise UserError(f"--tuned {args.tuned} differs from --base {args.base} by at most "
                        f"--threshold {args.threshold} everywhere: there is nothing to extract")  # fmt: skip
    print(f"{len(modules)} of {len(base)} layers differ; extracted at rank {args.rank}"
          + (f", 3x3 convolutions at {args.conv_rank}" if args.conv_rank else ""))  # fmt: skip
    return modules, f"extracted from {args.tuned} - {args.base}"


def layer_weights(model: str) -> dict:
    """Every Linear and Conv2d weight of a model (UNet, text encoders) by LoRA key, in fp32: a
    folder, a single file, a Hub id, or a full fine-tune's training checkpoint (its UNet on the
    base model it records)."""
    import torch
    from torch import nn

    from sdxl.checkpoint import load_checkpoint, recorded_base_model, unet_weights
    from sdxl.lora import components
    from sdxl.names import canonical
    from sdxl.pretrained import load_sdxl, resolve_model

    unet_state = None
    if model.endswith(".pt"):
        ckpt = load_checkpoint(model, mmap=True)
        if ckpt["lora"] is not None:
            raise UserError(f"{model} is a LoRA checkpoint; give a fine-tuned model")
        unet_state, model = unet_weights(ckpt, Path(model)), recorded_base_model(model) or model
    parts = load_sdxl(resolve_model(model), torch.float32)
    if unet_state is not None:
        parts.unet.load_state_dict(unet_state)
    return {
        canonical(f"{component}.{name}"): m.weight.float()
        for component, net in components(parts.unet, parts.text_encoder).items()
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    }


def combine(args: argparse.Namespace) -> tuple[Any, str]:
    from sdxl.lora_svd import combine as combine_modules

    shapes, unet = shapes_and_unet(args.model)
    inputs = [(read_adapters(path, unet), scale) for path, scale in map(lora_and_scale, args.loras)]
    how = "concatenated ranks" if args.rank is None else f"factored to rank {args.rank}"
    return combine_modules(inputs, shapes, args.rank), f"combined {', '.join(args.loras)} ({how})"


def merge(args: argparse.Namespace, output: Path, dtype: Any) -> Path:
    """The LoRAs merged in turn into the base model (fp32), written as one SGM file."""
    import torch

    from sampling.inference import apply_lora
    from sdxl.checkpoint import read_lora_weights
    from sdxl.lora import components
    from sdxl.pretrained import load_sdxl, resolve_model
    from sdxl.single_file import write_single_file

    parts = load_sdxl(resolve_model(args.base), torch.float32)
    models = components(parts.unet, parts.text_encoder)
    for path, scale in map(lora_and_scale, args.loras):
        apply_lora(models, read_lora_weights(path, parts.unet), scale)
        print(f"merged {path.name} at {scale}")
    state = {name: model.state_dict() for name, model in models.items()}
    state["vae"] = parts.vae.vae.state_dict()
    write_single_file(state, output, dtype, {"merged": ", ".join(args.loras)})
    print(f"wrote {output} ({output.stat().st_size / 2**30:.2f} GiB, {args.dtype})")
    return output


def write_lora(output: Path, modules: Any, fmt: str, dtype: Any, note: str) -> None:
    """A plain LoRA file with kohya's metadata: the rank and alpha most layers have, conv_dim
    where convolutions are adapted."""
    from sdxl.lora_formats import save_lora_file, sharing_metadata

    rank = Counter(a.rank for a in modules.values()).most_common(1)[0][0]
    alpha = Counter(a.alpha for a in modules.values()).most_common(1)[0][0]
    convs = [a.rank for a in modules.values() if a.down.dim() == 4 and a.down.shape[2:] != (1, 1)]
    network_args = {"conv_dim": str(max(convs)), "conv_alpha": str(max(convs))} if convs else {}
    info = sharing_metadata(rank=rank, alpha=alpha, network_args=network_args, target_mode="",
                            base_model="sdxl", resolution=(1024, 1024), steps=0, epoch=0,
                            learning_rate=0.0, title=output.stem)  # fmt: skip
    save_lora_file(output, modules, fmt, {**info, "lora_tools": note}, dtype)
    size = output.stat().st_size / 2**20
    print(f"wrote {output} ({len(modules)} layers, rank {rank}, {size:.1f} MiB, {fmt})")


if __name__ == "__main__":
    run_cli(main, lambda: parse_args(sys.argv[1:], __doc__))
