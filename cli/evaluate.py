"""evaluate_dataset.py's command line (and generate_images.py's --evaluate): its flags and their
checks. Free of torch, so that --help and a bad flag answer at once."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

from cli.options import AT_LEAST_1, FRACTION, Parser, check_device, check_numbers, check_output_dir
from sdxl.errors import UserError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def parse_args(argv: list[str], description: str = "") -> argparse.Namespace:
    return build_parser(description).parse_args(argv)


def check_evaluation(value: str | None, name: str) -> None:
    """The scoring packages installed, and the reference (if any): a folder of images or shards,
    or saved statistics (.npz)."""
    missing = [p for p in ("torchmetrics", "torch_fidelity") if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"scoring images needs {' and '.join(missing)}: uv sync --extra evaluate")
    if value is None:
        return
    path = Path(value)
    if path.suffix == ".npz" and not path.is_file():
        raise UserError(f"{name} {path}: no such statistics file (--save-reference writes one)")
    if path.suffix != ".npz" and not path.is_dir():
        raise UserError(f"{name} {path} is not a folder of real images or shards, or a .npz file")


def check_args(args: argparse.Namespace) -> None:
    if not Path(args.data).is_dir():
        raise UserError(f"DATA {args.data} is not a folder of images or .tar shards")
    check_evaluation(args.reference, "--reference")
    check_numbers(args, {"duplicate_threshold": FRACTION, "batch_size": AT_LEAST_1}, hyphens=True)
    check_device(args.device, "--device")
    if args.save_reference is not None:
        if args.reference is None or args.reference.endswith(".npz"):
            raise UserError(
                "--save-reference saves the statistics of a --reference folder; give one"
            )
        check_output_dir(Path(args.save_reference).parent, "--save-reference's folder")


def add_evaluation_flags(g: Any, prefix: str = "") -> None:
    """The flags that choose the networks and thresholds (shared with generate_images.py)."""
    g.add_argument(
        f"--{prefix}clip-model",
        default=DEFAULT_CLIP,
        help="the CLIP model of the CLIP score, diversity and duplicates (any CLIP on the Hub)",
    )
    g.add_argument(
        f"--{prefix}duplicate-threshold",
        type=float,
        default=0.95,
        help="two images whose CLIP embeddings' cosine similarity exceeds this are near-duplicates",
    )


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="the images: a folder (captions in name.txt) or WebDataset shards")
    p.add_argument(
        "--reference",
        default=None,
        help="real images to compare with (a folder or shards, e.g. COCO val2014), or their "
        "statistics saved by --save-reference (.npz); without it FID, KID, precision and "
        "recall are left out",
    )
    p.add_argument(
        "--save-reference",
        default=None,
        help="save the reference's Inception features here (.npz), for later runs",
    )
    add_evaluation_flags(p)
    p.add_argument("--batch-size", type=int, default=32, help="images per network call")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument(
        "--output",
        default=None,
        help="where the report goes (default: DATA/annotations/quality.json)",
    )
    return p
