"""generate_images.py's command line: its flags, their checks, and the images they ask for. Free of
torch, so that --help and a bad flag answer at once."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from cli.choices import (
    CUDA_GRAPH_MODES,
    DEFAULT_MODEL,
    PRECISIONS,
    PREDICTION_TYPES,
    SAMPLER_NAMES,
    VAE_TILE_SIZE,
)
from cli.evaluate import add_evaluation_flags, check_evaluation
from cli.options import (
    ANY,
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    TILE_SIZE,
    Parser,
    add_shared,
    check_device,
    check_file,
    check_folder,
    check_model,
    check_numbers,
    check_output_dir,
    lenient_negatives,
)
from sampling.prompts import plan_images, read_rows
from sdxl.errors import UserError


def parse_args(argv: list[str], description: str = "") -> argparse.Namespace:
    return build_parser(description).parse_args(argv)


def loras(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """The --lora-checkpoint FILE[:SCALE] flags as (file, scale)."""
    out = []
    for spec in args.lora_checkpoint:
        path, _, scale = spec.rpartition(":")
        try:
            out.append((Path(path), float(scale)) if path else (Path(spec), args.lora_scale))
        except ValueError:  # a colon that is part of the name
            out.append((Path(spec), args.lora_scale))
    return out


def plan(args: argparse.Namespace) -> list[dict]:
    """Every image of the run: its index, prompt, negative prompt, seed and size."""
    if args.prompt_file:
        rows = read_rows(args.prompt_file)
    elif args.prompt:
        rows = [{"prompt": args.prompt}]
    else:
        raise UserError("give --prompt TEXT or --prompt-file FILE")
    if args.shuffle_prompts:
        random.Random(args.seed).shuffle(rows)
    return plan_images(
        rows,
        args.num_images,
        args.images_per_prompt,
        args.seed,
        args.image_size,
        args.negative_prompt,
    )


def prompts_identity(args: argparse.Namespace) -> str:
    """A hash of what decides each image's prompt, seed and size (not how many images there are:
    asking for more extends the same sequence)."""
    source = Path(args.prompt_file).read_bytes() if args.prompt_file else args.prompt.encode()
    w, h = args.image_size
    size = str(w) if w == h else f"{w}x{h}"  # as it was typed, so that older folders continue
    rules = [args.shuffle_prompts, args.seed, args.images_per_prompt, size, args.negative_prompt]
    return hashlib.sha256(source + json.dumps(rules).encode()).hexdigest()


def check_args(args: argparse.Namespace) -> None:
    """Every flag, checked before the heavy imports and before anything is written."""
    check_numbers(
        args,
        {
            "num_images": AT_LEAST_1,
            "images_per_prompt": AT_LEAST_1,
            "batch_size": AT_LEAST_1,
            "steps": (lambda v: 1 <= v <= 1000, "between 1 and 1000"),
            "guidance_scale": AT_LEAST_0,
            "lora_scale": ANY,
            "guidance_rescale": FRACTION,
            "shard_size": AT_LEAST_1,
            "quality": (lambda v: 1 <= v <= 100, "between 1 and 100"),
            "writers": AT_LEAST_0,
            "vae_tile_size": TILE_SIZE,
        },
        hyphens=True,
    )
    plan(args)
    check_device(args.device, "--device")
    for path, _ in loras(args):
        check_file(path, "LoRA file")
    if not args.estimate_memory:  # (the preflight reads the configs, shipped ones if need be)
        check_model(args.pretrained_model, "--pretrained-model")
    check_folder(args.vae, "--vae")
    check_output_dir(args.output_dir, "--output-dir")
    if args.evaluate is not None:
        check_evaluation(args.evaluate or None, "--evaluate")
        check_numbers(args, {"duplicate_threshold": FRACTION}, hyphens=True)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--lora-checkpoint",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a training checkpoint (.pt) or a LoRA .safetensors (ours, diffusers or kohya format), "
        "with its strength after a colon (default --lora-scale); repeat for several LoRAs",
    )
    p.add_argument(
        "--lora-scale", type=float, default=1.0, help="strength of a LoRA given no scale"
    )
    p.add_argument("--prompt", default=None, help="one prompt for every image")
    p.add_argument(
        "--prompt-file",
        default=None,
        help="prompts: .txt (one a line, # comments), .jsonl or .csv (per row: prompt, and "
        "optionally negative_prompt, seed, num_images, width, height; other columns go into each "
        "image's JSON)",
    )
    p.add_argument(
        "--images-per-prompt", type=int, default=1, help="images of each prompt (a row may say)"
    )
    p.add_argument(
        "--shuffle-prompts",
        action="store_true",
        help="shuffle the prompt file's order (with --seed)",
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="negative prompt (default: none, i.e. SDXL's zero embedding)",
    )
    p.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="how many images (default: each prompt's); the prompts are cut or cycled to this",
    )
    add_shared(p, "batch_size", True, help="images per UNet batch")
    add_shared(p, "image_size", True, help="1024, or WIDTHxHEIGHT such as 768x512 (multiples of 8)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=5.0,
        help="classifier-free guidance scale (1 disables it)",
    )
    p.add_argument("--sampler", default="euler", choices=SAMPLER_NAMES, help="sampling algorithm")
    p.add_argument(
        "--guidance-rescale",
        type=float,
        default=None,
        help="mix in guidance rescaled to the conditional prediction's spread (Lin et al. 2023); "
        "default 0.7 for a v-prediction model, else 0",
    )
    add_shared(p, "prediction_type", True, choices=PREDICTION_TYPES)
    add_shared(p, "zero_terminal_snr", True)
    add_shared(p, "seed", True, help="image i uses seed + i")
    add_shared(p, "output_dir", True, default="./generated_dataset", help="where the images go")
    p.add_argument(
        "--output-format",
        default="folder",
        choices=["folder", "webdataset"],
        help="files in the folder, or WebDataset tar shards (shard-000000.tar, ...)",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="images per WebDataset shard")
    p.add_argument("--image-format", default="png", choices=["png", "jpg", "webp"], help="format")
    p.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality")
    p.add_argument(
        "--writers", type=int, default=2, help="threads that encode and write images (0: none)"
    )
    add_shared(
        p,
        "overwrite",
        True,
        help="delete images already in --output-dir that were made with other settings",
    )
    add_shared(
        p,
        "pretrained_model",
        True,
        default=None,
        help="an SDXL base model: a folder, a single .safetensors file, a Hub id, or 'tiny' "
        f"(default: the training checkpoint's base model, else {DEFAULT_MODEL})",
    )
    add_shared(p, "vae", True)
    add_shared(p, "vae_tile_size", True, default=VAE_TILE_SIZE)
    add_shared(
        p,
        "fp8_base",
        True,
        help="store the UNet in fp8 (e4m3, a scale per channel) after merging the LoRAs, upcast a "
        "layer at a time: half the UNet's memory, at a small cost in fidelity",
    )
    add_shared(p, "precision", True, choices=["auto", *PRECISIONS])
    add_shared(p, "device", True)
    add_shared(
        p,
        "cuda_graph",
        True,
        choices=CUDA_GRAPH_MODES,
        help="replay the UNet call of each sampling step as a CUDA graph, one per batch and image "
        "size (auto: on CUDA; off: eager)",
    )
    add_shared(
        p,
        "compile",
        True,
        help="torch.compile the UNet's ResNet and transformer blocks (a minute or two of "
        "compiling at the first batch, then fused kernels; pixels differ slightly)",
    )
    g = p.add_argument_group("scoring the images made (uv sync --extra evaluate)")
    g.add_argument(
        "--evaluate",
        nargs="?",
        const="",
        default=None,
        metavar="REF",
        help="at the end, score the folder as evaluate_dataset.py does: against real images REF "
        "(a folder, shards, or saved .npz statistics) for FID, KID, precision and recall; "
        "without REF, CLIP score and diversity only",
    )
    add_evaluation_flags(g)
    p.add_argument(
        "--estimate-memory",
        action="store_true",
        help="print the run's predicted GPU memory (max_memory_reserved) phase by phase and exit: "
        "on any machine, in seconds, without weights or a GPU",
    )
    return lenient_negatives(p)
