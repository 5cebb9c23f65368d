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
changes. At 1024 px an untiled fp32 decode needs several GiB, a 512 px tile about a quarter. The
encoder and decoder run diffusers' modules in diffusers' order, but walked so that fewer activations
are alive at once (`lean_encoder`, `lean_decoder`; the same numbers bit for bit), and a training run
keeps only the encoder on the GPU (`encode_on`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from torch.nn import functional as F


class SDXLVAE(nn.Module):
    """moments + sample: images in [-1, 1] (B, 3, H, W) -> latents (B, 4, H/8, W/8); decode: the
    inverse."""

    def __init__(self, vae: AutoencoderKL, tile_size: int = 0):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae.use_slicing = True  # one image at a time
        # diffusers' encoder and decoder with fewer activations alive at once, tiles included
        self.vae.encoder.forward = functools.partial(lean_encoder, self.vae.encoder)
        self.vae.decoder.forward = functools.partial(lean_decoder, self.vae.decoder)
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

    def encode_on(self, device: torch.device | str) -> None:
        """What encoding uses (the encoder, quant_conv) to `device`, what decoding uses to the host.
        Training decodes only validation images, on the host: the decoder's 0.18 GiB (fp32) never
        reach the GPU."""
        self.vae.decoder.to("cpu")
        self.vae.post_quant_conv.to("cpu")
        self.vae.quant_conv.to(device)
        self.vae.encoder.to(device)

    def tiles(self, images: torch.Tensor) -> bool:
        """Whether images of this size (..., H, W) are encoded in tiles (as diffusers decides)."""
        return self.tile_size > 0 and max(images.shape[-2:]) > self.tile_size

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior q(z | x) as (B, 2 * 4, H/8, W/8): mean, then log-variance (clamped)."""
        images = images.to(device=self.vae.quant_conv.weight.device, dtype=self.vae.dtype)
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
        latents = latents.to(device=self.vae.post_quant_conv.weight.device, dtype=self.vae.dtype)
        return self.vae.decode(latents / self.scaling_factor).sample


def lean_encoder(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """diffusers' `Encoder.forward` (frozen, no_grad): the same modules in the same order, the same
    numbers bit for bit, walked so that at most three activations of the largest size are alive at
    once. diffusers' forward keeps five: it holds the first block's input through the block, and
    each ResNet keeps its input, its branch, their sum and the sum divided by its output scale.
    At 512 px (or in one 512 px tile) an activation of the first block is 128 MiB in fp32: 0.38
    GiB alive at most instead of 0.63."""
    h = encoder.conv_in(x)
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            h = _resnet(resnet, h)
        for downsample in block.downsamplers or []:
            h = downsample(h)
    h = encoder.mid_block(h)  # at 1/8 of the image's side: small
    return encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(h)))


def lean_decoder(
    decoder: Decoder, z: torch.Tensor, latent_embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """diffusers' `Decoder.forward` (frozen, no_grad), walked as `lean_encoder` walks the encoder:
    the same numbers bit for bit, fewer activations alive. It saves less than the encoder's walk:
    the largest are the last upsampler's output (256 channels at the image's size) and the next
    ResNet's normalised copy of it, which must be alive together."""
    assert latent_embeds is None  # SDXL's decoder has no spatial norm
    h = decoder.conv_in(z)
    h = decoder.mid_block(h)  # at 1/8 of the image's side: small
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            h = _resnet(resnet, h)
        for upsample in block.upsamplers or []:
            h = upsample(h)
    return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))


def _resnet(block: ResnetBlock2D, x: torch.Tensor) -> torch.Tensor:
    """diffusers' ResnetBlock2D without a time embedding: the same operations, each intermediate
    dropped as soon as the next exists, SiLU, the sum and the division done in place (x + h and
    h + x are the same floats). Alive at most: x, a normalised copy and a convolution's output."""
    assert block.time_emb_proj is None and block.upsample is None and block.downsample is None
    assert isinstance(block.nonlinearity, nn.SiLU)
    h = F.silu(block.norm1(x), inplace=True)
    h = block.conv1(h)
    h = F.silu(block.norm2(h), inplace=True)
    h = block.conv2(block.dropout(h))
    shortcut = x if block.conv_shortcut is None else block.conv_shortcut(x)
    return h.add_(shortcut).div_(block.output_scale_factor)
