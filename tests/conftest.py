"""Shared fixtures: tiny SDXL-shaped configs for CPU tests."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The project's cache (scan indexes, cached latents, the tiny SDXL) goes to a fresh folder, not the
# user's ~/.cache/sdxl-lora; subprocesses inherit it.
os.environ["SDXL_LORA_CACHE"] = tempfile.mkdtemp(prefix="sdxl-lora-test-cache-")
# Bitwise assertions compare two runs of the same computation. MKL's AVX-512 matrix kernels round
# differently by where a row starts in memory (a (2, 112) @ (112, 128) product differs between
# offsets 0 and 1 float, measured on an AMD EPYC with AVX-512), so MKL runs in its conditional
# numerical reproducibility mode, whose results do not depend on alignment (set before MKL starts;
# subprocesses inherit it).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

SDXL_CONFIGS = ROOT / "sdxl" / "configs" / "sdxl-base-1.0"
EXAMPLES = ROOT / "examples" / "shapes"


def train_argv(model: Path, output_dir: Path, *extra: str) -> list[str]:
    """train_sdxl.py flags for a quick CPU run on the example shapes: 32 px, fp32, plus `extra`."""
    return [
        "--data_dir",
        str(EXAMPLES),
        "--pretrained_model",
        str(model),
        "--output_dir",
        str(output_dir),
        "--image_size",
        "32",
        "--precision",
        "fp32",
        *extra,
    ]


def tiny_specs(adapter=None, optimizer=None, step=None, loss=None):
    """A run's specs built directly (as the library takes them), for the step tests: the example
    shapes at 32 px, fp32, LoRA with the given (or default) settings."""
    from training import specs

    return specs.TrainSpecs(
        data=specs.DataSpec(EXAMPLES, size=(32, 32)),
        model=specs.ModelSpec("tiny"),
        adapter=adapter or specs.AdapterSpec(),
        loss=loss or specs.LossSpec(),
        optimizer=optimizer or specs.OptimizerSpec(),
        step=step or specs.StepSpec(precision="fp32"),
    )


def unet_inputs(seed: int = 0, batch: int = 2):
    """Inputs of the tiny UNet: latents (B, 4, 8, 8), timesteps, context (B, 77, 96) and the added
    conditioning, from `seed`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 77, 96, generator=g)
    cond = {
        "text_embeds": torch.randn(batch, 64, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch),
    }
    return x, torch.tensor([100, 700][:batch]), ctx, cond


def close(actual, expected) -> None:
    """fp32, the same weights: within 1e-5 of the largest value (the parity tests' bar)."""
    import torch

    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def randomize_adapters(model, seed: int = 1) -> None:
    """Non-zero adapters, ours or peft's: up and down random, DoRA magnitudes moved off ||W||."""
    import torch

    g = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("magnitude") or "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif ".lora." in name or ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                continue
            changed += 1
    assert changed, "no adapter parameters to randomize"


def tiny_unet_config() -> dict:
    """An SDXL-structured diffusers unet config with small widths (3 levels, 2 layers per level)."""
    return {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [1, 2, 4],
        "cross_attention_dim": 32,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
        "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "addition_embed_type": "text_time",
        "use_linear_projection": True,
        "sample_size": 16,
    }


@pytest.fixture
def sdxl_unet_config() -> dict:
    import json

    return json.loads((SDXL_CONFIGS / "unet" / "config.json").read_text())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random SDXL folder (diffusers layout), written once per test session."""
    from sdxl.pretrained import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture
def tiny_configs(tiny_model, monkeypatch):
    """The tiny SDXL's configs stand in for the shipped full-size ones (a tiny single file needs
    them)."""
    import sdxl.pretrained

    monkeypatch.setattr(sdxl.pretrained, "SDXL_CONFIGS", tiny_model)
    return tiny_model


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model):
    """diffusers' StableDiffusionXLPipeline on the tiny folder: the reference."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_model, dtype=torch.float32)
