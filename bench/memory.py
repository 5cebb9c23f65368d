"""Peak memory of train_sdxl.py and generate_images.py, the table README.md lists.

Each configuration runs in its own process (a fresh CUDA allocator), end to end: training for
--steps steps (LoRA rank 4 on attention, batch 1, gradient checkpointing, the defaults) at 512 and
1024 px, uncached, cached, cached with --fp8_base, and uncached and cached with eager steps
(--cuda_graph off); generation at 1024 px, batch 1 and 4. Prints
one Markdown row per run: max_memory_reserved and max_memory_allocated on CUDA (peak resident set
on the CPU), images/s, and the card.

    uv run python bench/memory.py --model ./weights/sdxl-base-1.0
    uv run python bench/memory.py --model tiny --sizes 64 128 --steps 3   # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {  # label: extra train_sdxl.py flags
    "uncached": [],
    "cached": ["--cache_latents", "--cache_text_embeddings"],
    "cached, --fp8_base": ["--cache_latents", "--cache_text_embeddings", "--fp8_base"],
    # The rows above run the step as CUDA graphs (the default on a GPU); these the same eagerly.
    "uncached, --cuda_graph off": ["--cuda_graph", "off"],
    "cached, --cuda_graph off": [
        "--cache_latents",
        "--cache_text_embeddings",
        "--cuda_graph",
        "off",
    ],
}


def peak() -> dict:
    """This process's peak memory: CUDA's counters, or the resident set on the CPU."""
    import torch

    if torch.cuda.is_available():
        return {
            "reserved": torch.cuda.max_memory_reserved() / 2**30,
            "allocated": torch.cuda.max_memory_allocated() / 2**30,
            "device": torch.cuda.get_device_name(),
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"reserved": rss, "allocated": rss, "device": "CPU (peak resident set)"}


def child(kind: str, argv: list[str]) -> None:
    """One run, in this process; prints a RESULT line."""
    sys.path.insert(0, str(ROOT))
    start = time.perf_counter()
    if kind == "train":
        import train_sdxl

        args = train_sdxl.parse_args(argv)
        train_sdxl.main(args)
        rows = (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines()
        speeds = sorted(json.loads(r)["images_per_s"] for r in rows[1:] or rows)
        speed = speeds[len(speeds) // 2]
    else:
        import generate_images

        args = generate_images.parse_args(argv)
        generate_images.main(args)
        speed = args.num_images / (time.perf_counter() - start)
    print("RESULT " + json.dumps({**peak(), "images_per_s": speed}), flush=True)


def run(kind: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--", *argv]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode or not lines:
        sys.exit(f"{kind} {' '.join(argv)} failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        common = ["--pretrained_model", args.model, "--data_dir", str(ROOT / "examples/shapes")]
        common += ["--use_lora", "--lora_rank", "4", "--max_train_steps", str(args.steps)]
        common += ["--cache_dir", f"{scratch}/cache", "--save_interval", "0"]
        for size in args.sizes:
            for label, extra in TRAIN.items():
                out = f"{scratch}/train-{size}-{len(rows)}"
                result = run(
                    "train", [*common, "--image_size", str(size), "--output_dir", out, *extra]
                )
                rows.append((f"train {size} px, {label}", result))
        for batch in args.generate_batches:
            size = str(max(args.sizes))
            argv = ["--pretrained-model", args.model, "--prompt", "a lighthouse at dusk"]
            argv += ["--num-images", str(2 * batch), "--batch-size", str(batch)]
            argv += ["--image-size", size, "--steps", str(args.generate_steps)]
            argv += ["--output-dir", f"{scratch}/gen-{batch}"]
            rows.append((f"generate {size} px, batch {batch}", run("generate", argv)))
    print(f"\n{rows[0][1]['device']}, {args.model}, {args.steps} training steps\n")
    print("| run | max_memory_reserved | max_memory_allocated | images/s |")
    print("|---|---:|---:|---:|")
    for label, r in rows:
        print(
            f"| {label} | {r['reserved']:.2f} GiB | {r['allocated']:.2f} GiB "
            f"| {r['images_per_s']:.2f} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
        sys.exit(0)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", help="an SDXL folder or single file, or tiny")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="training sizes (px)")
    p.add_argument("--steps", type=int, default=10, help="training steps per run")
    p.add_argument(
        "--generate_batches", type=int, nargs="+", default=[1, 4], help="generation batch sizes"
    )
    p.add_argument("--generate_steps", type=int, default=30, help="sampling steps")
    main(p.parse_args())
