"""Load one SDXL folder into our UNet and into diffusers' UNet2DConditionModel and compare them:
max error on the same inputs, forward time, and peak memory, each side in its own process.

    uv run python minSDXL/compare.py --pretrained_model tiny
    uv run python minSDXL/compare.py --pretrained_model ./weights/sdxl-base-1.0 --latent 128 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.unet_step import proc_status  # noqa: E402
from sdxl.device import DTYPES, resolve_device  # noqa: E402


def inputs(config: dict, latent: int, dtype: torch.dtype, device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(0)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    x = torch.randn(2, 4, latent, latent, generator=g)
    ctx = torch.randn(2, 77, config["cross_attention_dim"], generator=g)
    cond = {
        "text_embeds": torch.randn(2, pooled, generator=g),
        "time_ids": torch.tensor(
            [[8.0 * latent, 8.0 * latent, 0, 0, 8.0 * latent, 8.0 * latent]] * 2
        ),
    }
    x, ctx = x.to(device, dtype), ctx.to(device, dtype)
    return (
        x,
        torch.tensor([999, 500], device=device),
        ctx,
        {k: v.to(device, dtype) for k, v in cond.items()},
    )


def child(args: argparse.Namespace) -> None:
    device = resolve_device("auto")
    dtype = DTYPES[args.dtype]
    folder = Path(args.folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    if args.side == "ours":
        from sdxl.unet import load_unet

        call = load_unet(folder / "unet", dtype, device)
    else:
        from diffusers import UNet2DConditionModel

        ref = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype).to(device)

        def call(x, t, c, a):
            return ref(x, t, c, added_cond_kwargs=a).sample

    x, t, ctx, cond = inputs(config, args.latent, dtype, device)
    times = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            out = call(x, t, ctx, cond)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    torch.save(out.float().cpu(), args.out)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else proc_status("VmHWM")
    print(json.dumps({"time": statistics.median(times[1:]), "peak": peak}))


def main(args: argparse.Namespace) -> None:
    folder = Path(args.pretrained_model)
    if not (folder / "unet").is_dir():  # (sdxl.pretrained imports diffusers: 10 s; only if needed)
        from sdxl.pretrained import resolve_model

        folder = resolve_model(args.pretrained_model)
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("ours", "ref"):
            out = Path(tmp) / f"{side}.pt"
            cmd = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--folder",
                str(folder),
                "--out",
                str(out),
                "--latent",
                str(args.latent),
                "--dtype",
                args.dtype,
                "--repeats",
                str(args.repeats),
            ]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[side] = json.loads(res.strip().splitlines()[-1])
            outputs[side] = torch.load(out, weights_only=True)
    err = (outputs["ours"] - outputs["ref"]).abs().max().item()
    scale = outputs["ref"].abs().max().item()
    print(f"{folder}: UNet forward, batch 2, latent {args.latent}x{args.latent}, {args.dtype}")
    print(f"max |ours - diffusers| = {err:.3e} ({err / scale:.3e} of max |diffusers|)")
    print(f"{'':12s}{'forward s':>12s}{'peak GiB':>10s}")
    for name, side in (("ours", "ours"), ("diffusers", "ref")):
        print(f"{name:12s}{results[side]['time']:12.3f}{results[side]['peak'] / 2**30:10.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--pretrained_model", default="tiny", help="an SDXL folder (diffusers layout) or 'tiny'"
    )
    p.add_argument("--latent", type=int, default=16, help="latent height and width (128 = 1024 px)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and inputs dtype")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards after one warm-up")
    p.add_argument("--side", choices=["ours", "ref"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    child(a) if a.side else main(a)
