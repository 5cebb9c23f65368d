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
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from cli.choices import DEFAULT_MODEL
from cli.generate import check_args, loras, parse_args, plan, prompts_identity
from cli.options import run_cli
from sdxl.errors import UserError


def main(args: argparse.Namespace) -> Path | int:
    """Make the images the flags ask for that the folder does not hold yet; returns the folder."""
    check_args(args)  # every flag, before the heavy imports (about 20 s on a small machine)
    if args.estimate_memory:
        return estimate_memory(args)
    import torch
    from tqdm import tqdm

    from sampling.inference import generate_unique_batch
    from sampling.outputs import write_index
    from sampling.quality import load_embedders
    from sdxl.checkpoint import recorded_base_model
    from sdxl.device import default_allocator, init_distributed, resolve_precision
    from sdxl.files import make_folder
    from sdxl.lora_formats import model_name
    from sdxl.pretrained import resolve_model, schedule_of

    # -- the images to make, the model, the output folder: checked before any model is loaded ---
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
    scorers = load_embedders(args.clip_model) if args.evaluate is not None else None  # fail early
    predicted = None
    if dist.device.type == "cuda" and dist.main:  # stops here if the run would not fit the card
        predicted = predict_on_cuda(args, model_folder, adapters, jobs, dist.device)
    schedule = schedule_of(model_folder, args.prediction_type, args.zero_terminal_snr)
    v_prediction = schedule.prediction_type == "v_prediction"
    rescale = args.guidance_rescale if args.guidance_rescale is not None else 0.7 * v_prediction
    settings = image_settings(args, model_folder, adapters, precision.name, schedule, rescale)
    out = make_folder(args.output_dir, "--output-dir")
    lock = claim(out, settings, args, dist)  # the first process's, released however the run ends
    with lock or contextlib.nullcontext():
        writer, todo = this_share(args, jobs, out, dist)
        if todo:
            pipe = load_pipeline(args, model_folder, adapters, precision, dist)

        # -- generation: the share's batches, each image written unless it already is ----------------
        start = time.perf_counter()
        total = sum(len(batch) for batch in todo)
        bar = tqdm(total=total, desc="generate", dynamic_ncols=True, disable=not dist.main)
        made_with = {"steps": args.steps, "guidance_scale": args.guidance_scale}
        made_with |= {"guidance_rescale": rescale, "sampler": args.sampler}
        made_with |= {"base_model": model_name(base), "loras": [[p.name, s] for p, s in adapters]}
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
            if not torch.isfinite(
                images
            ).all():  # (one sync a batch; writing the images syncs anyway)
                raise UserError(
                    f"images {batch[0]['index']}-{batch[-1]['index']} came out as NaN or Inf; the "
                    "model or a LoRA overflows here (try --precision fp32, or the fp16-fix --vae)"
                )
            for job, image in zip(batch, images):
                if writer.done(job["index"]):  # made by a run that stopped in this batch
                    continue
                meta = {
                    **{k: v for k, v in job.items() if k != "extra"},
                    **job["extra"],
                    **made_with,
                }
                writer.submit(job["index"], image, job["prompt"], meta)
            bar.update(len(batch))
        writer.close()
        bar.close()
        elapsed = time.perf_counter() - start
        dist.barrier()  # every process's images are written: the first indexes them all
        if lock is not None:
            shards = args.shard_size if args.output_format == "webdataset" else None
            index = write_index(out, len(jobs), args.image_format, shards)
            print(
                f"{total} images in {elapsed:.1f} s: {total / max(elapsed, 1e-9):.2f} images/s "
                f"({dist.world} processes) -> {out}; index {index}"
            )
    if args.evaluate is not None:
        evaluate_output(args, out, scorers, dist)
    if predicted is not None:  # the memory preflight against what this run took
        measured = torch.cuda.max_memory_reserved(dist.device) / 2**30
        print(
            f"max_memory_reserved: predicted {predicted / 2**30:.2f} GiB, measured {measured:.2f}"
        )
    dist.close()
    return out


def evaluate_output(args: argparse.Namespace, out: Path, nets: Any, dist: Any) -> None:
    """--evaluate: the folder scored as evaluate_dataset.py scores it (every process embeds its
    share; the first writes annotations/quality.json)."""
    from sampling.quality import evaluate

    reference = Path(args.evaluate) if args.evaluate else None
    evaluate(out, reference, lambda: nets, dist, threshold=args.duplicate_threshold)


def claim(out: Path, settings: dict, args: argparse.Namespace, dist: Any) -> Any:
    """The folder, claimed by the first process (its lock, None for the others), before the others
    start: a folder holds the images of one set of settings (sampling/outputs.py)."""
    from sampling.outputs import claim_image_folder
    from sdxl.files import FolderLock, remove_stale_tmp, write_json

    lock = None
    with dist.first_process_first():
        if dist.main:
            lock = FolderLock(out, "--output-dir").acquire()
            try:
                remove_stale_tmp(out)
                claim_image_folder(out, settings, args.overwrite)
                config = {**vars(args), "image_settings": settings}
                write_json(config, out / "generation_config.json")
            except BaseException:
                lock.release()
                raise
    return lock


def this_share(args: argparse.Namespace, jobs: list[dict], out: Path, dist: Any) -> tuple:
    """The writer of the folder's files or shards, and this process's batches: every world-th
    batch (for shards, every world-th shard), unless its images are written already."""
    from sampling.outputs import FolderWriter, ShardWriter
    from sampling.prompts import plan_batches

    shards = args.output_format == "webdataset"
    writer = (
        ShardWriter(out, args.shard_size, len(jobs), args.image_format, args.quality, args.writers)
        if shards
        else FolderWriter(out, args.image_format, args.quality, args.writers)
    )
    batches = plan_batches(jobs, args.batch_size, args.shard_size if shards else None)
    share = (lambda k, b: b[0]["index"] // args.shard_size) if shards else (lambda k, b: k)
    todo = [
        batch
        for k, batch in enumerate(batches)
        if share(k, batch) % dist.world == dist.rank
        and not all(writer.done(j["index"]) for j in batch)
    ]
    return writer, todo


def estimate(args: argparse.Namespace, model: Path, adapters: list, jobs: list[dict]) -> Any:
    """The memory preflight of this run (sampling/preflight.py) at its largest image."""
    from sampling.preflight import estimate_generation

    largest = max(jobs, key=lambda j: j["width"] * j["height"])
    return estimate_generation(
        model,
        size=(largest["width"], largest["height"]),
        batch=min(args.batch_size, len(jobs)),
        loras=adapters,
        precision=args.precision,
        fp8_base=args.fp8_base,
        cuda_graph=args.cuda_graph == "auto",
        vae_tile_size=args.vae_tile_size,
        guidance_scale=args.guidance_scale,
    )


def estimate_memory(args: argparse.Namespace) -> int:
    """--estimate-memory: the run's predicted GPU memory, phase by phase; nothing else is done."""
    from sdxl.pretrained import model_configs

    model, note = model_configs(args.pretrained_model or DEFAULT_MODEL)
    trace = estimate(args, model, loras(args), plan(args))
    print("\n".join([note, trace.report()]).strip())
    return 0


def predict_on_cuda(
    args: argparse.Namespace, model: Path, adapters: list, jobs: list[dict], device: Any
) -> int:
    """At the start of a run on a GPU: the predicted max_memory_reserved in one line; a run that
    would not fit the card stops here, with flags that would."""
    import torch

    from sdxl.memory import GiB

    peak = estimate(args, model, adapters, jobs).peak
    total = torch.cuda.get_device_properties(device).total_memory
    print(
        f"memory preflight: predicted max_memory_reserved {peak / GiB:.2f} GiB of the card's "
        f"{total / GiB:.1f} GiB (--estimate-memory shows each phase)"
    )
    if peak > total:
        raise UserError(
            f"this run is predicted to need {peak / GiB:.1f} GiB of GPU memory, more than the "
            f"card's {total / GiB:.1f} GiB; try --fp8-base, a smaller --batch-size, or "
            "--cuda-graph off"
        )
    return peak


def check_lora_fits(lora: Path, model_folder: Path) -> None:
    """Merge the LoRA into the models built on the meta device: a file for another architecture
    fails here, before any weights are loaded."""
    from sampling.inference import apply_lora
    from sdxl.checkpoint import read_lora_weights
    from sdxl.lora import components
    from sdxl.pretrained import config_parts

    parts = config_parts(model_folder)
    models = components(parts.unet, parts.text_encoder)
    apply_lora(models, read_lora_weights(lora, parts.unet))


def image_settings(
    args: argparse.Namespace,
    model_folder: Path,
    adapters: list[tuple[Path, float]],
    precision: str,
    schedule: Any,
    rescale: float,
) -> dict:
    """Everything that decides the pixels of image i, besides its own row of the plan: a folder
    holds the images of one set of these (sampling/outputs.py: claim_image_folder)."""
    from sdxl.files import file_sha256
    from sdxl.pretrained import model_identity

    return {
        "prompts_sha256": prompts_identity(args),
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "guidance_rescale": rescale,
        "sampler": args.sampler,
        "prediction_type": schedule.prediction_type,
        "zero_terminal_snr": bool(schedule.alphas_cumprod[-1] == 0),
        "base_model": str(model_folder.resolve()),
        "base_model_identity": model_identity(model_folder),  # its weights, not just where
        "vae": str(Path(args.vae).resolve()) if args.vae else None,
        "loras": [[str(path.resolve()), scale] for path, scale in adapters],
        "loras_sha256": [file_sha256(path) for path, _ in adapters],
        "precision": precision,
        "fp8_base": args.fp8_base,
        "compile": args.compile,  # fused kernels round differently (graphs replay the same ones)
        "vae_tile_size": args.vae_tile_size,  # tiled images differ a little from whole ones
        "output": [
            args.output_format,
            args.image_format,
            args.shard_size if args.output_format == "webdataset" else None,
        ],
    }


def load_pipeline(
    args: argparse.Namespace,
    model_folder: Path,
    adapters: list[tuple[Path, float]],
    precision: Any,
    dist: Any,
) -> Any:
    """The models, with the LoRAs merged in, as one sampling Pipeline on the device
    (sampling/inference.py: build_pipeline)."""
    from sampling.inference import build_pipeline
    from sdxl.checkpoint import read_lora_weights
    from sdxl.pretrained import load_sdxl

    def load(device: Any) -> Any:
        return load_sdxl(
            model_folder,
            precision.unet_dtype,
            device=device,
            vae_folder=args.vae,
            prediction_type=args.prediction_type,
            zero_terminal_snr=args.zero_terminal_snr,
            vae_tile_size=args.vae_tile_size,
        )

    return build_pipeline(
        load,
        lambda unet: [(read_lora_weights(path, unet), scale) for path, scale in adapters],
        device=dist.device,
        dtype=precision.compute_dtype,
        fp8_base=args.fp8_base,
        cuda_graph=args.cuda_graph == "auto" and dist.device.type == "cuda",
        compile=args.compile,
    )


if __name__ == "__main__":
    run_cli(main, lambda: parse_args(sys.argv[1:], __doc__))
