"""Generate a COCO-style image dataset with SDXL and a LoRA.

    uv run python generate_images.py --lora-checkpoint outputs/tiny/lora_step000030_*.pt \\
        --pretrained-model tiny --prompt "a red circle on a white background" --num-images 4 --image-size 64

    uv run python generate_images.py --lora-checkpoint lora_step_1800_lowest_loss.pt \\
        --prompt-file captions.txt --num-images 100 --batch-size 4 --image-size 512 \\
        --output-dir ./generated_dataset

Writes 00000.png, 00000.txt (the prompt) and 00000.json (prompt, negative prompt, seed, steps, guidance,
sampler, size, base model, LoRA file and scale) per image, numbered from 00000; image i uses seed
--seed + i. Re-running the same command continues after the last finished image and never overwrites
one; a folder that holds images made with other settings (prompts, seed, size, model, LoRA, ...) is
refused, unless --overwrite deletes them first. The folder is directly a training dataset for
train_sdxl.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

from sampling.prompts import read_prompt_file
from sdxl.errors import UserError, run_cli
from sdxl.options import (
    AT_LEAST_0,
    AT_LEAST_1,
    DEFAULT_MODEL,
    FRACTION,
    PRECISIONS,
    SAMPLER_NAMES,
    check_device,
    check_file,
    check_folder,
    check_model,
    check_numbers,
    check_output_dir,
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


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt_file:
        prompts = read_prompt_file(args.prompt_file)
    elif args.prompt:
        prompts = [args.prompt]
    else:
        raise UserError("give --prompt TEXT or --prompt-file FILE")
    if args.shuffle_prompts:
        random.Random(args.seed).shuffle(prompts)
    return prompts


def check_args(args: argparse.Namespace) -> None:
    """Every flag, checked before the heavy imports and before anything is written."""
    check_numbers(
        args,
        {
            "num_images": AT_LEAST_1,
            "batch_size": AT_LEAST_1,
            "steps": (lambda v: 1 <= v <= 1000, "between 1 and 1000"),
            "guidance_scale": AT_LEAST_0,
            "lora_scale": (lambda v: True, "a number"),
            "guidance_rescale": FRACTION,
        },
        hyphens=True,
    )
    parse_size(args.image_size)
    read_prompts(args)
    check_device(args.device, "--device")
    check_file(args.lora_checkpoint, "LoRA file")
    check_model(args.pretrained_model, "--pretrained-model")
    check_folder(args.vae, "--vae")
    check_output_dir(args.output_dir, "--output-dir")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--lora-checkpoint",
        default=None,
        help="a training checkpoint (.pt) or a LoRA .safetensors (ours, diffusers or kohya format)",
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA update")
    p.add_argument("--prompt", default=None, help="one prompt for every image")
    p.add_argument(
        "--prompt-file",
        default=None,
        help="a text file, one prompt a line (blank lines and # comments skipped); prompts cycle",
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
    p.add_argument("--num-images", type=int, default=1, help="how many images")
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
        "--precision",
        default="auto",
        choices=["auto", *PRECISIONS],
        help="UNet precision (auto: bf16 on CUDA, fp32 on the CPU)",
    )
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    return p


if __name__ == "__main__":
    # Read and check the flags before the heavy imports below, so that --help answers at once.
    run_cli(check_args, build_parser())

import torch
from tqdm import tqdm

from sampling.inference import Pipeline, apply_lora, generate_unique_batch, to_pil
from sdxl.diffusion import NoiseSchedule
from sdxl.files import FolderLock, atomic_write, make_folder, remove_stale_tmp, write_json
from sdxl.pretrained import config_folder, load_sdxl, resolve_model
from sdxl.unet import UNet2DConditionModel, config_from_diffusers
from training.checkpoint import read_lora_weights, recorded_base_model
from training.precision_util import resolve_device, resolve_precision


def check_lora_fits(lora: Path, model_folder: Path) -> None:
    """Attach the LoRA to a UNet built on the meta device: a file for another architecture fails
    here, before any weights are loaded."""
    config = json.loads((config_folder(model_folder) / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(config_from_diffusers(config))
    apply_lora(unet, read_lora_weights(lora, unet), merge=False)


def claim_output_dir(out: Path, settings: dict, overwrite: bool) -> None:
    """A folder holds images of one set of settings. Images made with other settings (or of
    unknown settings) are refused, or deleted first with --overwrite; the same settings continue."""
    images = sorted(out.glob("[0-9][0-9][0-9][0-9][0-9].png"))
    config = out / "generation_config.json"
    before = json.loads(config.read_text()).get("image_settings", {}) if config.is_file() else {}
    differ = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
    if not (images or config.is_file()) or not differ:
        return
    if not overwrite:
        what = ", ".join(differ) if before else "unknown settings (no generation_config.json)"
        raise UserError(
            f"--output-dir {out} holds {len(images)} images made with other settings ({what}); "
            "choose another folder, or pass --overwrite to delete them first"
        )
    for path in [
        config,
        *(p for i in images for p in (i, i.with_suffix(".txt"), i.with_suffix(".json"))),
    ]:
        path.unlink(missing_ok=True)


def save_image(pixels: torch.Tensor, path: Path) -> None:
    with atomic_write(
        path
    ) as tmp:  # the .png appears last: its presence means the image is finished
        to_pil(pixels).save(tmp, format="PNG")


def main(args: argparse.Namespace) -> Path:
    # -- input checks, before any model is loaded ---------------------------------------------
    check_args(args)  # again, for callers that skip the command line
    width, height = parse_size(args.image_size)
    prompts = read_prompts(args)
    lora = Path(args.lora_checkpoint) if args.lora_checkpoint else None
    base = args.pretrained_model or (recorded_base_model(lora) if lora else None) or DEFAULT_MODEL
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    model_folder = resolve_model(base, half=precision.unet_dtype != torch.float32)
    if lora is not None:
        check_lora_fits(lora, model_folder)
    schedule_flags = (args.prediction_type, args.zero_terminal_snr)  # None: as the config says
    schedule = NoiseSchedule.from_config(
        config_folder(model_folder) / "scheduler" / "scheduler_config.json", *schedule_flags
    )
    v_prediction = schedule.prediction_type == "v_prediction"
    rescale = args.guidance_rescale if args.guidance_rescale is not None else 0.7 * v_prediction
    # Everything that decides the pixels of image i (its prompt is prompts[i % len(prompts)]).
    settings = {
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "sampler": args.sampler,
        "prediction_type": schedule.prediction_type,
        "zero_terminal_snr": bool(schedule.alphas_cumprod[-1] == 0),
        "guidance_rescale": rescale,
        "width": width,
        "height": height,
        "base_model": str(model_folder.resolve()),
        "vae": str(Path(args.vae).resolve()) if args.vae else None,
        "lora": str(lora.resolve()) if lora else None,
        "lora_scale": args.lora_scale,
        "precision": precision.name,
    }

    out = make_folder(args.output_dir, "--output-dir")
    lock = FolderLock(out, "--output-dir").acquire()
    remove_stale_tmp(out)
    claim_output_dir(out, settings, args.overwrite)
    todo = [i for i in range(args.num_images) if not (out / f"{i:05d}.png").exists()]
    write_json({**vars(args), "image_settings": settings}, out / "generation_config.json")
    if not todo:
        lock.release()
        print(f"all {args.num_images} images already in {out}")
        return out

    # -- models --------------------------------------------------------------------------------
    parts = load_sdxl(model_folder, precision.unet_dtype, device, None, args.vae, *schedule_flags)
    if lora is not None:
        apply_lora(parts.unet, read_lora_weights(lora, parts.unet), args.lora_scale)
    parts.unet.to(memory_format=torch.channels_last)
    pipe = Pipeline(
        parts.unet, parts.text_encoder, parts.vae, parts.schedule, device, precision.compute_dtype
    )

    # -- generation ----------------------------------------------------------------------------
    start, done = time.perf_counter(), 0
    bar = tqdm(
        total=args.num_images,
        initial=args.num_images - len(todo),
        desc="generate",
        dynamic_ncols=True,
    )
    for b in range(0, len(todo), args.batch_size):
        indices = todo[b : b + args.batch_size]
        batch_prompts = [prompts[i % len(prompts)] for i in indices]  # prompts cycle
        seeds = [args.seed + i for i in indices]
        images = generate_unique_batch(
            pipe,
            batch_prompts,
            seeds,
            height,
            width,
            args.steps,
            args.guidance_scale,
            args.negative_prompt,
            args.sampler,
            rescale,
        )
        for i, prompt, seed, image in zip(indices, batch_prompts, seeds, images):
            meta = {
                "prompt": prompt,
                "negative_prompt": args.negative_prompt,
                "seed": seed,
                "steps": args.steps,
                "guidance_scale": args.guidance_scale,
                "sampler": args.sampler,
                "width": width,
                "height": height,
                "base_model": settings["base_model"],
                "lora": settings["lora"],
                "lora_scale": args.lora_scale,
            }
            with atomic_write(out / f"{i:05d}.txt") as tmp:
                tmp.write_text(prompt + "\n")
            write_json(meta, out / f"{i:05d}.json")
            save_image(image, out / f"{i:05d}.png")
        done += len(indices)
        bar.update(len(indices))
    bar.close()
    lock.release()
    elapsed = time.perf_counter() - start
    print(f"{done} images in {elapsed:.1f} s: {done / elapsed:.2f} images/s -> {out}")
    return out


if __name__ == "__main__":
    run_cli(main, build_parser())
