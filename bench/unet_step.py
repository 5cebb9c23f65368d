"""One LoRA training step of our SDXL UNet against diffusers' UNet + a peft LoRA of the same shape.

Both sides: frozen bf16 base with identical random weights, rank-4 adapters (fp32) on to_q, to_k,
to_v and to_out.0 of every attention, AdamW on the adapters only, batch 1, the same inputs. Each side
runs in its own process (so peak memory is the process's VmHWM and nothing leaks between them), and
the sides alternate A B A B. Prints the median step time, peak memory, memory above the weights, the
trainable-parameter count, and the ratios ours / reference.

    uv run python bench/unet_step.py --config tiny
    uv run python bench/unet_step.py --config sdxl --latent 64 --repeats 2
    uv run python bench/unet_step.py --config sdxl --latent 128 --checkpointing off
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

TINY = {
    "block_out_channels": [64, 128, 256],
    "transformer_layers_per_block": [1, 2, 4],
    "attention_head_dim": [1, 2, 4],
    "cross_attention_dim": 256,
    "addition_time_embed_dim": 32,
    "projection_class_embeddings_input_dim": 256 + 6 * 32,
    "norm_num_groups": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type": "text_time",
    "use_linear_projection": True,
}


def unet_config(name: str) -> dict:
    if name == "tiny":
        return dict(TINY)
    return json.loads((ROOT / "sdxl/configs/sdxl-base-1.0/unet/config.json").read_text())


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Identical small random weights on both sides: one generator, parameters in name order."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))


def build(side: str, cfg: dict, rank: int, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A UNet built on meta and materialised straight in `dtype` (no fp32 copy), with LoRA."""
    if side == "ours":
        from sdxl.lora import apply_lora_to_unet
        from sdxl.unet import UNet2DConditionModel

        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(cfg)
    else:
        from diffusers import UNet2DConditionModel as RefUNet

        with torch.device("meta"):
            model = RefUNet.from_config(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    fill_random(model)
    if side == "ours":
        apply_lora_to_unet(model, rank=rank, alpha=rank, target_mode="attention")
    else:
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
        for p in model.parameters():  # fp32 adapters, as on our side
            if p.requires_grad:
                p.data = p.data.float()
    return model


def child(args: argparse.Namespace) -> None:
    """Run one side and print one JSON line."""
    torch.manual_seed(0)
    cfg = unet_config(args.config)
    dtype = DTYPES[args.dtype]
    model = build(args.side, cfg, args.rank, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.checkpointing == "on":
        model.enable_gradient_checkpointing()
    memory_format = torch.contiguous_format
    if args.channels_last == "both" or (args.channels_last == "ours" and args.side == "ours"):
        memory_format = torch.channels_last
    model.to(memory_format=memory_format)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    g = torch.Generator().manual_seed(1)
    L = args.latent
    ctx_dim, pooled = (
        cfg["cross_attention_dim"],
        cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"],
    )
    x = torch.randn(1, 4, L, L, generator=g).to(dtype).contiguous(memory_format=memory_format)
    target = torch.randn(1, 4, L, L, generator=g)
    ctx = torch.randn(1, 77, ctx_dim, generator=g).to(dtype)
    cond = {
        "text_embeds": torch.randn(1, pooled, generator=g).to(dtype),
        "time_ids": torch.tensor([[8.0 * L, 8.0 * L, 0, 0, 8.0 * L, 8.0 * L]]).to(dtype),
    }
    t = torch.tensor([500])

    def step() -> float:
        start = time.perf_counter()
        if args.side == "ours":
            pred = model(x, t, ctx, cond)
        else:
            pred = model(x, t, ctx, added_cond_kwargs=cond).sample
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up: first-call allocations and kernel selection
    times = [step() for _ in range(args.steps)]
    print(
        json.dumps(
            {
                "times": times,
                "peak": proc_status("VmHWM"),
                "weights": weight_bytes,
                "trainable": sum(p.numel() for p in trainable),
            }
        )
    )


def main(args: argparse.Namespace) -> None:
    results: dict[str, list[dict]] = {"ours": [], "ref": []}
    for r in range(args.repeats):
        for side in ("ours", "ref"):
            cmd = [sys.executable, __file__, "--side", side, "--config", args.config]
            cmd += ["--latent", str(args.latent), "--checkpointing", args.checkpointing]
            cmd += ["--steps", str(args.steps), "--rank", str(args.rank)]
            cmd += ["--channels_last", args.channels_last, "--dtype", args.dtype]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results[side].append(res)
            print(
                f"run {r + 1}/{args.repeats} {side:4s}: steps {' '.join(f'{s:.3f}' for s in res['times'])} s, "
                f"peak {res['peak'] / 2**30:.2f} GiB",
                flush=True,
            )

    def summary(side: str) -> dict:
        runs = results[side]
        return {
            "step": statistics.median(t for r in runs for t in r["times"]),
            "peak": max(r["peak"] for r in runs),
            "above": max(r["peak"] - r["weights"] for r in runs),
            "trainable": runs[0]["trainable"],
        }

    ours, ref = summary("ours"), summary("ref")
    print(
        f"\nconfig {args.config}, latent {args.latent}x{args.latent}, {args.dtype}, rank {args.rank}, "
        f"checkpointing {args.checkpointing}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'':18s}{'median step s':>14s}{'peak GiB':>10s}{'above weights GiB':>19s}{'trainable':>12s}"
    )
    for name, s in (("ours", ours), ("diffusers + peft", ref)):
        print(
            f"{name:18s}{s['step']:14.3f}{s['peak'] / 2**30:10.2f}{s['above'] / 2**30:19.3f}{s['trainable']:12,d}"
        )
    print(
        f"{'ratio ours/ref':18s}{ours['step'] / ref['step']:14.3f}{ours['peak'] / ref['peak']:10.3f}"
        f"{ours['above'] / ref['above']:19.3f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        choices=["tiny", "sdxl"],
        default="tiny",
        help="UNet widths: a small SDXL-shaped config or the real one",
    )
    parser.add_argument(
        "--latent",
        type=int,
        default=64,
        help="latent height and width (64 = 512 px, 128 = 1024 px)",
    )
    parser.add_argument(
        "--checkpointing",
        choices=["on", "off"],
        default="on",
        help="gradient checkpointing on both sides",
    )
    parser.add_argument(
        "--channels_last",
        choices=["ours", "both", "none"],
        default="ours",
        help="which side runs in channels_last memory format (ours does by default: bf16 convolutions on the CPU are ~60x faster in it)",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="bf16",
        help="dtype of the frozen base (adapters are fp32)",
    )
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per process, after one warm-up step"
    )
    parser.add_argument("--repeats", type=int, default=2, help="how many A B rounds")
    parser.add_argument("--side", choices=["ours", "ref"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.side else main(args)
