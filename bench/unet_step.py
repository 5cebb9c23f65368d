"""One LoRA training step of our SDXL UNet against diffusers' UNet + a peft LoRA of the same shape.

Both sides: frozen bf16 base with identical random weights, rank-4 adapters (fp32) on to_q, to_k,
to_v and to_out.0 of every attention, AdamW on the adapters only, batch 1, the same inputs. Each side
runs in its own process (so peak memory is the process's VmHWM and nothing leaks between them), and
the sides alternate A B A B. Prints the median step time, peak memory, memory above the weights, the
trainable-parameter count, and the ratios ours / reference.

Memory is reported three ways. "peak" is the process's VmHWM; "above weights" is VmHWM minus the
weight bytes, so it includes the PyTorch runtime (about 0.53 GiB for `import torch` here), the
imports of each side, and whatever the C allocator keeps resident after freeing. "step live" is the
peak of the bytes malloc has handed out and not yet had back (glibc's mallinfo2, sampled
continuously by a second thread during one extra, untimed step), minus the same at the start of
that step: what the step itself needs (saved activations, recompute buffers, gradients), without
allocator retention; the CPU counterpart of `torch.cuda.max_memory_allocated`. With `--device cuda`
"peak" is `max_memory_reserved` from the start of training (after the weights are built) and "step
live" is `max_memory_allocated` above the step's start.

    uv run python bench/unet_step.py --config tiny
    uv run python bench/unet_step.py --config sdxl --latent 64 --repeats 2
    uv run python bench/unet_step.py --config sdxl --latent 128 --checkpointing off
    uv run python bench/unet_step.py --config sdxl --latent 128 --device cuda   # on a GPU: bf16
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdxl.device import DTYPES

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


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _find_mallinfo2():
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2


# Looked up once (the sampler below calls it in a tight loop); None off glibc.
MALLINFO2 = _find_mallinfo2()


def malloc_in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back (heap chunks + mmapped chunks)."""
    info = MALLINFO2()
    return info.uordblks + info.hblkhd


def live_peak_during(fn) -> int | None:
    """Peak of malloc_in_use() while fn() runs, above its value at the start (None off glibc)."""
    if MALLINFO2 is None:
        fn()
        return None
    start = malloc_in_use()
    peak, done = start, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, malloc_in_use())
            time.sleep(0)  # yield the GIL, then sample again

    sampler = threading.Thread(target=sample)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    return peak - start


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Identical small random weights on both sides: one generator on the model's device,
    parameters in name order."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
        p.copy_(noise.mul_(0.02).to(p.dtype))


def build(
    side: str, cfg: dict, rank: int, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> torch.nn.Module:
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
    model = model.to(dtype).to_empty(device=device)
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
    device = torch.device(args.device)
    model = build(args.side, cfg, args.rank, dtype, args.device)
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
    x = torch.randn(1, 4, L, L, generator=g).to(device, dtype)
    x = x.contiguous(memory_format=memory_format)
    target = torch.randn(1, 4, L, L, generator=g).to(device)
    ctx = torch.randn(1, 77, ctx_dim, generator=g).to(device, dtype)
    cond = {
        "text_embeds": torch.randn(1, pooled, generator=g).to(device, dtype),
        "time_ids": torch.tensor([[8.0 * L, 8.0 * L, 0, 0, 8.0 * L, 8.0 * L]]).to(device, dtype),
    }
    t = torch.tensor([500], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        # The peak counts from here, the start of training: otherwise the caching allocator keeps
        # the weight fill's fp32 scratch reserved, and the "peak" would be that, not the steps.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

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
        sync()
        return time.perf_counter() - start

    step()  # warm-up: first-call allocations and kernel selection
    times = [step() for _ in range(args.steps)]
    live: int | None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_reserved()  # warm-up and timed steps
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        live = torch.cuda.max_memory_allocated() - start
        peak = max(peak, torch.cuda.max_memory_reserved())
    else:
        live = live_peak_during(step)
        peak = proc_status("VmHWM")
    print(
        json.dumps(
            {
                "times": times,
                "peak": peak,
                "weights": weight_bytes,
                "live": live,
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
            cmd += ["--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results[side].append(res)
            print(
                f"run {r + 1}/{args.repeats} {side:4s}: steps {' '.join(f'{s:.3f}' for s in res['times'])} s, "
                f"peak {res['peak'] / 2**30:.2f} GiB, step live {(res['live'] or 0) / 2**20:.0f} MiB",
                flush=True,
            )

    def summary(side: str) -> dict:
        runs = results[side]
        return {
            "step": statistics.median(t for r in runs for t in r["times"]),
            "peak": max(r["peak"] for r in runs),
            "above": max(r["peak"] - r["weights"] for r in runs),
            "live": max(r["live"] or 0 for r in runs),
            "trainable": runs[0]["trainable"],
        }

    ours, ref = summary("ours"), summary("ref")
    print(
        f"\nconfig {args.config}, latent {args.latent}x{args.latent}, {args.dtype}, rank {args.rank}, "
        f"checkpointing {args.checkpointing}, {torch.get_num_threads()} threads"
    )
    header = ("median step s", "peak GiB", "above weights GiB", "step live MiB", "trainable")
    print(f"{'':18s}" + "".join(f"{h:>19s}" for h in header))
    for name, s in (("ours", ours), ("diffusers + peft", ref)):
        row = (s["step"], s["peak"] / 2**30, s["above"] / 2**30, s["live"] / 2**20)
        print(f"{name:18s}" + "".join(f"{v:19.3f}" for v in row) + f"{s['trainable']:19,d}")
    ratios = [
        ours[k] / ref[k] if ref[k] else float("nan") for k in ("step", "peak", "above", "live")
    ]
    print(f"{'ratio ours/ref':18s}" + "".join(f"{v:19.3f}" for v in ratios))


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
        choices=["bf16", "fp32"],
        default="bf16",
        help="dtype of the frozen base (adapters are fp32)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the step runs (on cuda, memory is torch.cuda's reserved and allocated bytes)",
    )
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per process, after one warm-up step"
    )
    parser.add_argument("--repeats", type=int, default=2, help="how many A B rounds")
    parser.add_argument("--side", choices=["ours", "ref"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.side else main(args)
