"""Where generated images go: a folder of files or WebDataset shards, written so that any number of
processes can share a run, any of them can be killed at any moment, and a rerun finishes the job.

- `FolderWriter`: `00000.png` (or .jpg / .webp) with `00000.txt` (the prompt) and `00000.json` (how
  it was made) per image. The image file is written last, each file atomically: an image whose
  image file exists is finished.
- `ShardWriter`: `shard-000000.tar`, ... of `--shard-size` images each, with `key.png`, `key.txt` and
  `key.json` members as the webdataset package writes them. A shard is written to a temporary name
  and renamed when complete: a shard that exists is finished, and an unfinished one is rebuilt.

Encoding (PNG compression is the slow part) runs in a small pool of threads, so that the GPU does
not wait for it: `submit` returns at once, and at most `depth` images wait their turn.

`write_index` writes the index files at the end of a run: for a folder, a COCO captions file and
the `metadata.jsonl` that Hugging Face `datasets` reads; for shards, a parquet file beside each shard
(one row per sample) and `annotations/index.json`.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from sampling.inference import to_pil
from sdxl.errors import UserError
from sdxl.files import atomic_write, write_json

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def encode(image: torch.Tensor, ext: str, quality: int) -> bytes:
    buf = io.BytesIO()
    options = {} if ext == "png" else {"quality": quality}
    to_pil(image).save(buf, format=FORMATS[ext], **options)
    return buf.getvalue()


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


class FolderWriter:
    """One image's three files in the output folder, encoded and written by the thread pool."""

    def __init__(self, folder: Path, ext: str, quality: int, workers: int = 2, depth: int = 8):
        self.folder, self.ext, self.quality = folder, ext, quality
        self.pool = ThreadPoolExecutor(workers) if workers else None
        self.pending: deque[Future] = deque()
        self.depth = depth

    def done(self, i: int) -> bool:
        return (self.folder / f"{i:05d}.{self.ext}").exists()

    def submit(self, i: int, image: torch.Tensor, prompt: str, meta: dict) -> None:
        image = image.cpu()  # a copy off the GPU: the next batch may reuse its memory
        if self.pool is None:
            return self._write(i, image, prompt, meta)
        self.pending.append(self.pool.submit(self._write, i, image, prompt, meta))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def _write(self, i: int, image: torch.Tensor, prompt: str, meta: dict) -> None:
        name = f"{i:05d}"
        with atomic_write(self.folder / f"{name}.txt") as tmp:
            tmp.write_text(prompt + "\n")
        write_json(meta, self.folder / f"{name}.json")
        data = encode(image, self.ext, self.quality)
        with atomic_write(self.folder / f"{name}.{self.ext}") as tmp:  # last: the image is done
            tmp.write_bytes(data)

    def close(self) -> None:
        """Wait for every image to be written (an error in one is raised here)."""
        while self.pending:
            self.pending.popleft().result()
        if self.pool is not None:
            self.pool.shutdown()


class ShardWriter:
    """Images appended in order to the shard being built, the shard renamed into place when its
    last image is in. Encoding runs in the pool; appending stays in order."""

    def __init__(
        self,
        folder: Path,
        size: int,
        total: int,
        ext: str,
        quality: int,
        workers: int = 2,
        depth: int = 8,
    ):
        self.folder, self.size, self.total, self.ext, self.quality = (
            folder,
            size,
            total,
            ext,
            quality,
        )
        self.pool = ThreadPoolExecutor(workers) if workers else None
        self.pending: deque[tuple[int, Future | bytes, str, dict]] = deque()
        self.depth = depth
        self.shard: int | None = None
        self.tar: tarfile.TarFile | None = None
        self.write: contextlib.AbstractContextManager[Path] | None = None

    def done(self, i: int) -> bool:
        return (self.folder / shard_name(i // self.size)).exists()

    def submit(self, i: int, image: torch.Tensor, prompt: str, meta: dict) -> None:
        image = image.cpu()
        data = (
            self.pool.submit(encode, image, self.ext, self.quality)
            if self.pool
            else encode(image, self.ext, self.quality)
        )
        self.pending.append((i, data, prompt, meta))
        while len(self.pending) > self.depth:
            self._append(*self.pending.popleft())

    def _append(self, i: int, data: Future | bytes, prompt: str, meta: dict) -> None:
        if self.shard != i // self.size:
            self._finish()
            self.shard = i // self.size
            self.write = atomic_write(self.folder / shard_name(self.shard))
            self.tar = tarfile.open(self.write.__enter__(), "w")
        key = f"{i:06d}"
        payload = data.result() if isinstance(data, Future) else data
        members = {
            self.ext: payload,
            "txt": (prompt + "\n").encode(),
            "json": json.dumps(meta).encode(),
        }
        for ext, content in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(content)
            self.tar.addfile(info, io.BytesIO(content))  # type: ignore[union-attr]
        if (i + 1) % self.size == 0 or i + 1 == self.total:  # the shard's last image
            self._finish()

    def _finish(self) -> None:
        """Close the shard being built and rename it into place."""
        if self.tar is not None:
            self.tar.close()
            assert self.write is not None
            self.write.__exit__(None, None, None)
            self.tar, self.shard = None, None

    def close(self) -> None:
        """Write what is pending (an error in one image is raised here)."""
        while self.pending:
            self._append(*self.pending.popleft())
        if self.pool is not None:
            self.pool.shutdown()


def index_row(key: str, files: list[str], meta: dict) -> dict:
    """One sample's row in the index files: its key and files, its caption, size and seed, and the
    rest of how it was made (the prompt row's extra columns among them). Lists and other nested
    values are JSON text, so that every row of a parquet column has one type."""
    row = {"key": key, "file_name": files[0], "files": " ".join(files), "caption": meta["prompt"]}
    for name, value in meta.items():
        if name != "prompt":
            plain = value is None or isinstance(value, str | int | float | bool)
            row[name] = value if plain else json.dumps(value)
    return row


def write_parquet(rows: list[dict], path: Path) -> None:
    """One row per sample, columns as in `index_row`: every column any row has (empty where a row
    lacks it), and a column whose rows disagree on a type written as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = {name: [row.get(name) for row in rows] for name in names}
    for name, values in columns.items():
        if len({type(v) for v in values if v is not None}) > 1:
            columns[name] = [None if v is None else json.dumps(v) for v in values]
    with atomic_write(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def shard_rows(path: Path) -> list[dict]:
    """A finished shard's index rows, from its members' JSON (what the images were made with)."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            entry = samples.setdefault(key, {"files": []})
            entry["files"].append(member.name)
            if ext == "json":
                entry["meta"] = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
    return [
        index_row(key, sorted(e["files"], key=lambda f: f.endswith((".txt", ".json"))), e["meta"])
        for key, e in sorted(samples.items())
    ]


def write_index(folder: Path, total: int, ext: str, shard_size: int | None) -> Path:
    """The run's index files, from what is in the folder (written by the first process at the end
    of every run, so a resumed or extended run's index is whole):
    - a folder: `annotations/captions.json`, a COCO captions file (`images` with id, file_name,
      width and height; `annotations` with id, image_id and caption) that pycocotools and
      torchvision's CocoCaptions read; and `metadata.jsonl`, a row per image (`file_name`, caption,
      size, seed, ...), which Hugging Face `datasets` reads as an imagefolder's captions;
    - shards: beside each `shard-N.tar`, `shard-N.parquet` with a row per sample (key, file names,
      caption, size, seed, ...), as LAION's and NeMo Curator's layouts keep them (rewritten when
      older than its shard); and `annotations/index.json`, each shard's keys."""
    annotations = folder / "annotations"
    annotations.mkdir(exist_ok=True)
    if shard_size is None:
        images, captions, rows = [], [], []
        for i in range(total):
            meta_file = folder / f"{i:05d}.json"
            if not (folder / f"{i:05d}.{ext}").exists() or not meta_file.exists():
                continue
            meta = json.loads(meta_file.read_text())
            name = f"{i:05d}.{ext}"
            images.append({"id": i, "file_name": name, "width": meta["width"], "height": meta["height"]})  # fmt: skip
            captions.append({"id": i, "image_id": i, "caption": meta["prompt"]})
            rows.append(index_row(f"{i:05d}", [name, f"{i:05d}.txt", f"{i:05d}.json"], meta))
        coco = {
            "info": {"description": "generated by generate_images.py"},
            "images": images,
            "annotations": captions,
        }
        with atomic_write(folder / "metadata.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        write_json(coco, annotations / "captions.json")
        return annotations / "captions.json"
    shards = {}
    for k in range((total + shard_size - 1) // shard_size):
        path = folder / shard_name(k)
        if path.exists():
            rows = shard_rows(path)
            shards[path.name] = [row["key"] for row in rows]
            table = path.with_suffix(".parquet")
            if not table.exists() or table.stat().st_mtime_ns < path.stat().st_mtime_ns:
                write_parquet(rows, table)
    write_json(
        {"shard_size": shard_size, "images": total, "shards": shards}, annotations / "index.json"
    )
    return annotations / "index.json"


def claim_image_folder(out: Path, settings: dict, overwrite: bool) -> None:
    """A folder holds images of one set of settings. Images made with other settings (or of
    unknown settings) are refused, or deleted first with --overwrite; the same settings continue
    (with more images, too)."""
    made = [p for p in out.iterdir() if p.name[:5].isdigit() or p.name.startswith("shard-")]
    config = out / "generation_config.json"
    before = json.loads(config.read_text()).get("image_settings", {}) if config.is_file() else {}
    # A setting an older version did not record (the weights' hashes) is taken as unchanged.
    keys = (settings.keys() & before.keys()) if before else settings.keys()
    differ = sorted(k for k in keys if settings.get(k) != before.get(k))
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
        out / "metadata.jsonl",
        *made,
    ]:
        path.unlink(missing_ok=True)
