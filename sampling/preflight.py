"""The memory preflight of a generation run (`generate_images.py --estimate-memory`): the run's own
`build_pipeline` and two batches of `generate_unique_batch` at its largest size, on the meta device
(sdxl/memory.py says how). The first batch warms up and captures the UNet's CUDA graph, the second
replays it; the sampling steps are two, since memory does not grow with them. bench/gpu_report.py
runs the same phases on a GPU.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sampling.inference import build_pipeline, generate_unique_batch
from sdxl.checkpoint import read_lora_weights
from sdxl.device import resolve_precision
from sdxl.memory import MemoryTrace, simulated_cuda_graphs
from sdxl.pretrained import SDXLParts, config_parts


def estimate_generation(
    model: Path,
    *,
    size: tuple[int, int],
    batch: int,
    loras: list[tuple[Path, float]] = (),  # type: ignore[assignment]
    precision: str = "auto",
    fp8_base: bool = False,
    cuda_graph: bool = True,
    vae_tile_size: int = 512,
    guidance_scale: float = 5.0,
) -> MemoryTrace:
    """The run's phases traced (MemoryTrace.report() prints them). `size`: (width, height)."""
    resolved = resolve_precision(precision, torch.device("cuda"))
    device = torch.device("meta")

    # Built before the trace starts: building is not loading (only where the parts go counts).
    parts = config_parts(
        model, resolved.unet_dtype, resolved.text_dtype, vae_tile_size=vae_tile_size
    )

    def load(where: torch.device | str) -> SDXLParts:
        for part in (parts.unet, parts.text_encoder, parts.vae):
            part.to(where)  # straight onto the device, or onto the host
        return parts

    trace = MemoryTrace()
    quiet = contextlib.redirect_stdout(io.StringIO())  # the run's own lines (graphs)
    with quiet, trace, simulated_cuda_graphs(trace):
        generation_phases(
            load,
            lambda unet: [(read_lora_weights(path, unet), scale) for path, scale in loras],
            device=device,
            dtype=resolved.compute_dtype,
            fp8_base=fp8_base,
            cuda_graph=cuda_graph,
            size=size,
            batch=batch,
            guidance_scale=guidance_scale,
            phases=trace,
        )
    return trace


def generation_phases(
    load: Callable[[torch.device | str], SDXLParts],
    read_loras: Callable,
    *,
    device: torch.device,
    dtype: torch.dtype,
    fp8_base: bool,
    cuda_graph: bool,
    size: tuple[int, int],
    batch: int,
    guidance_scale: float,
    phases: Any,
    batches: int = 2,
    steps: int = 2,
) -> None:
    """generate_images.py's phases: `build_pipeline` (its models arriving), then `batches` batches
    of `generate_unique_batch` (the first warms up and captures the UNet's CUDA graph, the others
    replay it), each one of `phases`' rows (sdxl/memory.py's MemoryTrace, or bench/gpu_report.py's
    measurements)."""
    pipe = build_pipeline(
        load,
        read_loras,
        device=device,
        dtype=dtype,
        fp8_base=fp8_base,
        cuda_graph=cuda_graph,
        compile=False,
    )
    phases.row("the pipeline on the device")
    width, height = size
    prompts, seeds = ["a photograph"] * batch, list(range(batch))
    for k in range(batches):
        name = "sampling (warm-up, capture), decoding" if k == 0 else "(replays)"
        with phases.phase(f"batch {k + 1}: {name}"):
            generate_unique_batch(pipe, prompts, seeds, height, width, steps, guidance_scale)
