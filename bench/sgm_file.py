"""Write an SDXL model as one file in the original (SGM) layout, the inverse of diffusers' converters.

The project reads single files with diffusers' converters and writes them with its own name map
(sdxl/single_file.py). SDXL weights cannot be downloaded here; this writes a file from any
diffusers-layout model folder (the tiny SDXL, or full-size random weights) for the tests and the
benches.

    uv run python bench/sgm_file.py --model tiny --output tiny-sdxl.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_sgm_file(folder: Path, path: Path, dtype: torch.dtype | None = None) -> Path:
    """Write the diffusers-layout model in `folder` as one SGM safetensors file."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdxl.single_file import write_single_file
    from sdxl.unet import load_unet

    parts = {
        "unet": load_unet(folder / "unet").state_dict(),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict(),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
            folder / "text_encoder_2"
        ).state_dict(),
        "vae": AutoencoderKL.from_pretrained(folder / "vae").state_dict(),
    }
    return write_single_file(parts, path, dtype)


if __name__ == "__main__":
    from sdxl.pretrained import resolve_model

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", help="a diffusers-layout SDXL folder, or tiny")
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    args = p.parse_args()
    print(write_sgm_file(resolve_model(args.model), Path(args.output)))
