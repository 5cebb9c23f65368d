"""Cached VAE latents and text embeddings, computed once before training and reused by later runs.

Entries are files named by a hash of everything that determines them, so a stale entry is never
used: a latent by the image's bytes, the target size, the crop and flip, and the VAE's identity; a
text embedding by the caption and both text encoders' identities. An identity is a hash of the model
folder's config and of the size, first and last MiB of its weight files.

Trade-off: with cached latents each image's crop and flip are drawn once per run (from the seed and
the image's index) instead of once per epoch; use --center_crop and no --random_flip to make that
moot. Caption dropout still works: the empty prompt's embedding is cached too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from training.data_loader import Record, TrainingData, load_image, prepare, sample_seed


def folder_identity(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            h.update(path.read_bytes())
        elif path.suffix == ".safetensors":
            size = path.stat().st_size
            with open(path, "rb") as f:
                h.update(f"{path.name}:{size}".encode())
                h.update(f.read(2**20))
                f.seek(max(0, size - 2**20))
                h.update(f.read(2**20))
    return h.hexdigest()[:16]


def _write(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    tmp.replace(path)


class CachedLatents(TrainingData):
    """TrainingData whose items carry the VAE posterior moments (8, h, w) instead of pixels."""

    def __init__(self, data: TrainingData, vae, cache_dir: Path, vae_id: str):
        super().__init__(
            data.records,
            data.size,
            data.center_crop,
            data.random_flip,
            data.caption_dropout,
            data.seed,
            data.targets,
        )
        folder = cache_dir / "latents"
        folder.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        for i, record in enumerate(tqdm(self.records, desc="caching latents", dynamic_ncols=True)):
            image = load_image(record)
            # One crop / flip per image for the whole run, drawn from the seed and the image's index.
            g = torch.Generator().manual_seed(sample_seed(self.seed, -1 - i))
            pixels, time_ids = prepare(
                image, self.targets[i], self.center_crop, self.random_flip, g
            )
            key = hashlib.sha256(
                _content(record) + f"{self.targets[i]}{time_ids.tolist()}{vae_id}".encode()
            ).hexdigest()[:32]
            path = folder / f"{key}.safetensors"
            if not path.is_file():
                _write({"moments": vae.moments(pixels[None])[0], "time_ids": time_ids}, path)
            self.files.append(path)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str, int]:
        i, sample_id = item
        entry = load_file(self.files[i])
        g = torch.Generator().manual_seed(sample_seed(self.seed, sample_id))
        caption = (
            ""
            if torch.rand(1, generator=g).item() < self.caption_dropout
            else self.records[i].caption
        )
        return entry["moments"], entry["time_ids"], caption, sample_id


def _content(record: Record) -> bytes:
    if record.offset >= 0:
        with open(record.path, "rb") as f:
            f.seek(record.offset)
            return hashlib.sha256(f.read(record.length)).digest()
    return hashlib.sha256(record.path.read_bytes()).digest()


class CachedText:
    """caption -> (context, pooled), from files written once by the text encoders."""

    def __init__(
        self, captions: list[str], text_encoder, cache_dir: Path, text_id: str, device: torch.device
    ):
        self.folder = cache_dir / "text"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.text_id, self.device = text_id, device
        for caption in tqdm(
            sorted(set(captions) | {""}), desc="caching text embeddings", dynamic_ncols=True
        ):
            path = self._path(caption)
            if not path.is_file():
                context, pooled = text_encoder.encode([caption])
                _write({"context": context[0], "pooled": pooled[0]}, path)

    def _path(self, caption: str) -> Path:
        return (
            self.folder
            / f"{hashlib.sha256((caption + self.text_id).encode()).hexdigest()[:32]}.safetensors"
        )

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        entries = [load_file(self._path(c)) for c in captions]
        context = torch.stack([e["context"] for e in entries]).to(self.device)
        pooled = torch.stack([e["pooled"] for e in entries]).to(self.device)
        return context, pooled
