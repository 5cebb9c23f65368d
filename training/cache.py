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

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sdxl.device import Distributed
from sdxl.files import atomic_write, cache_root, folder_identity
from sdxl.pretrained import SDXLParts
from training.data_loader import UNREADABLE, TrainingData, record_bytes, sample_seed
from training.specs import DataSpec

# Bump to retire every cached latent (when the way images are decoded changes: EXIF and 16-bit
# handling came with version 2).
LATENT_CACHE_VERSION = 2

# images, or cached moments -> VAE posterior moments (B, 8, h, w)
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
# captions -> (context (B, 77, 2048), pooled (B, 1280))
TextEncoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def _write(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_write(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)


class CachedLatents(TrainingData):
    """TrainingData whose items carry the VAE posterior moments (8, h, w) instead of pixels."""

    def __init__(self, data: TrainingData, vae, cache_dir: Path, vae_id: str):
        super().__init__(
            data.records,
            data.size,
            rules=data.rules,
            seed=data.seed,
            buckets=data.targets,
            masked=data.masked,
            first_id=data.first_id,
            groups=data.groups,
            batch_sizes=data.batch_sizes,
        )
        folder = cache_dir / "latents"
        folder.mkdir(parents=True, exist_ok=True)
        self.files: list[Path | None] = []  # None: the image cannot be decoded
        for i, record in enumerate(tqdm(self.records, desc="caching latents", dynamic_ncols=True)):
            content = record_bytes(record)
            # One crop / flip per image for the whole run, drawn from the seed and the image's index.
            g = torch.Generator().manual_seed(sample_seed(self.seed, -1 - i))
            try:
                pixels, time_ids, mask = super().image(i, g)
            except UNREADABLE:
                self.files.append(None)  # skipped, with a warning, when a batch asks for it
                continue
            # A masked run's entries also hold the mask (whose file is part of what they depend on).
            mask_file = record.mask.read_bytes() if self.masked and record.mask else b""
            # A tiled encoding differs a little from a whole one: the tile size is part of the key
            # of the images it tiles (and of no other, so that older entries stay valid).
            key = hashlib.sha256(
                hashlib.sha256(content + mask_file).digest()
                + f"{LATENT_CACHE_VERSION}{self.targets[i]}{time_ids.tolist()}{vae_id}".encode()
                + (b"masked" if self.masked else b"")
                + (f"tile{vae.tile_size}".encode() if vae.tiles(pixels) else b"")
            ).hexdigest()[:32]
            path = folder / f"{key}.safetensors"
            if not path.is_file():
                entry = {"moments": vae.moments(pixels[None])[0], "time_ids": time_ids}
                _write(entry | ({"mask": mask} if self.masked else {}), path)
            self.files.append(path)

    def image(self, i: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        path = self.files[i]
        if path is None:
            raise OSError("the image could not be decoded when the latents were cached")
        entry = load_file(path)
        ones = torch.ones(1, *entry["moments"].shape[1:])
        return entry["moments"], entry["time_ids"], entry.get("mask", ones)


class CachedText:
    """caption -> (context, pooled), from files written once by the text encoders (with `chunks`
    chunks of 75 tokens, --max_token_length / 75)."""

    def __init__(
        self,
        captions: list[str],
        text_encoder,
        cache_dir: Path,
        text_id: str,
        device: torch.device,
        chunks: int = 1,
    ):
        self.folder = cache_dir / "text"
        self.folder.mkdir(parents=True, exist_ok=True)
        # One chunk keeps the key of the caches written before long prompts were chunked.
        self.text_id, self.device = text_id + (f"chunks{chunks}" if chunks > 1 else ""), device
        for caption in tqdm(
            sorted(set(captions) | {""}), desc="caching text embeddings", dynamic_ncols=True
        ):
            path = self._path(caption)
            if not path.is_file():
                context, pooled = text_encoder.encode([caption], chunks)
                _write({"context": context[0], "pooled": pooled[0]}, path)

    def _path(self, caption: str) -> Path:
        digest = hashlib.sha256((caption + self.text_id).encode()).hexdigest()[:32]
        return self.folder / f"{digest}.safetensors"

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        entries = [load_file(self._path(c)) for c in captions]
        context = torch.stack([e["context"] for e in entries]).to(self.device)
        pooled = torch.stack([e["pooled"] for e in entries]).to(self.device)
        return context, pooled


def moments_as_given(moments: torch.Tensor) -> torch.Tensor:
    """The image encoder of a run with cached latents: the batches already carry the moments."""
    return moments


def encoders(
    parts: SDXLParts, sets: list[TrainingData | None], spec: DataSpec, dist: Distributed
) -> tuple[list, ImageEncoder, TextEncoder]:
    """Decide once how a run encodes its batches: the VAE and text encoders on the fly, or cache
    files written now (by the first process; the others then read them) into the spec's cache
    folder. Returns the data sets (their items carry moments when latents are cached; None stays
    None) and the two encoders. Captions are encoded in chunks of 75 tokens."""
    chunks = spec.max_token_length // 75
    cache_dir = spec.cache_dir or cache_root() / "cache"
    encode_images: ImageEncoder = parts.vae.moments
    encode_text: TextEncoder = functools.partial(parts.text_encoder.encode, chunks=chunks)
    with dist.first_process_first():
        if spec.cache_latents:
            vae_id = folder_identity(parts.vae_source)
            sets = [d and CachedLatents(d, parts.vae, cache_dir, vae_id) for d in sets]
            encode_images = moments_as_given
        if spec.cache_text_embeddings:
            text_id = "".join(folder_identity(source) for source in parts.text_sources)
            captions = [r.caption for d in sets if d is not None for r in d.records]
            encode_text = CachedText(
                captions, parts.text_encoder, cache_dir, text_id, dist.device, chunks
            )
    return sets, encode_images, encode_text
