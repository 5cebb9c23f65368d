"""How long the start-up scan of a training folder takes, cold and warm, per 1,000 images.

Writes N random JPEGs (with captions) into a temporary folder, then times `training.scan.scan`:
cold (no index) with 1 worker process and with all cores, and warm (an unchanged folder, read from
the index), and once more after a tenth of the captions changed.

    uv run python bench/scan.py --images 3000 --size 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image

from training.scan import scan


def timed(label: str, n: int, *args, **kwargs) -> None:
    start = time.perf_counter()
    records = scan(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(
        f"{label:34s} {len(records):6d} pairs  {seconds:7.2f} s  {1000 * seconds / n:7.3f} s per 1,000"
    )


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data, index = Path(tmp) / "data", Path(tmp) / "index"
        data.mkdir()
        for i in range(args.images):
            Image.effect_noise((args.size, args.size), 40 + i % 50).convert("RGB").save(
                data / f"{i:07d}.jpg", quality=90
            )
            (data / f"{i:07d}.txt").write_text(f"a photo, number {i}")
        n, cores = args.images, os.cpu_count() or 1
        timed("cold, 1 process", n, data, Path(tmp) / "index-1", workers=1)
        timed(f"cold, {cores} worker processes", n, data, index, workers=cores)
        timed("warm (unchanged, from the index)", n, data, index, workers=cores)
        for i in range(0, n, 10):
            (data / f"{i:07d}.txt").write_text(f"a new caption, number {i}")
        timed("a tenth of the captions changed", n, data, index, workers=cores)


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=3000, help="how many images")
    p.add_argument("--size", type=int, default=256, help="their width and height in pixels")
    main(p.parse_args())
