"""Write a weights-only safetensors file from a training checkpoint.

    uv run python extract_lora_weights.py outputs/tiny/lora_step000030_*.pt
    uv run python extract_lora_weights.py CHECKPOINT --format kohya --dtype fp16     # ComfyUI, A1111, Forge
    uv run python extract_lora_weights.py CHECKPOINT --format diffusers               # load_lora_weights
    uv run python extract_lora_weights.py CHECKPOINT --ema --output my_lora.safetensors

Formats: native (loads back into this project), diffusers (peft keys + LoraConfig metadata) and kohya
(`lora_unet_input_blocks_...` with `.alpha`). Metadata: rank, alpha, target mode, base model, step.
A full fine-tuning checkpoint gives its UNet as a diffusers-named safetensors file (native format).
The default output is next to the checkpoint: <checkpoint name>_<format>[_ema].safetensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdxl.errors import UserError, run_cli
from sdxl.options import LORA_FORMATS, PRECISIONS, check_file


def check_args(args: argparse.Namespace) -> None:
    """The flags, checked before the heavy imports."""
    check_file(args.checkpoint, "checkpoint")
    if args.output is not None and Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file name in it")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="a training checkpoint (.pt): step, epoch or lowest-loss")
    p.add_argument(
        "--format",
        default="native",
        choices=LORA_FORMATS,
        help="file layout (kohya for ComfyUI / AUTOMATIC1111)",
    )
    p.add_argument("--output", default=None, help="output file (default: next to the checkpoint)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output even if it is not an earlier export of ours",
    )
    p.add_argument(
        "--dtype", default="fp16", choices=PRECISIONS, help="dtype of the written tensors"
    )
    p.add_argument(
        "--ema", action="store_true", help="export the EMA weights instead of the live ones"
    )
    return p


if __name__ == "__main__":
    # Read and check the flags before the heavy imports below, so that --help answers at once.
    run_cli(check_args, build_parser())

from safetensors.torch import save_file

from sdxl.files import atomic_write
from sdxl.lora_formats import WRITTEN_BY, model_name, save_lora_file
from sdxl.weights import WeightsError, read_safetensors_header
from training.checkpoint import adapter_modules, load_checkpoint, unet_weights
from training.precision_util import DTYPES


def main(args: argparse.Namespace) -> Path:
    check_args(args)
    checkpoint = Path(args.checkpoint)
    ckpt = load_checkpoint(checkpoint, mmap=True)
    suffix = f"_{args.format}" + ("_ema" if args.ema else "")
    output = Path(args.output or checkpoint.with_name(checkpoint.stem + suffix + ".safetensors"))
    if output.exists() and not args.overwrite and not earlier_export(output):
        raise UserError(
            f"--output {output} exists and is not a file this script wrote; "
            "choose another name or pass --overwrite"
        )
    dtype = DTYPES[args.dtype]
    info = {"base_model": model_name(ckpt.get("base_model", "")), "step": ckpt["step"]}
    info |= {"ema": int(args.ema), "ss_steps": ckpt["step"], "ss_epoch": ckpt["epoch"]}
    if ckpt["lora"] is None:  # full fine-tuning
        if args.format != "native" or args.ema:
            raise UserError(
                "a full fine-tuning checkpoint exports its UNet in native format only, without --ema"
            )
        state = unet_weights(ckpt, checkpoint, dtype)
        with atomic_write(output) as tmp:
            metadata = {"format": "pt", **WRITTEN_BY, **{k: str(v) for k, v in info.items()}}
            save_file(state, tmp, metadata=metadata)
    else:
        lora = ckpt["lora_config"]
        info.update(rank=lora["rank"], alpha=lora["alpha"], target_mode=lora["target_mode"])
        info = {**(ckpt.get("lora_metadata") or {}), **info}  # as the LoRA beside the checkpoint
        layers = ckpt["unet_config"]["layers_per_block"]  # kohya names count blocks per level
        save_lora_file(output, adapter_modules(ckpt, args.ema), args.format, info, dtype, layers)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, {args.format}, {args.dtype})")
    return output


def earlier_export(path: Path) -> bool:
    """Whether the file is one this script wrote (its metadata says so), which may be replaced."""
    try:
        metadata = read_safetensors_header(path)[0].get("__metadata__", {})
    except WeightsError:
        return False
    # Exports before WRITTEN_BY was recorded carried a lora_format entry.
    return metadata.get("written_by") == WRITTEN_BY["written_by"] or "lora_format" in metadata


if __name__ == "__main__":
    run_cli(main, build_parser())
