"""Images/s of a whole LoRA training step, with where the time goes.

The step is split into its parts (data loading and augmentation, VAE encode, text encode, UNet
forward + backward, optimizer) and each is timed separately, on the tiny SDXL, a mid-size random SDXL,
or a real SDXL folder. On CUDA the peak `max_memory_reserved` and `max_memory_allocated` are printed too.

Each run measures the step with the VAE and text encoders, then with cached latents and text
embeddings (computed once, up front), and prints the images/s ratio.

    uv run python bench/train_throughput.py --model tiny --image_size 64
    uv run python bench/train_throughput.py --model mid --image_size 256 --steps 5
    uv run python bench/train_throughput.py --model ./weights/sdxl-base-1.0 --image_size 512 --rank 4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_sdxl
from sdxl.pretrained import (
    clip_byte_vocab,
    load_sdxl,
    resolve_model,
    tiny_cache_dir,
    tiny_configs,
    write_random_sdxl,
)
from training.cache import encoders
from training.data_loader import TrainingData, collate
from training.distributed import Distributed
from training.precision_util import resolve_device, resolve_precision
from training.scan import scan
from training.train_loop import build_trainer, micro_batch_loss, optimizer_update


def mid_sdxl() -> Path:
    """A random SDXL at about a quarter of the real widths, written once into the cache."""
    folder = tiny_cache_dir().with_name("mid-sdxl-v1")
    if not (folder / "model_index.json").is_file():
        configs = tiny_configs(len(clip_byte_vocab()[0]))
        configs["unet"].update(
            block_out_channels=[128, 256, 512],
            transformer_layers_per_block=[1, 2, 4],
            attention_head_dim=[2, 4, 8],
            cross_attention_dim=128 + 256,
            addition_time_embed_dim=64,
            projection_class_embeddings_input_dim=256 + 6 * 64,
            norm_num_groups=32,
        )
        configs["vae"].update(
            block_out_channels=[32, 64, 128, 128], layers_per_block=2, norm_num_groups=32
        )
        configs["text_encoder"].update(
            hidden_size=128,
            intermediate_size=512,
            num_attention_heads=2,
            num_hidden_layers=4,
            projection_dim=128,
        )
        configs["text_encoder_2"].update(
            hidden_size=256,
            intermediate_size=1024,
            num_attention_heads=4,
            num_hidden_layers=4,
            projection_dim=256,
        )
        write_random_sdxl(folder, configs)
    return folder


def main(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    dist = Distributed(0, 1, device)
    folder = mid_sdxl() if args.model == "mid" else resolve_model(args.model)
    precision = resolve_precision(args.precision, device)
    parts = load_sdxl(folder, precision.unet_dtype, device, precision.text_dtype)
    data = TrainingData(scan(args.data_dir), args.image_size, random_flip=True)
    # The training script's own options (LoRA on the attention projections, alpha = rank,
    # gradient checkpointing on), so that the bench measures the step train_sdxl.py runs.
    options = train_sdxl.build_parser().parse_args(
        ["--data_dir", args.data_dir, "--use_lora", "--lora_rank", str(args.rank),
         "--lora_alpha", str(args.rank), "--batch_size", str(args.batch_size)]
    )  # fmt: skip
    tr = build_trainer(
        options, parts, parts.vae.moments, parts.text_encoder.encode, precision, dist, 1000
    )
    results = {"uncached": run("uncached", args, tr, data, precision)}
    with tempfile.TemporaryDirectory() as cache:
        (cached,), encode_images, encode_text = encoders(
            parts, [data], True, True, Path(cache), dist
        )
        # The same model and optimizer, with the cache's encoders.
        tr = dataclasses.replace(tr, encode_images=encode_images, encode_text=encode_text)
        results["cached latents + text"] = run("cached", args, tr, cached, precision)
    ratio = results["uncached"] / results["cached latents + text"]
    print(f"cached / uncached images/s: {ratio:.2f}x")


def run(kind: str, args, tr, data, precision) -> float:
    """Time the parts of `args.steps` steps; print the breakdown; return the step time."""
    device = tr.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = defaultdict(list)

    @contextlib.contextmanager
    def timed(name: str):
        sync()
        start = time.perf_counter()
        yield
        sync()
        times[name].append(time.perf_counter() - start)

    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            times.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        with timed("data"):
            ids = [(step * args.batch_size + i) % len(data) for i in range(args.batch_size)]
            images, time_ids, captions, sample_ids, masks = collate([data[(i, i)] for i in ids])
        with timed("vae encode"):  # cached: nothing but the copy to the device
            moments = tr.encode_images(images.to(device))
        with timed("text encode"):
            context, pooled = tr.encode_text(captions)
        with timed("unet fwd+bwd"):
            seeds = sample_ids.to(device)  # any distinct seeds will do here
            inputs = (moments, context, pooled, time_ids.to(device), seeds, masks.to(device))
            micro_batch_loss(tr, inputs).backward()
        with timed("optimizer"):
            optimizer_update(tr)

    total = sum(statistics.median(v) for v in times.values())
    print(
        f"{kind}: model {args.model}, {args.image_size}px, batch {args.batch_size}, rank {args.rank}, {precision.name}, {device}"
    )
    for name, v in times.items():
        m = statistics.median(v)
        print(f"  {name:14s} {m * 1000:9.1f} ms  {100 * m / total:5.1f}%")
    print(f"  {'step':14s} {total * 1000:9.1f} ms  -> {args.batch_size / total:.2f} images/s")
    if device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        print(
            f"  peak memory: {reserved / 2**30:.2f} GiB reserved, {allocated / 2**30:.2f} allocated"
        )
    return total


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", help="tiny, mid, or a diffusers-layout SDXL folder")
    p.add_argument(
        "--data_dir", default=str(ROOT / "examples" / "shapes"), help="image + caption folder"
    )
    p.add_argument("--image_size", type=int, default=64, help="training resolution")
    p.add_argument("--batch_size", type=int, default=1, help="images per step")
    p.add_argument(
        "--rank", type=int, default=4, help="LoRA rank on the attention projections (alpha = rank)"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="UNet precision",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    main(p.parse_args())
