"""Training throughput: eager steps, CUDA graphs and --compile, measured in one run.

Each mode runs in its own process (so that its max_memory_reserved is its own) with train_sdxl.py's
trainer (`build_trainer`, `train_step`): LoRA on the attention projections (alpha = rank), gradient
checkpointing, AdamW, on the tiny SDXL, a mid-size random SDXL, or a real SDXL folder. Each process
times the step with the VAE and text encoders run on the fly, then with cached latents and text
embeddings (the batches are collated before the clock starts: train_sdxl.py loads them in worker
processes). Printed per mode: s/step, images/s, the ratio to eager, max_memory_reserved and
max_memory_allocated (CUDA), and the first step's time, which holds the start-up cost: the warm-up
and the capture of the graphs, or the compiling.

Modes: eager (--cuda_graph off), graph (--cuda_graph auto), compile (--compile, eager steps),
compile+graph (--compile --cuda_graph auto).

    uv run python bench/train_throughput.py --model tiny --image_size 64
    uv run python bench/train_throughput.py --model mid --image_size 256 --steps 5
    uv run python bench/train_throughput.py --model ./weights/sdxl-base-1.0 --image_size 1024 \\
        --modes eager graph compile+graph
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdxl.device import Distributed, resolve_device, resolve_precision
from sdxl.pretrained import (
    clip_byte_vocab,
    load_sdxl,
    resolve_model,
    tiny_cache_dir,
    tiny_configs,
    write_random_sdxl,
)
from training.cache import encoders
from training.data_loader import SampleRules, TrainingData, collate
from training.scan import scan
from training.specs import (
    AdapterSpec,
    DataSpec,
    LossSpec,
    ModelSpec,
    OptimizerSpec,
    StepSpec,
    TrainSpecs,
)
from training.train_loop import Trainer, build_trainer, train_step


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


# How the step runs in each mode (train_sdxl.py's --cuda_graph and --compile).
MODES = {
    "eager": StepSpec(cuda_graph="off"),
    "graph": StepSpec(cuda_graph="auto"),
    "compile": StepSpec(cuda_graph="off", compile=True),
    "compile+graph": StepSpec(cuda_graph="auto", compile=True),
}


def child(args: argparse.Namespace) -> None:
    """One mode and one kind of data (on the fly, or cached); prints one JSON line."""
    device = resolve_device(args.device)
    dist = Distributed(0, 1, device)
    folder = mid_sdxl() if args.model == "mid" else resolve_model(args.model)
    precision = resolve_precision(args.precision, device)
    parts = load_sdxl(folder, precision.unet_dtype, device, precision.text_dtype)
    data = TrainingData(scan(args.data_dir), args.image_size, rules=SampleRules(random_flip=True))
    with tempfile.TemporaryDirectory() as cache:
        # The specs train_sdxl.py makes of --use_lora --lora_rank R --lora_alpha R, the mode's
        # flags and, for cached data, --cache_latents --cache_text_embeddings.
        specs = TrainSpecs(
            data=DataSpec(
                Path(args.data_dir),
                size=(args.image_size,) * 2,
                batch_size=args.batch_size,
                cache_latents=args.cached,
                cache_text_embeddings=args.cached,
                cache_dir=Path(cache),
            ),
            model=ModelSpec(str(folder)),
            adapter=AdapterSpec(rank=args.rank, alpha=args.rank),
            loss=LossSpec(),
            optimizer=OptimizerSpec(),
            step=dataclasses.replace(MODES[args.mode], precision=args.precision),
        )
        (data,), encode_images, encode_text = encoders(parts, [data], specs.data, dist)
        tr = build_trainer(specs, parts, encode_images, encode_text, precision, dist, 1000)
        print(json.dumps({"cached" if args.cached else "on the fly": time_steps(args, tr, data)}))


def time_steps(args: argparse.Namespace, tr: Trainer, data) -> dict[str, float]:
    """The first step, `args.warmup` more, then `args.steps` timed ones, each ending as
    train_sdxl.py's do: with the read of its loss (the step's one sync)."""
    count = 1 + args.warmup + args.steps
    batches = []
    for k in range(count):
        ids = [(k * args.batch_size + i) % len(data) for i in range(args.batch_size)]
        batches.append(collate([data[(i, i)] for i in ids]))  # (index, sample id)
    cuda = tr.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for batch in batches:
        start = time.perf_counter()
        torch.stack(train_step(tr, [batch], [])).tolist()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1 + args.warmup :])
    return {
        "s_per_step": step,
        "images_per_s": args.batch_size / step,
        "first_step_s": times[0],
        "reserved_GiB": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
        "allocated_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
    }


def main(args: argparse.Namespace) -> None:
    modes = args.modes or (list(MODES) if torch.cuda.is_available() else ["eager"])
    results: dict[str, dict] = {}
    for mode, cached in itertools.product(modes, (False, True)):
        argv = [sys.executable, __file__, "--mode", mode, "--model", args.model]
        argv += ["--cached"] if cached else []
        argv += ["--data_dir", args.data_dir, "--image_size", str(args.image_size)]
        argv += ["--batch_size", str(args.batch_size), "--rank", str(args.rank)]
        argv += ["--precision", args.precision, "--steps", str(args.steps)]
        argv += ["--warmup", str(args.warmup), "--device", args.device]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{mode}: failed\n{done.stderr[-3000:]}")
            continue
        printed = done.stdout.strip().splitlines()
        print("\n".join(f"  [{mode}] {line}" for line in printed[:-1]))  # capture / compile notes
        results.setdefault(mode, {}).update(json.loads(printed[-1]))
    print(
        f"model {args.model}, {args.image_size}px, batch {args.batch_size}, LoRA rank {args.rank}, "
        f"{args.precision} precision, gradient checkpointing, median of {args.steps} steps"
    )
    print(
        f"{'mode':15s}{'data':12s}{'s/step':>9s}{'images/s':>10s}{'vs eager':>10s}"
        f"{'reserved GiB':>14s}{'allocated GiB':>15s}{'first step s':>14s}"
    )
    for mode, by_data in results.items():
        for data, r in by_data.items():
            base = results.get("eager", {}).get(data)
            ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
            print(
                f"{mode:15s}{data:12s}{r['s_per_step']:9.3f}{r['images_per_s']:10.2f}{ratio:>10s}"
                f"{r['reserved_GiB']:14.2f}{r['allocated_GiB']:15.2f}{r['first_step_s']:14.1f}"
            )


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
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=None,
        help="what to measure (default: all on CUDA, eager on the CPU)",
    )
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # one child process
    p.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    child(a) if a.mode else main(a)
