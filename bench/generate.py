"""Generation throughput and peak memory: ours against diffusers' StableDiffusionXLPipeline.

Same model folder (tiny, the mid-size random SDXL, or real weights), sampler (Euler), steps, guidance,
size and batch. Each side runs in its own process, alternating A B A B; prints images/s, peak memory
(VmHWM on the CPU, max_memory_reserved on CUDA), the ratios to the reference, and each side's first
batch (its warm-up: capturing the CUDA graphs, or compiling). Our sides: eager (--cuda-graph off),
graph (the UNet call replayed as a CUDA graph, generate_images.py's default on CUDA) and
compile+graph (--compile too); by default all of them on CUDA, eager on the CPU.

    uv run python bench/generate.py --model tiny --image_size 64 --steps 10 --batch_size 4
    uv run python bench/generate.py --model mid --image_size 256 --steps 10 --batch_size 2

With --writer_pool it times generate_images.py itself instead, the whole loop with its files, with
the writer pool (--writers 2) and without it (--writers 0), alternating, and prints images/s and
the ratio: how much of the encoding and writing the pool hides behind the UNet.

    uv run python bench/generate.py --writer_pool --model tiny --image_size 64 --num_images 64
    uv run python bench/generate.py --writer_pool --model /path/to/sdxl --image_size 1024 --num_images 64
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_throughput import mid_sdxl  # noqa: E402
from bench.unet_step import proc_status  # noqa: E402
from cli.choices import VAE_TILE_SIZE  # noqa: E402
from sdxl.device import resolve_device, resolve_precision  # noqa: E402
from sdxl.pretrained import resolve_model  # noqa: E402


def child(args: argparse.Namespace) -> None:
    device = resolve_device("auto")
    dtype = resolve_precision("auto", device).unet_dtype
    folder = mid_sdxl() if args.model == "mid" else resolve_model(args.model)
    prompts = [f"a photo of object number {i}" for i in range(args.batch_size)]
    seeds = list(range(args.batch_size))
    if args.side != "ref":
        from sampling.inference import build_pipeline, generate_unique_batch
        from sdxl.pretrained import load_sdxl

        # what generate_images.py builds; the VAE tiles as it does by default (the reference
        # does not tile)
        pipe = build_pipeline(
            lambda where: load_sdxl(folder, dtype, where, vae_tile_size=args.vae_tile_size),
            lambda unet: [],
            device=device,
            dtype=dtype,
            fp8_base=False,
            cuda_graph="graph" in args.side,
            compile="compile" in args.side,
        )

        def run() -> None:
            generate_unique_batch(
                pipe, prompts, seeds, args.image_size, args.image_size, args.steps, 5.0
            )

    else:
        from diffusers import StableDiffusionXLPipeline

        ref = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype).to(device)
        ref.set_progress_bar_config(disable=True)

        def run() -> None:
            gens = [torch.Generator(device).manual_seed(s) for s in seeds]
            ref(
                prompts,
                height=args.image_size,
                width=args.image_size,
                num_inference_steps=args.steps,
                guidance_scale=5.0,
                generator=gens,
                output_type="pt",
            )

    start = time.perf_counter()
    run()  # warm-up: the graphs' capture, the compiling
    first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    # max_memory_reserved on CUDA: what the card must have (allocated plus the allocator's slack)
    peak = torch.cuda.max_memory_reserved() if device.type == "cuda" else proc_status("VmHWM")
    print(json.dumps({"times": times, "peak": peak, "first": first}))


SIDES = {
    "ours": "ours, eager",
    "ours-graph": "ours, CUDA graph",
    "ours-compile+graph": "ours, compile+graph",
    "ref": "diffusers pipeline",
}


def main(args: argparse.Namespace) -> None:
    sides = args.sides or (list(SIDES) if torch.cuda.is_available() else ["ours", "ref"])
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side in sides:
            cmd = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--model",
                args.model,
                "--image_size",
                str(args.image_size),
                "--steps",
                str(args.steps),
                "--batch_size",
                str(args.batch_size),
                "--repeats",
                str(args.repeats),
                "--vae_tile_size",
                str(args.vae_tile_size),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[side].append(json.loads(out.strip().splitlines()[-1]))
    summary = {}
    for side, runs in results.items():
        step = statistics.median(t for r in runs for t in r["times"])
        first = statistics.median(r["first"] for r in runs)
        summary[side] = (args.batch_size / step, max(r["peak"] for r in runs), first)
    print(
        f"model {args.model}, {args.image_size}px, Euler {args.steps} steps, guidance 5, batch {args.batch_size}"
    )
    print(f"{'':22s}{'images/s':>10s}{'vs ref':>8s}{'peak GiB':>10s}{'vs ref':>8s}{'first s':>9s}")
    ref = summary.get("ref")
    for side, (rate, peak, first) in summary.items():
        vs = (f"{rate / ref[0]:8.3f}", f"{peak / ref[1]:8.3f}") if ref else ("-", "-")
        print(
            f"{SIDES[side]:22s}{rate:10.3f}{vs[0]:>8s}{peak / 2**30:10.2f}{vs[1]:>8s}{first:9.1f}"
        )


def writer_pool(args: argparse.Namespace) -> None:
    """generate_images.py with and without its writer pool, each run in its own process."""
    model = str(mid_sdxl()) if args.model == "mid" else args.model
    rates: dict[int, list[float]] = {0: [], 2: []}
    for _ in range(args.rounds):
        for writers in rates:
            with tempfile.TemporaryDirectory() as out:
                cmd = [sys.executable, str(ROOT / "generate_images.py"), "--pretrained-model"]
                cmd += [model, "--prompt", "a photo of an object", "--output-dir", out]
                cmd += ["--image-size", str(args.image_size), "--steps", str(args.steps)]
                cmd += ["--batch-size", str(args.batch_size), "--writers", str(writers)]
                cmd += ["--num-images", str(args.num_images)]
                printed = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                found = re.search(r"([0-9.]+) images/s", printed)
                assert found, printed
                rates[writers].append(float(found.group(1)))
    without, with_pool = (statistics.median(rates[w]) for w in (0, 2))
    print(
        f"generate_images.py, model {args.model}, {args.image_size}px, {args.num_images} PNGs, "
        f"Euler {args.steps} steps, batch {args.batch_size}"
    )
    print(f"without the writer pool (--writers 0) {without:8.3f} images/s")
    print(f"with it (--writers 2)                 {with_pool:8.3f} images/s")
    print(f"ratio with / without                  {with_pool / without:8.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", help="tiny, mid, or an SDXL folder")
    p.add_argument("--image_size", type=int, default=64, help="square image size")
    p.add_argument("--steps", type=int, default=10, help="sampling steps")
    p.add_argument("--batch_size", type=int, default=4, help="images per batch")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per process")
    p.add_argument("--rounds", type=int, default=2, help="A B rounds")
    p.add_argument(
        "--writer_pool",
        action="store_true",
        help="time generate_images.py with and without its writer pool instead",
    )
    p.add_argument("--num_images", type=int, default=64, help="images per run (--writer_pool)")
    p.add_argument(
        "--vae_tile_size",
        type=int,
        default=VAE_TILE_SIZE,
        help="our VAE's tile size, as generate_images.py's default (0: untiled, as the reference)",
    )
    p.add_argument(
        "--sides",
        nargs="+",
        choices=list(SIDES),
        default=None,
        help="what to measure (default: all on CUDA; ours and ref on the CPU)",
    )
    p.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    a = p.parse_args()
    writer_pool(a) if a.writer_pool else child(a) if a.side else main(a)
