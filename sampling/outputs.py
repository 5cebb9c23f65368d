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

`write_index` writes `annotations/captions.json` at the end of a run: a COCO captions file
(`images` with id, file_name, width and height; `annotations` with id, image_id and caption) that
pycocotools and torchvision's CocoCaptions read; for shards, `annotations/index.json` lists each
shard's keys.
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


def write_index(folder: Path, total: int, ext: str, shard_size: int | None) -> Path:
    """The run's annotation files, from what is in the folder (written by the first process at the
    end of every run, so a resumed run's index is whole)."""
    annotations = folder / "annotations"
    annotations.mkdir(exist_ok=True)
    if shard_size is None:
        images, captions = [], []
        for i in range(total):
            meta_file = folder / f"{i:05d}.json"
            if not (folder / f"{i:05d}.{ext}").exists() or not meta_file.exists():
                continue
            meta = json.loads(meta_file.read_text())
            images.append(
                {
                    "id": i,
                    "file_name": f"{i:05d}.{ext}",
                    "width": meta["width"],
                    "height": meta["height"],
                }
            )
            captions.append({"id": i, "image_id": i, "caption": meta["prompt"]})
        coco = {
            "info": {"description": "generated by generate_images.py"},
            "images": images,
            "annotations": captions,
        }
        write_json(coco, annotations / "captions.json")
        return annotations / "captions.json"
    shards = {}
    for k in range((total + shard_size - 1) // shard_size):
        path = folder / shard_name(k)
        if path.exists():
            with tarfile.open(path) as tar:
                shards[path.name] = sorted({m.name.split(".")[0] for m in tar.getmembers()})
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
        *made,
    ]:
        path.unlink(missing_ok=True)
