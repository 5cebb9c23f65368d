"""Trainable adapter parameters of each adapter kind on the full-size SDXL (meta device, no weights).

Prints a Markdown table (the one README.md lists): the UNet's adapters for each target mode, with
conv LoRA, DoRA, LoHa and LoKr, and the text encoders'. The same counts are printed at the start of
training by `describe_adapters`.

    uv run python bench/adapter_counts.py --rank 4
    uv run python bench/adapter_counts.py --rank 16 --model ./weights/sdxl-base-1.0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxl.lora import apply_lora_to_text_encoders, apply_lora_to_unet, count_parameters
from sdxl.pretrained import SDXL_CONFIGS, meta_models

# (row label, apply_lora_to_unet keywords, with the text encoders)
ROWS = [
    ("LoRA, attention (default)", {"target_mode": "attention"}, False),
    ("LoRA, attention_out", {"target_mode": "attention_out"}, False),
    ("LoRA, all", {"target_mode": "all"}, False),
    ("LoRA, attention + conv (--conv_rank R)", {"target_mode": "attention", "conv": True}, False),
    ("LoRA, all + conv (kohya's LoCon)", {"target_mode": "all", "conv": True}, False),
    ("DoRA, attention (--use_dora)", {"target_mode": "attention", "kind": "dora"}, False),
    ("DoRA, all + conv", {"target_mode": "all", "kind": "dora", "conv": True}, False),
    ("LoRA, attention + text encoders", {"target_mode": "attention"}, True),
    ("LoHa, attention (--adapter loha)", {"target_mode": "attention", "kind": "loha"}, False),
    ("LoHa, all + conv", {"target_mode": "all", "kind": "loha", "conv": True}, False),
    ("LoKr, attention (--adapter lokr)", {"target_mode": "attention", "kind": "lokr"}, False),
    ("LoKr, all + conv, --lokr_factor 16",
     {"target_mode": "all", "kind": "lokr", "conv": True, "lokr_factor": 16}, False),
]  # fmt: skip


def main(args: argparse.Namespace) -> None:
    print(f"rank {args.rank} (conv rank {args.rank}), {args.model}\n")
    print("| adapters | UNet Linear | UNet Conv2d | DoRA magnitudes | text encoders | total |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, options, text in ROWS:
        models = meta_models(args.model)
        unet_options = dict(options)
        conv = unet_options.pop("conv", False)
        apply_lora_to_unet(
            models["unet"], args.rank, args.rank, conv_rank=args.rank if conv else 0, **unet_options
        )
        unet = count_parameters(models["unet"])
        text_count = 0
        if text:
            encoders = torch.nn.Module()
            encoders.text_encoder, encoders.text_encoder_2 = (
                models["text_encoder"],
                models["text_encoder_2"],
            )
            apply_lora_to_text_encoders(encoders, args.rank, args.rank)
            text_count = sum(
                sum(count_parameters(models[c]).values())
                for c in ("text_encoder", "text_encoder_2")
            )
        total = sum(unet.values()) + text_count
        print(
            f"| {label} | {unet['linear']:,} | {unet['conv']:,} | {unet['magnitude']:,} "
            f"| {text_count:,} | {total:,} |"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rank", type=int, default=4, help="rank (and alpha) of every adapter")
    p.add_argument(
        "--model",
        type=Path,
        default=SDXL_CONFIGS,
        help="a model folder whose configs to use (default: the SDXL base 1.0 configs shipped)",
    )
    main(p.parse_args())
