"""Text-to-image generation with SDXL and a LoRA.

`generate_unique_batch` makes one image per prompt, each from its own seed: image i's starting noise is
drawn from a generator seeded with seeds[i] alone, so an image is the same whatever batch it is in.
The samplers are in sampling/samplers.py; LoRA files are read by sdxl/checkpoint.py
(`read_lora_weights`: a training checkpoint or any exported file) and applied here.

Classifier-free guidance runs the unconditional and conditional halves in one batched UNet call:
eps = eps_uncond + w (eps_cond - eps_uncond). Without a negative prompt SDXL's unconditional
embedding is all zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sampling.samplers import SAMPLERS, ModelFn, randn
from sdxl.capture import Graphed, compile_blocks
from sdxl.diffusion import NoiseSchedule
from sdxl.files import atomic_write
from sdxl.frozen import store_in_fp8
from sdxl.lora import Adapter, Factors, LoRAModules, components, merge_lora
from sdxl.lora_formats import attach_lora
from sdxl.pretrained import SDXLParts
from sdxl.text_encoders import SDXLTextEncoder
from sdxl.unet import UNet2DConditionModel
from sdxl.vae import SDXLVAE

# unet(sample, timestep, context, {"text_embeds": ..., "time_ids": ...}) -> prediction
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


class EncodedPrompts:
    """A fixed set of prompts, encoded once by the text encoders and kept on the host, standing in
    for the encoders in a Pipeline (what `generate_unique_batch` asks of them): validation images
    need neither the encoders nor their memory on the device."""

    def __init__(self, text_encoder: SDXLTextEncoder, prompts: list[str], device: torch.device):
        self.prompts, self.device, self.dtype = prompts, device, text_encoder.dtype
        self.chunks = {p: text_encoder.chunks_needed([p]) for p in [*prompts, ""]}
        self.encoded = {}
        for p in self.chunks:  # one prompt at a time, each at its own length; "" for guidance
            context, pooled = text_encoder.encode([p], self.chunks[p])
            self.encoded[p] = (context.cpu(), pooled.cpu())
        with torch.no_grad():
            self.zeros = [t.cpu() for t in text_encoder.encode_negative(None, 1, 1)]
        self.force_zeros = text_encoder.force_zeros_for_empty_prompt

    def chunks_needed(self, prompts: list[str]) -> int:
        return max(self.chunks[p] for p in prompts)

    def encode(self, prompts: list[str], chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        for p in prompts:
            assert self.chunks[p] == chunks, "encoded prompts are used one length at a time"
        context = torch.cat([self.encoded[p][0] for p in prompts]).to(self.device)
        return context, torch.cat([self.encoded[p][1] for p in prompts]).to(self.device)

    def encode_negative(
        self, negative_prompts: list[str] | None, batch: int, chunks: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if negative_prompts is None and self.force_zeros:
            context, pooled = self.zeros
            context = context.repeat(batch, chunks, 1)  # (batch, chunks * 77, 2048)
            return context.to(self.device), pooled.repeat(batch, 1).to(self.device)
        return self.encode(negative_prompts or [""] * batch, chunks)


@dataclass
class Pipeline:
    unet: UNet2DConditionModel
    text_encoder: SDXLTextEncoder | EncodedPrompts
    vae: SDXLVAE
    schedule: NoiseSchedule
    device: torch.device
    dtype: torch.dtype  # the UNet's
    unet_call: UNetFn | None = None  # how the sampling loop calls the UNet; None: the UNet itself


def build_pipeline(
    load: Callable[[torch.device | str], SDXLParts],
    read_loras: Callable[[UNet2DConditionModel], list[tuple[LoRAModules | dict, float]]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    fp8_base: bool,
    cuda_graph: bool,
    compile: bool,
) -> Pipeline:
    """The models `load(device)` gives, with the LoRAs `read_loras(unet)` gives merged in, each in
    turn, as one Pipeline on `device`. They load straight onto the device; with `fp8_base` onto the
    host, where the merges and the fp8 conversion are done before the UNet moves: its bf16 copy
    never reaches the device (it would set max_memory_reserved). The text encoders stay on the
    device: each batch needs them. The memory preflight (sampling/preflight.py) runs this too."""
    parts = load("cpu" if fp8_base else device)
    models = components(parts.unet, parts.text_encoder)
    for weights, scale in read_loras(parts.unet):  # each merged into the weights, in turn
        apply_lora(models, weights, scale)
    if fp8_base:  # after the merges, which need the weights in full precision
        store_in_fp8(parts.unet)
    for part in (parts.unet, parts.text_encoder, parts.vae):
        part.to(device)
    parts.unet.to(memory_format=torch.channels_last)
    pipe = Pipeline(parts.unet, parts.text_encoder, parts.vae, parts.schedule, device, dtype)
    return fast_calls(pipe, cuda_graph, compile)


def fast_calls(pipe: Pipeline, cuda_graph: bool, compile: bool) -> Pipeline:
    """The pipeline with a faster UNet call on a GPU (sdxl/capture.py): with `compile`, its blocks
    compiled; with `cuda_graph`, replayed as CUDA graphs. The loop is the same; only the call
    changes."""
    if compile:
        compile_blocks(pipe.unet)
    if not cuda_graph:
        return pipe
    return graphed_calls(pipe, capture=True)


def graphed_calls(pipe: Pipeline, capture: bool) -> Pipeline:
    """The UNet call through `Graphed`: one graph per batch and image size, captured at the first
    sampling step that has them. capture=False runs the same path eagerly (the CPU tests).

    Memory: the graph's private pool (0.32 GiB at 1024 px with guidance) stays reserved under the
    VAE's decode, which cannot use it. Capturing the decode into the same pool does not lower the
    high-water mark: its eager warm-up comes first, on top of the pool (the memory preflight)."""
    unet = pipe.unet

    def flat(x, t, context, text_embeds, time_ids):  # Graphed takes tensors, not a dict
        return unet(x, t, context, {"text_embeds": text_embeds, "time_ids": time_ids})

    graphs = Graphed(flat, capture, label="--cuda-graph UNet call" if capture else None)

    def unet_call(x, t, context, cond):
        return graphs(x, t, context, cond["text_embeds"], cond["time_ids"])

    return dataclasses.replace(pipe, unet_call=unet_call)


def guided(
    unet: UNetFn,
    context: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    guidance_scale: float,
    dtype: torch.dtype,
    guidance_rescale: float = 0.0,
) -> ModelFn:
    """The prediction a sampler sees. With guidance, the conditioning tensors are [uncond; cond]
    along the batch and each call runs both halves at once. `guidance_rescale` (Lin et al. 2023,
    section 3.4; what zero-terminal-SNR models need against over-exposure) scales the guided
    prediction towards the conditional one's standard deviation, mixing that in with this weight."""
    cond = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
    context = context.to(dtype)

    def model_guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = unet(torch.cat([x, x]).to(dtype), t, context, cond).float()
        uncond, text = out.chunk(2)
        guided = uncond + guidance_scale * (text - uncond)
        if guidance_rescale:
            dims = list(range(1, guided.ndim))
            rescaled = guided * (
                text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
            )
            guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
        return guided

    def model_plain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x.to(dtype), t, context, cond).float()

    return model_guided if guidance_scale > 1 else model_plain


@torch.no_grad()
def generate_unique_batch(
    pipe: Pipeline,
    prompts: list[str],
    seeds: list[int],
    height: int = 1024,
    width: int = 1024,
    steps: int = 30,
    guidance_scale: float = 5.0,
    negative_prompt: str | None = None,
    sampler: str = "euler",
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """One image per prompt, image i from seeds[i]. Returns (B, 3, height, width) in [0, 1]."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    B = len(prompts)
    # Long prompts: as many 75-token chunks as the longest prompt (or the negative prompt) needs.
    chunks = pipe.text_encoder.chunks_needed(prompts + [negative_prompt or ""])
    context, pooled = pipe.text_encoder.encode(prompts, chunks)
    # SDXL time ids: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) for an uncropped image
    # of the requested size.
    time_ids = torch.tensor(
        [[height, width, 0, 0, height, width]] * B, dtype=torch.float32, device=pipe.device
    )
    if guidance_scale > 1:
        negatives = None if negative_prompt is None else [negative_prompt] * B
        neg_context, neg_pooled = pipe.text_encoder.encode_negative(negatives, B, chunks)
        context, pooled = torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])
        time_ids = torch.cat([time_ids, time_ids])
    generators = [torch.Generator(pipe.device).manual_seed(s) for s in seeds]
    noise = randn((B, 4, height // 8, width // 8), generators, pipe.device, torch.float32)
    model = guided(
        pipe.unet_call or pipe.unet,
        context,
        pooled,
        time_ids,
        guidance_scale,
        pipe.dtype,
        guidance_rescale,
    )
    latents = SAMPLERS[sampler](model, noise, pipe.schedule, steps, generators)
    images = pipe.vae.decode(latents.float())  # fp32 decode: the SDXL VAE overflows in fp16
    return (images / 2 + 0.5).clamp(0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> an 8-bit RGB image."""
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy())


def save_grid(images: torch.Tensor, path: Path) -> None:
    """(N, 3, H, W) in [0, 1] -> one PNG grid, written atomically."""
    with atomic_write(path) as tmp:
        image_grid(images).save(tmp, format="PNG")


def image_grid(images: torch.Tensor) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one PIL image, up to 4 per row."""
    n, _, h, w = images.shape
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(to_pil(img), ((i % cols) * w, (i // cols) * h))
    return grid


# ---------------------------------------------------------------------------------------------
# LoRAs
# ---------------------------------------------------------------------------------------------


def apply_lora(
    models: dict[str, torch.nn.Module],
    weights: LoRAModules | dict[str, torch.Tensor],
    strength: float = 1.0,
) -> None:
    """Merge a LoRA into the models it adapts (`models` as sdxl/lora.py's `components` gives them),
    at `strength`: one matmul per layer instead of three, and room for the next LoRA. `weights` as
    sdxl/checkpoint.py's `read_lora_weights` returns them: adapters, or for a full fine-tune
    the whole UNet's state dict."""
    if all(isinstance(v, Adapter | Factors) for v in weights.values()):
        attach_lora(models, weights)  # type: ignore[arg-type]
        for model in models.values():
            merge_lora(model, strength)
    else:  # a full fine-tune: the whole UNet
        unet = models["unet"]
        dtype = next(unet.parameters()).dtype
        unet.load_state_dict({k: v.to(dtype) for k, v in weights.items()})  # type: ignore[union-attr]
