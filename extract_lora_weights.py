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

from cli.choices import LORA_FORMATS, PRECISIONS
from cli.options import Parser, check_file, run_cli
from sdxl.errors import UserError


def check_args(args: argparse.Namespace) -> None:
    """The flags, checked before the heavy imports."""
    check_file(args.checkpoint, "checkpoint")
    if args.output is not None and Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file name in it")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(args: argparse.Namespace) -> Path:
    check_args(args)  # before the heavy imports
    from sdxl.checkpoint import (
        adapter_modules,
        load_checkpoint,
        lora_metadata,
        unet_weights,
        write_unet_file,
    )
    from sdxl.device import DTYPES
    from sdxl.lora_formats import model_name, save_lora_file, written_here

    checkpoint = Path(args.checkpoint)
    ckpt = load_checkpoint(checkpoint, mmap=True)
    suffix = f"_{args.format}" + ("_ema" if args.ema else "")
    output = Path(args.output or checkpoint.with_name(checkpoint.stem + suffix + ".safetensors"))
    if output.exists() and not args.overwrite and not written_here(output):
        raise UserError(
            f"--output {output} exists and is not a file this script wrote; "
            "choose another name or pass --overwrite"
        )
    dtype = DTYPES[args.dtype]
    if ckpt["lora"] is None:  # full fine-tuning
        if args.format != "native" or args.ema:
            raise UserError(
                "a full fine-tuning checkpoint exports its UNet in native format only, without --ema"
            )
        info = {
            "base_model": model_name(ckpt["config"].get("base_model", "")),
            "step": ckpt["step"],
        }
        write_unet_file(output, unet_weights(ckpt, checkpoint, dtype), info)
    else:  # the LoRA, with the metadata of the file beside the checkpoint
        info = {**lora_metadata(ckpt), "ema": int(args.ema)}
        layers = ckpt["unet_config"]["layers_per_block"]  # kohya names count blocks per level
        save_lora_file(output, adapter_modules(ckpt, args.ema), args.format, info, dtype, layers)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, {args.format}, {args.dtype})")
    return output


if __name__ == "__main__":
    run_cli(main, build_parser())
