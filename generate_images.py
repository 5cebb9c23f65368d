"""Generate an image dataset with SDXL and LoRAs: a folder of files or WebDataset shards, with a
COCO captions index, from one process or many.

    uv run python generate_images.py --lora-checkpoint outputs/tiny/lora_step000030_*.pt \\
        --pretrained-model tiny --prompt "a red circle on a white background" --num-images 4 --image-size 64

    uv run python generate_images.py --lora-checkpoint lora_step_1800_lowest_loss.pt \\
        --prompt-file captions.txt --num-images 100 --batch-size 4 --image-size 512 \\
        --output-dir ./generated_dataset

    torchrun --nproc_per_node 8 generate_images.py --prompt-file prompts.jsonl --images-per-prompt 4 \\
        --lora-checkpoint style.safetensors:0.8 --lora-checkpoint subject.pt:0.5 \\
        --output-format webdataset --shard-size 1000 --image-format jpg --output-dir ./synthetic

Image i uses seed --seed + i (or its prompt row's seed), so it is the same whatever the batch size or
the number of processes. Folder output: 00000.png, 00000.txt (the prompt) and 00000.json (how it was
made) per image; WebDataset output: shard-000000.tar, ... holding key.png, key.txt and key.json. Either
way annotations/ gets the index (a COCO captions file, or the shards' keys), and the output is directly
a training dataset for train_sdxl.py. Under torchrun, each process makes its share (every
world-th image, or shard), the first one writes the folder's files. Re-running, after a crash or a
kill -9 and with any number of processes, finishes exactly the missing images (an unfinished shard
is made again); a folder that holds images made with other settings is refused, unless --overwrite
deletes them first. On a GPU each sampling step replays the UNet call as a CUDA graph (--cuda-graph
auto, the default); --compile compiles the UNet's blocks too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

from sampling.prompts import plan_batches, plan_images, read_rows
from sdxl.errors import UserError, run_cli
from sdxl.options import (
    AT_LEAST_0,
    AT_LEAST_1,
    CUDA_GRAPH_MODES,
    DEFAULT_MODEL,
    FRACTION,
    PRECISIONS,
    SAMPLER_NAMES,
    TILE_SIZE,
    VAE_TILE_SIZE,
    check_device,
    check_file,
    check_folder,
    check_model,
    check_numbers,
    check_output_dir,
    default_allocator,
)


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> width 768, height 512. Returns (width, height)."""
    try:
        w, h = (
            (int(v) for v in text.lower().split("x")) if "x" in text.lower() else (int(text),) * 2
        )
    except ValueError:
        raise UserError(
            f"--image-size {text!r} is not a size; use 512 or WIDTHxHEIGHT such as 768x512"
        ) from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise UserError(f"--image-size {text!r}: width and height must be positive multiples of 8")
    return w, h


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
    size = parse_size(args.image_size)
    return plan_images(
        rows, args.num_images, args.images_per_prompt, args.seed, size, args.negative_prompt
    )


def prompts_identity(args: argparse.Namespace) -> str:
    """A hash of what decides each image's prompt, seed and size (not how many images there are:
    asking for more extends the same sequence)."""
    source = Path(args.prompt_file).read_bytes() if args.prompt_file else args.prompt.encode()
    rules = [
        args.shuffle_prompts,
        args.seed,
        args.images_per_prompt,
        args.image_size,
        args.negative_prompt,
    ]
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
            "lora_scale": (lambda v: True, "a number"),
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
    check_model(args.pretrained_model, "--pretrained-model")
    check_folder(args.vae, "--vae")
    check_output_dir(args.output_dir, "--output-dir")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet batch")
    p.add_argument(
        "--image-size", default="1024", help="512, or WIDTHxHEIGHT such as 768x512 (multiples of 8)"
    )
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
    p.add_argument(
        "--prediction-type",
        default=None,
        choices=["epsilon", "v_prediction"],
        help="what the UNet predicts (default: the model's scheduler config)",
    )
    p.add_argument(
        "--zero-terminal-snr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a zero-terminal-SNR schedule (default: the model's scheduler config)",
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--output-dir", default="./generated_dataset", help="where the images go")
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete images already in --output-dir that were made with other settings",
    )
    p.add_argument(
        "--pretrained-model",
        default=None,
        help="an SDXL base model: a folder, a single .safetensors file, a Hub id, or 'tiny' "
        f"(default: the training checkpoint's base model, else {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--vae", type=Path, default=None, help="another VAE folder (e.g. the fp16-fix VAE)"
    )
    p.add_argument(
        "--vae-tile-size",
        type=int,
        default=VAE_TILE_SIZE,
        help="encode and decode images larger than this (px) in overlapping tiles of this size, "
        "to bound the VAE's memory (0: never tile)",
    )
    p.add_argument(
        "--fp8-base",
        action="store_true",
        help="store the UNet in fp8 (e4m3, a scale per channel) after merging the LoRAs, upcast a "
        "layer at a time: half the UNet's memory, at a small cost in fidelity",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", *PRECISIONS],
        help="UNet precision (auto: bf16 on CUDA, fp32 on the CPU)",
    )
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument(
        "--cuda-graph",
        default="auto",
        choices=CUDA_GRAPH_MODES,
        help="replay the UNet call of each sampling step as a CUDA graph, one per batch and image "
        "size (auto: on CUDA; off: eager)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet's ResNet and transformer blocks (a minute or two of "
        "compiling at the first batch, then fused kernels; pixels differ slightly)",
    )
    return p


if __name__ == "__main__":
    # Read and check the flags before the heavy imports below, so that --help answers at once.
    run_cli(check_args, build_parser())

import torch
from tqdm import tqdm

from sampling.inference import Pipeline, apply_lora, fast_unet, generate_unique_batch
from sampling.outputs import FolderWriter, ShardWriter, write_index
from sdxl.diffusion import NoiseSchedule
from sdxl.files import FolderLock, make_folder, remove_stale_tmp, write_json
from sdxl.frozen import store_in_fp8
from sdxl.lora import components
from sdxl.lora_formats import model_name
from sdxl.pretrained import config_folder, load_sdxl, meta_models, resolve_model
from training.checkpoint import read_lora_weights, recorded_base_model
from training.distributed import init_distributed
from training.precision_util import resolve_precision


def check_lora_fits(lora: Path, model_folder: Path) -> None:
    """Merge the LoRA into the models built on the meta device: a file for another architecture
    fails here, before any weights are loaded."""
    models = meta_models(model_folder)
    apply_lora(models, read_lora_weights(lora, models["unet"]))


def claim_output_dir(out: Path, settings: dict, overwrite: bool) -> None:
    """A folder holds images of one set of settings. Images made with other settings (or of
    unknown settings) are refused, or deleted first with --overwrite; the same settings continue
    (with more images, too)."""
    made = [p for p in out.iterdir() if p.name[:5].isdigit() or p.name.startswith("shard-")]
    config = out / "generation_config.json"
    before = json.loads(config.read_text()).get("image_settings", {}) if config.is_file() else {}
    differ = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
    if not (made or config.is_file()) or not differ:
        return
    if not overwrite:
        what = ", ".join(differ) if before else "unknown settings (no generation_config.json)"
        raise UserError(
            f"--output-dir {out} holds {len(made)} files made with other settings ({what}); "
            "choose another folder, or pass --overwrite to delete them first"
        )
    for path in [
        config,
        out / "annotations" / "captions.json",
        out / "annotations" / "index.json",
        *made,
    ]:
        path.unlink(missing_ok=True)


def main(args: argparse.Namespace) -> Path:
    # -- the images to make, the model, the output folder: checked before any model is loaded ---
    check_args(args)  # again, for callers that skip the command line
    default_allocator()  # before CUDA starts
    jobs = plan(args)
    adapters = loras(args)
    first = adapters[0][0] if adapters else None
    base = args.pretrained_model or (recorded_base_model(first) if first else None) or DEFAULT_MODEL
    dist = init_distributed(args.device)
    precision = resolve_precision(args.precision, dist.device)
    model_folder = resolve_model(base, half=precision.unet_dtype != torch.float32)
    for lora, _ in adapters:
        check_lora_fits(lora, model_folder)
    schedule_flags = (args.prediction_type, args.zero_terminal_snr)  # None: as the config says
    config_file = config_folder(model_folder) / "scheduler" / "scheduler_config.json"
    schedule = NoiseSchedule.from_config(config_file, *schedule_flags)
    v_prediction = schedule.prediction_type == "v_prediction"
    rescale = args.guidance_rescale if args.guidance_rescale is not None else 0.7 * v_prediction
    # Everything that decides the pixels of image i, besides its own row in `jobs`.
    settings = {
        "prompts_sha256": prompts_identity(args),
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "guidance_rescale": rescale,
        "sampler": args.sampler,
        "prediction_type": schedule.prediction_type,
        "zero_terminal_snr": bool(schedule.alphas_cumprod[-1] == 0),
        "base_model": str(model_folder.resolve()),
        "vae": str(Path(args.vae).resolve()) if args.vae else None,
        "loras": [[str(path.resolve()), scale] for path, scale in adapters],
        "precision": precision.name,
        "fp8_base": args.fp8_base,
        "compile": args.compile,  # fused kernels round differently (graphs replay the same ones)
        "vae_tile_size": args.vae_tile_size,  # tiled images differ a little from whole ones
        "output": [
            args.output_format,
            args.image_format,
            args.shard_size if args.output_format == "webdataset" else None,
        ],
    }
    out = make_folder(args.output_dir, "--output-dir")
    lock = None
    with dist.first_process_first():  # the first process claims the folder, then the others start
        if dist.main:
            lock = FolderLock(out, "--output-dir").acquire()
            remove_stale_tmp(out)
            claim_output_dir(out, settings, args.overwrite)
            write_json({**vars(args), "image_settings": settings}, out / "generation_config.json")
    shards = args.output_format == "webdataset"
    writers = args.writers
    writer = (
        ShardWriter(out, args.shard_size, len(jobs), args.image_format, args.quality, writers)
        if shards
        else FolderWriter(out, args.image_format, args.quality, writers)
    )
    # This process's share: every world-th batch (for shards, every world-th shard), unless written.
    batches = plan_batches(jobs, args.batch_size, args.shard_size if shards else None)
    share = (lambda k, b: b[0]["index"] // args.shard_size) if shards else (lambda k, b: k)
    todo = [
        batch
        for k, batch in enumerate(batches)
        if share(k, batch) % dist.world == dist.rank
        and not all(writer.done(j["index"]) for j in batch)
    ]

    # -- models ----------------------------------------------------------------------------------
    if todo:
        # The text encoders stay on the device: each batch needs them, and moving their 1.6 GiB
        # there and back for every batch would add a transfer to each batch (not yet measured).
        parts = load_sdxl(
            model_folder,
            precision.unet_dtype,
            dist.device,
            None,
            args.vae,
            *schedule_flags,
            args.vae_tile_size,
        )
        models = components(parts.unet, parts.text_encoder)
        for lora, scale in adapters:  # each merged into the weights, one after the other
            apply_lora(models, read_lora_weights(lora, parts.unet), scale)
        if args.fp8_base:  # after the merges, which need the weights in full precision
            store_in_fp8(parts.unet)
        parts.unet.to(memory_format=torch.channels_last)
        pipe = Pipeline(
            parts.unet,
            parts.text_encoder,
            parts.vae,
            parts.schedule,
            dist.device,
            precision.compute_dtype,
            fast_unet(
                parts.unet, args.cuda_graph == "auto" and dist.device.type == "cuda", args.compile
            ),
        )

    # -- generation: the share's batches, each image written unless it already is ----------------
    start = time.perf_counter()
    total = sum(len(batch) for batch in todo)
    bar = tqdm(total=total, desc="generate", dynamic_ncols=True, disable=not dist.main)
    for batch in todo:
        images = generate_unique_batch(
            pipe,
            [j["prompt"] for j in batch],
            [j["seed"] for j in batch],
            batch[0]["height"],
            batch[0]["width"],
            args.steps,
            args.guidance_scale,
            batch[0]["negative_prompt"],
            args.sampler,
            rescale,
        )
        for job, image in zip(batch, images):
            if writer.done(job["index"]):  # made by a run that stopped in this batch
                continue
            meta = {
                **{k: v for k, v in job.items() if k != "extra"},
                **job["extra"],
                "steps": args.steps,
                "guidance_scale": args.guidance_scale,
                "guidance_rescale": rescale,
                "sampler": args.sampler,
                "base_model": model_name(base),
                "loras": [[path.name, scale] for path, scale in adapters],
            }
            writer.submit(job["index"], image, job["prompt"], meta)
        bar.update(len(batch))
    writer.close()
    bar.close()
    elapsed = time.perf_counter() - start
    dist.barrier()  # every process's images are written: the first indexes them all
    if lock is not None:
        index = write_index(out, len(jobs), args.image_format, args.shard_size if shards else None)
        print(
            f"{total} images in {elapsed:.1f} s: {total / max(elapsed, 1e-9):.2f} images/s "
            f"({dist.world} processes) -> {out}; index {index}"
        )
        lock.release()
    dist.close()
    return out


if __name__ == "__main__":
    run_cli(main, build_parser())
