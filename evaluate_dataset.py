"""Score an image dataset: FID, KID, precision and recall against real images, CLIP score against
the captions, Vendi diversity and near-duplicates (sampling/quality.py says how each is computed).

    uv sync --extra evaluate
    uv run python evaluate_dataset.py ./generated_dataset --reference ./coco/val2014 \\
        --save-reference coco-val2014.npz
    uv run python evaluate_dataset.py ./synthetic --reference coco-val2014.npz
    torchrun --nproc_per_node 8 evaluate_dataset.py ./synthetic --reference coco-val2014.npz

DATA is a folder of images (captions in name.txt beside them, as generate_images.py writes them) or
of WebDataset shards. The table is printed and written to DATA/annotations/quality.json with the
models, sizes and counts behind each number. Under torchrun each process embeds its share and the
first computes the numbers. The Inception weights are torch-fidelity's (the standard TF-FID ones);
CLIP comes from the Hugging Face cache (--clip-model); a machine without them gets one line naming
what to fetch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cli.evaluate import check_args, parse_args
from cli.options import run_cli


def main(args: argparse.Namespace, nets: Any = None) -> int:
    """Score DATA; `nets` (sampling/quality.py: Embedders) replaces the real networks in tests."""
    check_args(args)  # every flag, before the heavy imports
    from sampling.quality import evaluate, load_embedders
    from sdxl.device import init_distributed

    dist = init_distributed(args.device)
    evaluate(
        Path(args.data),
        Path(args.reference) if args.reference else None,
        lambda: nets or load_embedders(args.clip_model),
        dist,
        threshold=args.duplicate_threshold,
        batch_size=args.batch_size,
        save_to=Path(args.save_reference) if args.save_reference else None,
        output=Path(args.output) if args.output else None,
    )
    dist.close()
    return 0


if __name__ == "__main__":
    run_cli(main, lambda: parse_args(sys.argv[1:], __doc__))
