"""Peak memory of loading a full-size SDXL UNet checkpoint into bf16.

Writes a random full-size UNet in the official layout (`unet/config.json` + fp32 or fp16 safetensors)
once, then loads it in a fresh process with `sdxl.unet.load_unet(..., dtype=bfloat16)` and reports the
process's peak resident memory (VmHWM) against the size of the bf16 weights. A loader that kept an fp32
copy would peak near 1.5x-3x the weights; ours reads and converts one tensor at a time.

    uv run python bench/load_unet.py --variant fp32 --folder /tmp/sdxl-unet-random
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.unet_step import proc_status  # noqa: E402
from sdxl.unet import UNet2DConditionModel, load_unet  # noqa: E402


def write_random(folder: Path, variant: str) -> None:
    """A random full-size UNet, written tensor by tensor without holding the model in fp32."""
    from safetensors.torch import save_file

    config = json.loads((ROOT / "sdxl/configs/sdxl-base-1.0/unet/config.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "sdxl/configs/sdxl-base-1.0/unet/config.json", folder / "config.json")
    dtype = torch.float32 if variant == "fp32" else torch.float16
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    g = torch.Generator().manual_seed(0)
    state = {
        k: (torch.randn(v.shape, generator=g) * 0.02).to(dtype)
        for k, v in unet.state_dict().items()
    }
    name = (
        "diffusion_pytorch_model.safetensors"
        if variant == "fp32"
        else "diffusion_pytorch_model.fp16.safetensors"
    )
    save_file(state, folder / name)


def child(folder: Path) -> None:
    start = time.perf_counter()
    unet = load_unet(folder, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    print(json.dumps({"peak": proc_status("VmHWM"), "weights": weights, "seconds": seconds}))


def main(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    if not any(folder.glob("diffusion_pytorch_model*.safetensors")):
        print(f"writing a random full-size {args.variant} UNet to {folder} ...", flush=True)
        write_random(folder, args.variant)
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--folder", str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    file = next(folder.glob("diffusion_pytorch_model*.safetensors"))
    print(f"file {file.name}: {file.stat().st_size / 2**30:.2f} GiB")
    print(
        f"bf16 weights {res['weights'] / 2**30:.2f} GiB; process peak (VmHWM) {res['peak'] / 2**30:.2f} GiB; "
        f"peak - weights {(res['peak'] - res['weights']) / 2**30:.2f} GiB; load {res['seconds']:.1f} s"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--folder",
        default="/tmp/sdxl-unet-random",
        help="where the random unet/ folder is (written if missing)",
    )
    p.add_argument(
        "--variant", choices=["fp32", "fp16"], default="fp32", help="dtype of the written file"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    child(Path(a.folder)) if a.child else main(a)
