"""lora_tools.py's command line: four commands (resize, extract, merge, combine), their flags and
checks. Free of torch, so that --help and a bad flag answer at once."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.choices import LORA_FORMATS, PRECISIONS
from cli.options import Parser, check_file, check_model
from sdxl.errors import UserError

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")  # sdxl/lora_svd.py: chosen_rank


def parse_args(argv: list[str], description: str = "") -> argparse.Namespace:
    return build_parser(description).parse_args(argv)


def lora_and_scale(spec: str) -> tuple[Path, float]:
    """LORA[:SCALE] -> (file, scale); a colon that is part of the name is kept."""
    path, _, scale = spec.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(spec), 1.0)
    except ValueError:
        return Path(spec), 1.0


def check_args(args: argparse.Namespace) -> None:
    """Every flag, before the heavy imports: the inputs exist, the numbers make sense, the output is
    a .safetensors file name that is not a folder."""
    for spec in getattr(args, "loras", []):
        check_file(lora_and_scale(spec)[0], "LORA")
    if getattr(args, "input", None):
        check_file(args.input, "IN")
    for name in ("base", "tuned", "model"):
        if getattr(args, name, None) is not None:
            check_model(getattr(args, name), f"--{name}")
    for name in ("rank", "conv_rank"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if args.command == "resize":
        if (args.rank is None) == (args.dynamic is None) and args.rank is None:
            raise UserError("resize needs --rank R, or --dynamic METHOD --param X (or both)")
        if (args.dynamic is None) != (args.param is None):
            raise UserError("--dynamic and --param go together (e.g. --dynamic sv_fro --param 0.9)")
        if args.dynamic in ("sv_fro", "sv_cumulative") and not 0 < args.param <= 1:
            raise UserError(f"--param of {args.dynamic} is a fraction in (0, 1], got {args.param}")
        if args.dynamic == "sv_ratio" and args.param < 1:
            raise UserError(f"--param of sv_ratio is a ratio of at least 1, got {args.param}")
    if args.command == "extract" and args.threshold < 0:
        raise UserError(f"--threshold must be at least 0, got {args.threshold}")
    output = Path(args.output)
    if output.is_dir() or output.suffix != ".safetensors":
        raise UserError(f"--output {output}: give a .safetensors file name")
    if not output.parent.is_dir():
        raise UserError(f"--output {output}: the folder {output.parent} does not exist")


def add_output(p: argparse.ArgumentParser, lora: bool = True) -> None:
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output even if it is not a file this project wrote",
    )
    if lora:
        p.add_argument(
            "--format",
            default="kohya",
            choices=LORA_FORMATS,
            help="file layout (kohya: ComfyUI, AUTOMATIC1111, Forge, sd-scripts)",
        )
    p.add_argument(
        "--dtype",
        default="fp16",
        choices=PRECISIONS,
        help="dtype of the written tensors",
    )


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="the model the LoRAs are for, whose module names and layer shapes they need (read "
        "from its configs; no weights are loaded): default SDXL base 1.0's configs, shipped",
    )


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    resize = commands.add_parser("resize", help="a LoRA at another rank (SVD)")
    add_model(resize)
    resize.add_argument("input", metavar="IN", help="a LoRA file (any kind) or a checkpoint (.pt)")
    resize.add_argument(
        "--rank", type=int, default=None, help="the new rank (with --dynamic: the most)"
    )
    resize.add_argument(
        "--dynamic",
        choices=DYNAMIC,
        default=None,
        help="choose each layer's rank from its singular values: sv_ratio (keep those at least "
        "the largest / X), sv_fro (keep a fraction X of the Frobenius norm), sv_cumulative (keep "
        "a fraction X of their sum), as kohya's resize_lora.py",
    )
    resize.add_argument("--param", type=float, default=None, help="X of --dynamic")
    add_output(resize)

    extract = commands.add_parser("extract", help="a LoRA from the difference of two models")
    extract.add_argument("--base", required=True, help="the base model (folder, file, Hub id)")
    extract.add_argument(
        "--tuned",
        required=True,
        help="the fine-tuned model: folder, single file, Hub id, or a full fine-tune's checkpoint",
    )
    extract.add_argument("--rank", type=int, required=True, help="rank of Linear and 1x1 layers")
    extract.add_argument(
        "--conv_rank",
        type=int,
        default=None,
        help="rank of the 3x3 convolutions (default: leave them out, as kohya's conv_dim)",
    )
    extract.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="leave out layers whose largest weight change is at most this (kohya's min_diff)",
    )
    add_output(extract)

    merge = commands.add_parser("merge", help="LoRAs merged into a model, one SGM file")
    merge.add_argument("--base", required=True, help="the model (folder, single file, Hub id)")
    merge.add_argument("loras", nargs="+", metavar="LORA[:SCALE]", help="LoRA files, any kind")
    add_output(merge, lora=False)

    combine = commands.add_parser("combine", help="several LoRAs as one")
    add_model(combine)
    combine.add_argument("loras", nargs="+", metavar="LORA[:SCALE]", help="LoRA files")
    combine.add_argument(
        "--rank",
        type=int,
        default=None,
        help="factor the summed update to this rank (default: concatenate the ranks, exactly; "
        "needed for kinds other than LoRA)",
    )
    add_output(combine)
    return p
