"""Prompt files and the images a generation run makes of them, worked out before anything heavy is
imported (so that a bad file fails at once)."""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

from sdxl.errors import UserError


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt a line. Blank lines and lines starting with `#` (comments) are skipped; a missing
    file, or one with no prompts, is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(
            f"prompt file {path} has no prompts (one prompt a line; # starts a comment)"
        )
    return prompts


# ---------------------------------------------------------------------------------------------
# What a dataset run generates: one job per image
# ---------------------------------------------------------------------------------------------

ROW_KEYS = ("prompt", "negative_prompt", "seed", "num_images", "width", "height")


def read_rows(path: str | Path) -> list[dict]:
    """A prompt file's rows: .txt (one prompt a line, `#` comments), .jsonl (one JSON object a line)
    or .csv (a header row), each row with `prompt` and optionally `negative_prompt`, `seed`,
    `num_images`, `width`, `height`, and any other columns, which go into each image's JSON."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".csv"):
        return [{"prompt": p} for p in read_prompt_file(path)]
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows, where = [], [n for n, _ in lines]  # each row's line in the file
    for n, line in lines if path.suffix == ".jsonl" else []:
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise UserError(f"prompt file {path}, line {n}: not a JSON object ({e})") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        where = []
        try:
            for r in reader:
                rows.append(dict(r))
                where.append(reader.line_num)  # the line the row ends on
        except csv.Error as e:
            raise UserError(
                f"prompt file {path}, line {reader.line_num}: not valid csv ({e})"
            ) from None
    for n, row in zip(where, rows):
        if not isinstance(row, dict) or not str(row.get("prompt") or "").strip():
            raise UserError(f"prompt file {path}, line {n}: no prompt")
        for key in ("seed", "num_images", "width", "height"):
            if row.get(key) not in (None, ""):
                try:
                    row[key] = int(row[key])
                except (TypeError, ValueError):
                    raise UserError(
                        f"prompt file {path}, line {n}: {key} {row[key]!r} is not a whole number"
                    ) from None
            else:
                row.pop(key, None)
        if any(row.get(k, 8) % 8 or row.get(k, 8) <= 0 for k in ("width", "height")):
            raise UserError(
                f"prompt file {path}, line {n}: width and height must be positive multiples of 8"
            )
    if not rows:
        raise UserError(f"prompt file {path} has no rows")
    return rows


def plan_images(
    rows: list[dict],
    num_images: int | None,
    images_per_prompt: int,
    seed: int,
    size: tuple[int, int],
    negative_prompt: str | None,
) -> list[dict]:
    """Every image of the run, in order: row r gives its `num_images` (else `images_per_prompt`)
    images; with `num_images` the list is cut to that length, or cycled to reach it. Image i uses
    seed + i, unless its row gives a seed (then the row's seed + j for its j-th image); so image i
    is the same whatever the batch size or the number of processes."""
    expanded = [(row, j) for row in rows for j in range(row.get("num_images", images_per_prompt))]
    if not expanded:
        raise UserError("the prompts give no images (num_images 0 everywhere)")
    jobs = []
    for i in range(num_images if num_images is not None else len(expanded)):
        row, j = expanded[i % len(expanded)]
        extra = {k: v for k, v in row.items() if k not in ROW_KEYS}
        jobs.append(
            {
                "index": i,
                "prompt": str(row["prompt"]).strip(),
                "negative_prompt": row.get("negative_prompt", negative_prompt),
                "seed": row["seed"] + j if "seed" in row else seed + i,
                "width": row.get("width", size[0]),
                "height": row.get("height", size[1]),
                "extra": extra,
            }
        )
    return jobs


def plan_batches(jobs: list[dict], batch_size: int, shard_size: int | None) -> list[list[dict]]:
    """The run's UNet batches: runs of consecutive images that share a size and a negative prompt
    (and, for shards, a shard), cut every `batch_size`. An image's last bits depend on which images
    share its batch, so the batches are fixed here, by the image indices, before the processes share
    them out: image i is then the same whatever the number of processes or where a run stopped."""

    def key(job: dict) -> tuple:
        shard = job["index"] // shard_size if shard_size else 0
        return job["width"], job["height"], job["negative_prompt"], shard

    batches = []
    for _, members in itertools.groupby(jobs, key):
        group = list(members)
        batches += [group[b : b + batch_size] for b in range(0, len(group), batch_size)]
    return batches
