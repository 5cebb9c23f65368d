"""SDXL's VAE: diffusers' AutoencoderKL, kept in fp32, behind moments / sample / decode in latent units.

SDXL's latents are the VAE's posterior samples times 0.13025 (`scaling_factor` in vae/config.json; SD 1.x
used 0.18215), which brings them to roughly unit variance for the diffusion model. The VAE runs in fp32:
the original SDXL VAE overflows to NaN (black images) in fp16; a fine-tuned "fp16-fix" VAE can be
loaded from another folder instead.

Memory: images are encoded and decoded one at a time, so the VAE's activations do not grow with the
batch. Above `tile_size` pixels on a side (--vae_tile_size; 0 never), an image is encoded or decoded
in overlapping tiles of that size, by diffusers' tiling: tiles start every 3/4 tile, and where two
overlap (1/4 of a tile) the result fades linearly from one to the other, across each seam, first
down the rows, then along them. A tile's GroupNorms see only that tile, so a tiled result differs
slightly from the untiled one (tone can shift a little from tile to tile); below the size nothing
changes. At 1024 px an untiled fp32 decode needs several GiB, a 512 px tile about a quarter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn


class SDXLVAE(nn.Module):
    """moments + sample: images in [-1, 1] (B, 3, H, W) -> latents (B, 4, H/8, W/8); decode: the
    inverse."""

    def __init__(self, vae: AutoencoderKL, tile_size: int = 0):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae.use_slicing = True  # one image at a time
        self.set_tile_size(tile_size)

    def set_tile_size(self, pixels: int) -> None:
        """Encode and decode images larger than `pixels` on a side in overlapping tiles of that
        size (a multiple of 64; 0: never tile)."""
        assert pixels == 0 or (pixels >= 128 and pixels % 64 == 0), pixels
        self.tile_size = pixels
        self.vae.use_tiling = pixels > 0
        if pixels:
            self.vae.tile_sample_min_size, self.vae.tile_latent_min_size = pixels, pixels // 8

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> SDXLVAE:
        """From a `vae/` folder (config.json + diffusion_pytorch_model(.fp16).safetensors)."""
        folder = Path(folder)
        variant = None
        if not (folder / "diffusion_pytorch_model.safetensors").is_file():
            variant = "fp16"  # only the half-precision file is present; it is upcast on load
        vae = AutoencoderKL.from_pretrained(
            folder, dtype=dtype, variant=variant, use_safetensors=True
        )
        return cls(vae.to(device))

    def tiles(self, images: torch.Tensor) -> bool:
        """Whether images of this size (..., H, W) are encoded in tiles (as diffusers decides)."""
        return self.tile_size > 0 and max(images.shape[-2:]) > self.tile_size

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior q(z | x) as (B, 2 * 4, H/8, W/8): mean, then log-variance (clamped)."""
        images = images.to(device=self.vae.device, dtype=self.vae.dtype)
        dist = self.vae.encode(images).latent_dist
        return torch.cat([dist.mean, dist.logvar], dim=1)

    def sample(self, moments: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The posterior sample mean + std * eps (training draws one per image, as SDXL was
        trained), times the scaling factor: the latents the UNet sees. eps: unit Gaussian noise
        shaped like the mean (B, 4, H/8, W/8)."""
        mean, logvar = moments.chunk(2, dim=1)
        return (mean + torch.exp(0.5 * logvar) * eps.to(mean.dtype)) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (not clamped)."""
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(latents / self.scaling_factor).sample
