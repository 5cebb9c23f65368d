"""Peak memory of loading a full-size SDXL single file (SGM layout) with sdxl/single_file.py.

Writes a full-size SDXL (UNet, both text encoders, VAE; constant weights, the real shapes) as one
fp16 SGM safetensors file once, then, in a fresh process, loads it as training on a GPU would: the
UNet in bf16, the text encoders in fp16, the VAE in fp32. Reports the process's peak resident memory
(VmHWM) against the loaded weights and the resident memory after `import torch` and the rest of the
imports. A loader that read the whole file first would peak near the weights plus the file.

    uv run python bench/load_single_file.py --file /tmp/sdxl-sgm-fp16.safetensors
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.unet_step import proc_status
from sdxl.pretrained import SDXL_CONFIGS
from sdxl.single_file import sgm_state_dict


def write_full_size(path: Path) -> None:
    """The four parts built on the meta device from the shipped configs, materialised in fp16 with a
    constant (the values do not matter for memory), and written as one SGM file."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxl.unet import UNet2DConditionModel

    config_g = CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder_2")
    with torch.device("meta"):
        parts = [
            UNet2DConditionModel.from_config(
                json.loads((SDXL_CONFIGS / "unet" / "config.json").read_text())
            ),
            CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder")),
            CLIPTextModelWithProjection(config_g),
            AutoencoderKL.from_config(
                json.loads((SDXL_CONFIGS / "vae" / "config.json").read_text())
            ),
        ]
    states = [
        {k: torch.full(v.shape, 0.01, dtype=torch.float16) for k, v in p.state_dict().items()}
        for p in parts
    ]
    state = sgm_state_dict(*states, config_g.num_hidden_layers)
    save_file({k: v.contiguous() for k, v in state.items()}, path)


def child(path: Path) -> None:
    from sdxl.pretrained import load_sdxl

    baseline = proc_status("VmRSS")  # torch, transformers and diffusers imported
    start = time.perf_counter()
    parts = load_sdxl(path, torch.bfloat16, "cpu", torch.float16)
    seconds = time.perf_counter() - start
    weights = sum(
        t.numel() * t.element_size()
        for m in (parts.unet, parts.text_encoder, parts.vae)
        for t in [*m.parameters(), *m.buffers()]
    )
    print(
        json.dumps(
            {
                "peak": proc_status("VmHWM"),
                "baseline": baseline,
                "weights": weights,
                "seconds": seconds,
            }
        )
    )


def main(args: argparse.Namespace) -> None:
    path = Path(args.file)
    if not path.is_file():
        print(f"writing a full-size fp16 SGM file to {path} ...")
        write_full_size(path)
    size = path.stat().st_size
    res = subprocess.run(
        [sys.executable, __file__, "--child", str(path)], capture_output=True, text=True
    )
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    r = json.loads(res.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(
        f"file {size / gib:.2f} GiB (fp16); loaded weights {r['weights'] / gib:.2f} GiB "
        f"(UNet bf16, text encoders fp16, VAE fp32) in {r['seconds']:.1f} s"
    )
    print(
        f"peak resident {r['peak'] / gib:.2f} GiB; after the imports {r['baseline'] / gib:.2f} GiB; "
        f"peak above imports and weights {(r['peak'] - r['baseline'] - r['weights']) / gib:.2f} GiB"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--file",
        default="/tmp/sdxl-sgm-fp16.safetensors",
        help="the single file (written if missing)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    child(Path(args.child)) if args.child else main(args)
