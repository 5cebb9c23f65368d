"""Fine-tune SDXL's UNet with LoRA (or fully) on image + caption pairs.

A complete run on a CPU (the tiny random SDXL and the shipped example data):

    uv run python train_sdxl.py --pretrained_model tiny --data_dir examples/shapes --use_lora \\
        --image_size 64 --max_train_steps 30 --output_dir outputs/tiny

LoRA on the real SDXL base at 512 px, on one GPU with under 12 GB:

    uv run python train_sdxl.py --data_dir my_dataset --use_lora --lora_rank 4 --lora_alpha 16 \\
        --batch_size 1 --gradient_accumulation_steps 4 --num_epochs 10 --learning_rate 1e-4 \\
        --output_dir ./outputs --pretrained_model ./weights/sdxl-base-1.0 --image_size 512

On a GPU the UNet step runs as replayed CUDA graphs (--cuda_graph auto, the default; off for eager
steps); add --compile for compiled blocks on top (README.md, "GPU speed").

Outputs in --output_dir: config.json (the resolved arguments), metrics.jsonl, step / epoch / lowest-loss
checkpoints (`lora_step000100_<time>.pt`, ...; training/checkpoint.py describes them). Resume with
--resume CHECKPOINT or resume_training.py.
"""

from __future__ import annotations

import argparse
import itertools
import math
import signal
import sys
import time
from pathlib import Path

from sampling.prompts import read_prompt_file
from sdxl.errors import StoppedBySignal, UserError, run_cli
from sdxl.options import (
    AT_LEAST_0,
    AT_LEAST_1,
    BELOW_1,
    BLOCKS,
    CUDA_GRAPH_MODES,
    DEFAULT_MODEL,
    FRACTION,
    LORA_FORMATS,
    LOSS_TYPES,
    MULTIPLE_OF_8,
    OPTIMIZER_NAMES,
    POSITIVE,
    PRECISIONS,
    TARGET_MODES,
    TILE_SIZE,
    VAE_TILE_SIZE,
    check_device,
    check_file,
    check_folder,
    check_model,
    check_numbers,
    check_output_dir,
    comma_separated,
    default_allocator,
    parse_with_config,
)
from training.scan import check_data_dir

# Flags that name files or folders: config.json records them as absolute paths, so that a resume
# started from another directory reads and writes the same places.
PATH_FLAGS = (
    "data_dir",
    "reg_data_dir",
    "output_dir",
    "cache_dir",
    "vae",
    "validation_prompts",
    "resume",
    "config",
)


def check_args(args: argparse.Namespace) -> None:
    """Every flag, checked before anything heavy is imported, any model is loaded or any file is
    written: one line for the first problem."""
    check_data_dir(args.data_dir)
    check_numbers(
        args,
        {
            "image_size": MULTIPLE_OF_8,
            "vae_tile_size": TILE_SIZE,
            "caption_dropout": FRACTION,
            "validation_split": BELOW_1,
            "validation_steps": AT_LEAST_0,
            "validation_sampling_steps": AT_LEAST_1,
            "num_workers": AT_LEAST_0,
            "lora_rank": AT_LEAST_1,
            "lora_alpha": POSITIVE,
            "lora_dropout": BELOW_1,
            "batch_size": AT_LEAST_1,
            "gradient_accumulation_steps": AT_LEAST_1,
            "num_epochs": AT_LEAST_1,
            "max_train_steps": AT_LEAST_1,
            "learning_rate": POSITIVE,
            "adam_epsilon": POSITIVE,
            "adam_weight_decay": AT_LEAST_0,
            "lr_warmup_steps": AT_LEAST_0,
            "max_grad_norm": POSITIVE,
            "snr_gamma": POSITIVE,
            "noise_offset": AT_LEAST_0,
            "ema_decay": FRACTION,
            "save_interval": AT_LEAST_0,
            "keep_last": AT_LEAST_0,
            "keep_tokens": AT_LEAST_0,
            "caption_tag_dropout_rate": FRACTION,
            "prior_loss_weight": AT_LEAST_0,
            "huber_c": POSITIVE,
            "multires_noise_iterations": AT_LEAST_0,
            "multires_noise_discount": FRACTION,
            "ip_noise_gamma": AT_LEAST_0,
        },
    )
    if (args.shuffle_caption or args.caption_tag_dropout_rate) and args.cache_text_embeddings:
        raise UserError(
            "--shuffle_caption and --caption_tag_dropout_rate change captions every epoch, which "
            "cached text embeddings would freeze; drop --cache_text_embeddings or them"
        )
    check_adapter_args(args)
    if args.reg_data_dir is not None:
        check_data_dir(args.reg_data_dir)
    if args.bucket and args.image_size < 64:
        raise UserError(
            f"--bucket needs --image_size 64 or more (buckets have sides in multiples of 64), got {args.image_size}"
        )
    check_device(args.device, "--device")
    if args.compile_backend != "inductor" and not args.compile:
        raise UserError("--compile_backend chooses the backend of --compile; add --compile")
    check_model(args.pretrained_model, "--pretrained_model")
    check_folder(args.vae, "--vae")
    if args.validation_prompts is not None:
        read_prompt_file(args.validation_prompts)
    check_file(args.resume, "--resume")
    check_output_dir(args.output_dir, "--output_dir")
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir, "--cache_dir")


def check_adapter_args(args: argparse.Namespace) -> None:
    """The adapter flags: each needs --use_lora, and their values fit together."""
    check_numbers(args, {"conv_rank": AT_LEAST_0, "conv_alpha": POSITIVE})
    adapter_flags = {
        "--use_dora": args.use_dora,
        "--conv_rank": args.conv_rank,
        "--block_dims": args.block_dims,
        "--train_text_encoder": args.train_text_encoder,
        "--fp8_base": args.fp8_base,
    }
    for name, value in adapter_flags.items():
        if value and not args.use_lora:
            raise UserError(f"{name} is an adapter option; add --use_lora")
    if args.train_text_encoder and args.cache_text_embeddings:
        raise UserError(
            "--train_text_encoder changes the text embeddings as it trains, so they cannot be "
            "cached; drop --cache_text_embeddings"
        )
    if args.text_encoder_lr is not None and not args.train_text_encoder:
        raise UserError("--text_encoder_lr needs --train_text_encoder")
    if args.text_encoder_lr is not None and not (
        1 <= len(args.text_encoder_lr) <= 2 and all(lr > 0 for lr in args.text_encoder_lr)
    ):
        raise UserError(
            "--text_encoder_lr takes one positive learning rate for both text encoders, or two "
            f"(CLIP-L, then bigG), got {args.text_encoder_lr}"
        )
    for name, values in (("--block_dims", args.block_dims), ("--block_alphas", args.block_alphas)):
        if values is not None and (len(values) != BLOCKS or min(values) < 0):
            raise UserError(
                f"{name} takes {BLOCKS} comma-separated values of 0 or more (kohya's SDXL blocks: "
                f"embeddings, input_blocks 0-8, middle_block 0-2, output_blocks 0-8, out), "
                f"got {len(values)}"
            )
    if args.block_alphas is not None and args.block_dims is None:
        raise UserError("--block_alphas needs --block_dims")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a flag is spelled out, on the command line as in a --config file
    )
    p.add_argument(
        "--config",
        default=None,
        help="a TOML file of these flags (keys without the dashes: lora_rank = 8); the command "
        "line overrides it, and config.json records where each value came from",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data_dir",
        required=True,
        help="folder of name.jpg|jpeg|png|webp + name.txt pairs, or of WebDataset .tar shards",
    )
    g.add_argument(
        "--image_size",
        type=int,
        default=1024,
        help="training resolution (square crops); 512 fits under 12 GB",
    )
    g.add_argument(
        "--center_crop", action="store_true", help="crop the center instead of a random position"
    )
    g.add_argument("--random_flip", action="store_true", help="flip half the images horizontally")
    g.add_argument(
        "--caption_dropout",
        type=float,
        default=0.0,
        help="probability of training on the empty prompt (helps classifier-free guidance)",
    )
    g.add_argument(
        "--validation_split",
        type=float,
        default=0.0,
        help="fraction of the data held out for a validation loss",
    )
    g.add_argument(
        "--validation_steps",
        type=int,
        default=0,
        help="every N steps: the validation loss and the validation images (0: off)",
    )
    g.add_argument(
        "--validation_prompts",
        default=None,
        help="a text file of prompts (one a line) rendered every --validation_steps",
    )
    g.add_argument(
        "--validation_sampling_steps",
        type=int,
        default=20,
        help="sampling steps for validation images",
    )
    g.add_argument(
        "--max_token_length",
        type=int,
        default=75,
        choices=[75, 150, 225],
        help="caption tokens the text encoders see, in chunks of 75 (as kohya's); longer captions "
        "are truncated with a warning",
    )
    g.add_argument(
        "--bucket",
        action="store_true",
        help="aspect-ratio buckets of about image_size^2 pixels (sides in multiples of 64) instead of square crops",
    )
    g.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode every image with the VAE once, before training (crops and flips then fixed per image)",
    )
    g.add_argument(
        "--cache_text_embeddings",
        action="store_true",
        help="encode every caption once, before training",
    )
    g.add_argument(
        "--cache_dir",
        type=Path,
        default=None,
        help="where cached latents / embeddings go (default: ~/.cache/sdxl-lora/cache)",
    )
    g.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument(
        "--caption_extension", default=".txt", help="the caption files' extension (.txt, .caption)"
    )
    g.add_argument(
        "--shuffle_caption",
        action="store_true",
        help="shuffle each caption's comma-separated tags (per sample, reproducibly)",
    )
    g.add_argument(
        "--keep_tokens",
        type=int,
        default=0,
        help="with --shuffle_caption / --caption_tag_dropout_rate: the first N tags stay in place",
    )
    g.add_argument(
        "--caption_separator", default=",", help="what separates a caption's tags (default ,)"
    )
    g.add_argument(
        "--caption_tag_dropout_rate",
        type=float,
        default=0.0,
        help="drop each tag (after --keep_tokens) with this probability",
    )
    g.add_argument(
        "--masked_loss",
        action="store_true",
        help="weight the loss per pixel by the image's alpha channel, or by name.mask.png beside it",
    )
    g.add_argument(
        "--reg_data_dir",
        default=None,
        help="regularisation (prior-preservation) images, as --data_dir; each step pairs them "
        "with the training images (DreamBooth)",
    )
    g.add_argument(
        "--prior_loss_weight",
        type=float,
        default=1.0,
        help="weight of the regularisation images' loss",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model",
        default=DEFAULT_MODEL,
        help="an SDXL base model: a diffusers-layout folder, a single .safetensors file (the SGM "
        "layout of Civitai fine-tunes), a Hugging Face Hub id, or 'tiny' (a small random SDXL)",
    )
    g.add_argument(
        "--vae", type=Path, default=None, help="another VAE folder (e.g. the fp16-fix VAE)"
    )
    g.add_argument(
        "--vae_tile_size",
        type=int,
        default=VAE_TILE_SIZE,
        help="encode and decode images larger than this (px) in overlapping tiles of this size, "
        "to bound the VAE's memory (0: never tile)",
    )
    g.add_argument(
        "--prediction_type",
        default=None,
        choices=["epsilon", "v_prediction"],
        help="what the UNet predicts (default: the model's scheduler config; v_prediction for "
        "NoobAI-XL style v-pred fine-tunes)",
    )
    g.add_argument(
        "--zero_terminal_snr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rescale the noise schedule to zero SNR at the last timestep (Lin et al. 2023; with "
        "v_prediction); default: the model's scheduler config",
    )
    g.add_argument(
        "--precision",
        default="auto",
        choices=["auto", *PRECISIONS],
        help="UNet precision; auto = bf16 on CUDA, fp32 on the CPU",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute activations in backward (on by default: needed for <12 GB)",
    )
    g.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    g.add_argument(
        "--cuda_graph",
        default="auto",
        choices=CUDA_GRAPH_MODES,
        help="run the UNet step (forward, backward, clipping, optimizer) as replayed CUDA graphs, "
        "one per input shape: auto = on CUDA where the options allow (one line says why not), "
        "off = eager steps",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet's ResNet and transformer blocks (regional compilation: a "
        "minute or two of compiling at the first step of each shape, then fused kernels)",
    )
    g.add_argument(
        "--compile_backend",
        default="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="torch.compile's backend for --compile (kohya's --dynamo_backend): inductor fuses "
        "kernels; aot_eager only traces (a quick check that the model compiles)",
    )
    g = p.add_argument_group("LoRA")
    g.add_argument(
        "--use_lora",
        action="store_true",
        help="train LoRA adapters; without it the whole UNet is fine-tuned",
    )
    g.add_argument("--lora_rank", type=int, default=8, help="adapter rank (4 fits under 12 GB)")
    g.add_argument(
        "--lora_alpha",
        type=float,
        default=32,
        help="adapter scale numerator: the update is scaled by alpha / rank",
    )
    g.add_argument(
        "--lora_target_mode",
        default="attention",
        choices=TARGET_MODES,
        help="which Linear layers get adapters",
    )
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapter input")
    g.add_argument(
        "--use_dora",
        action="store_true",
        help="DoRA adapters (a trained magnitude per output channel, Liu et al. 2024) "
        "instead of plain LoRA",
    )
    g.add_argument(
        "--conv_rank",
        type=int,
        default=0,
        help="also adapt the ResNet blocks and samplers (kohya's conv_dim): this rank on their 3x3 "
        "convolutions, --lora_rank on their 1x1 shortcut and time projection (0: off)",
    )
    g.add_argument(
        "--conv_alpha",
        type=float,
        default=None,
        help="alpha of the 3x3 convolution adapters (kohya's conv_alpha; default --conv_rank)",
    )
    g.add_argument(
        "--block_dims",
        type=comma_separated(int),
        default=None,
        help=f"{BLOCKS} comma-separated ranks, one per kohya SDXL block (embeddings, input_blocks "
        "0-8, middle_block 0-2, output_blocks 0-8, out), in place of --lora_rank; 0 leaves a block "
        "out",
    )
    g.add_argument(
        "--block_alphas",
        type=comma_separated(float),
        default=None,
        help=f"{BLOCKS} comma-separated alphas to go with --block_dims (default: the ranks)",
    )
    g.add_argument(
        "--fp8_base",
        action="store_true",
        help="store the frozen UNet in fp8 (e4m3, a scale per channel), upcast a layer at a time: "
        "half the UNet's memory, at a small cost in fidelity (kohya's --fp8_base)",
    )
    g.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="LoRA on both text encoders too (their attention and MLP layers)",
    )
    g.add_argument(
        "--text_encoder_lr",
        type=float,
        nargs="+",
        default=None,
        help="learning rate of the text encoders' adapters: one for both, or CLIP-L's then "
        "bigG's (default --learning_rate)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--batch_size", type=int, default=1, help="images per step per process")
    g.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="micro-batches per optimizer step",
    )
    g.add_argument("--num_epochs", type=int, default=1, help="passes over the data")
    g.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="optimizer steps in total (overrides --num_epochs)",
    )
    g.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=["constant", "linear", "cosine"],
        help="learning-rate schedule after warm-up",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="min-SNR loss weighting gamma (5 is usual); off by default",
    )
    g.add_argument(
        "--optimizer",
        default="adamw",
        choices=OPTIMIZER_NAMES,
        help="adamw; adamw8bit (bitsandbytes, CUDA); adafactor (relative step); prodigy (use "
        "--learning_rate 1); the last two need uv sync --extra optimizers",
    )
    g.add_argument(
        "--optimizer_args",
        nargs="*",
        default=[],
        help="key=value arguments for the optimizer, e.g. betas=(0.9,0.99) d_coef=1",
    )
    g.add_argument(
        "--loss_type",
        default="l2",
        choices=LOSS_TYPES,
        help="l2; huber or smooth_l1 (pseudo-Huber, robust to outliers; with --huber_c)",
    )
    g.add_argument("--huber_c", type=float, default=0.1, help="the Huber losses' threshold c")
    g.add_argument(
        "--debiased_estimation_loss",
        action="store_true",
        help="weight the loss by 1/sqrt(SNR) (Yu et al. 2024)",
    )
    g.add_argument(
        "--multires_noise_iterations",
        type=int,
        default=0,
        help="levels of multi-resolution noise (6-10 is usual; up to 8 used); off by default",
    )
    g.add_argument(
        "--multires_noise_discount",
        type=float,
        default=0.3,
        help="weight of each coarser level of multi-resolution noise",
    )
    g.add_argument(
        "--ip_noise_gamma",
        type=float,
        default=0.0,
        help="input perturbation: extra noise on the UNet's input only (0.1 is usual)",
    )
    g.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="noise offset strength (0.0357 is what SDXL base used); off by default",
    )
    g.add_argument(
        "--use_ema",
        action="store_true",
        help="keep an exponential moving average of the trained weights",
    )
    g.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay per step")
    g.add_argument(
        "--seed", type=int, default=0, help="seed for data order, crops, noise and timesteps"
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--output_dir",
        default="./outputs",
        help="where checkpoints, config.json and metrics.jsonl go",
    )
    g.add_argument(
        "--save_interval",
        type=int,
        default=0,
        help="save a step checkpoint every N steps (0: at epoch ends only)",
    )
    g.add_argument(
        "--keep_last",
        type=int,
        default=0,
        help="keep only the newest N step checkpoints (0: keep all)",
    )
    g.add_argument(
        "--wandb_project", default=None, help="also log to this Weights & Biases project"
    )
    g.add_argument("--resume", default=None, help="continue from this checkpoint (.pt)")
    g.add_argument(
        "--lora_save_format",
        default="kohya",
        choices=[*LORA_FORMATS, "none"],
        help="the LoRA file written beside each checkpoint: kohya (ComfyUI, AUTOMATIC1111, Forge), "
        "diffusers (load_lora_weights), native, or none",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in --output_dir first (without it such a folder is refused)",
    )
    return p


def resolved_config(
    args: argparse.Namespace, model: Path, precision: str, dist: Distributed, alloc_conf: str
) -> dict:
    """What config.json and every checkpoint record of the run: the flags, with paths made absolute,
    and what was resolved from them. Plain values only, as weights_only loading requires."""
    return {
        **vars(args),
        **{k: str(Path(v).resolve()) for k, v in vars(args).items() if k in PATH_FLAGS and v},
        "base_model": str(model.resolve()),
        "resolved_precision": precision,
        "resolved_device": str(dist.device),
        "processes": dist.world,
        "cuda_alloc_conf": alloc_conf,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line over the --config file, if one is named."""
    return parse_with_config(build_parser(), argv)


if __name__ == "__main__":
    # Read and check the flags before the heavy imports below (torch, transformers and diffusers
    # take about 20 s on a small machine), so that --help and a bad flag answer at once.
    run_cli(check_args, lambda: parse_args(sys.argv[1:]))

import torch
from tqdm import tqdm

from sdxl.files import cache_root, write_json
from sdxl.pretrained import load_sdxl, resolve_model
from training.cache import encoders
from training.checkpoint import (
    claim_output_dir,
    load_checkpoint,
    lora_file_metadata,
    restore_checkpoint,
    save_checkpoints,
)
from training.data_loader import (
    bucket_table,
    datasets,
    fixed_batches,
    optimizer_steps,
    paired_steps,
    split_validation,
    steps_per_epoch,
)
from training.distributed import Distributed, init_distributed
from training.precision_util import resolve_precision
from training.scan import scan
from training.train_loop import (
    TrainingError,
    TrainState,
    build_trainer,
    train_step,
    validate,
    validation_images,
)
from training.train_util import MetricsLog, StopSignals


def main(args: argparse.Namespace) -> Path:
    """Train; returns the path of the last checkpoint written. A run stopped by SIGINT or SIGTERM
    saves a checkpoint, then raises StoppedBySignal (exit code 130 or 143)."""
    check_args(args)  # again, for callers that skip the command line
    alloc_conf = default_allocator()  # before CUDA starts
    # -- set-up, in the order that fails fastest on bad input: data, processes, model, outputs --
    cache_dir = Path(args.cache_dir) if args.cache_dir else cache_root() / "cache"
    records, reg_records = (
        scan(folder, cache_dir / "scan", caption_extension=args.caption_extension) if folder else []
        for folder in (args.data_dir, args.reg_data_dir)
    )
    dist = init_distributed(args.device)
    train_records, val_records = split_validation(records, args.validation_split, args.seed)
    data, val_data, reg_data = datasets(args, train_records, val_records, reg_records)
    if args.bucket and dist.main:
        print(bucket_table(data.targets))
    accum = args.gradient_accumulation_steps
    epoch_steps = steps_per_epoch(data, args.batch_size, dist.world, accum)
    max_steps = args.max_train_steps or args.num_epochs * epoch_steps
    prompts = read_prompt_file(args.validation_prompts) if args.validation_prompts else []
    resume = load_checkpoint(args.resume) if args.resume else None
    precision = resolve_precision(args.precision, dist.device, full_finetune=not args.use_lora)
    model_folder = resolve_model(args.pretrained_model, half=precision.unet_dtype != torch.float32)
    output_dir = Path(args.output_dir)
    # One run per folder: a folder that holds another run is refused (see --overwrite).
    lock = claim_output_dir(output_dir, args.resume, args.overwrite) if dist.main else None
    config = resolved_config(args, model_folder, precision.name, dist, alloc_conf)
    if dist.main:
        write_json(config, output_dir / "config.json")

    # -- models, encoders (or caches), optimizer, and a resumed run's state ----------------------
    torch.manual_seed(args.seed)
    schedule = (args.prediction_type, args.zero_terminal_snr)  # None: as the model's config says
    # Text encoders that train are stored as the UNet is (bf16 on CUDA); frozen ones in fp16.
    text_dtype = precision.unet_dtype if args.train_text_encoder else precision.text_dtype
    # Loaded into CPU memory; on the device is only what each phase needs. The caches are built
    # before the UNet arrives (encoding full-size images in fp32 is the VAE's peak), and an encoder
    # that a cache replaces leaves the device before it does (validation images borrow it back).
    parts = load_sdxl(
        model_folder,
        precision.unet_dtype,
        "cpu",
        text_dtype,
        args.vae,
        *schedule,
        args.vae_tile_size,
    )
    share = lora_file_metadata(config, records, parts.schedule) if args.use_lora else {}
    cached = (args.cache_latents, args.cache_text_embeddings)
    chunks = args.max_token_length // 75  # captions are encoded in chunks of 75 tokens
    parts.vae.to(dist.device)
    parts.text_encoder.to(dist.device)
    (data, val_data, reg_data), encode_images, encode_text = encoders(
        parts, [data, val_data, reg_data], *cached, cache_dir, dist, chunks
    )
    parts.vae.to("cpu" if args.cache_latents else dist.device)
    parts.text_encoder.to("cpu" if args.cache_text_embeddings else dist.device)
    parts.unet.to(dist.device)
    tr = build_trainer(args, parts, encode_images, encode_text, precision, dist, max_steps)
    state = TrainState()
    if resume is not None:
        restore_checkpoint(resume, Path(args.resume), tr, state)
    val_batches = fixed_batches(val_data, args.batch_size)
    # Every step's micro-batches, from where the run stands (mid-epoch, for a resumed run), and
    # the regularisation micro-batches paired with them (none without --reg_data_dir).
    steps = optimizer_steps(
        data, args.batch_size, accum, state.epoch, state.position, dist, args.num_workers
    )
    reg_steps = paired_steps(reg_data, args.batch_size, accum, state.step, dist, args.num_workers)

    # -- the loop: one optimizer step an iteration; only the first process writes ----------------
    samples_per_step = args.batch_size * dist.world * accum
    last, stopped = output_dir, 0
    metrics_file = output_dir / "metrics.jsonl" if dist.main else None
    metrics = MetricsLog(metrics_file, args.wandb_project, config, resumed_at=state.step)
    bar = tqdm(total=max_steps, initial=state.step, desc="train", disable=not dist.main)
    with metrics, bar, StopSignals() as stop:
        tick = time.perf_counter()
        for (micro, epoch, position), reg_micro in zip(
            itertools.islice(steps, max_steps - state.step), reg_steps
        ):
            # The step's one device sync: its losses (training, regularisation) and gradient norm.
            train_loss, reg_loss, grad_norm = torch.stack(train_step(tr, micro, reg_micro)).tolist()
            # AdamW's learning rate is a device tensor (training/optimizers.py), filled before that
            # sync: reading it waits for nothing.
            lr = float(tr.lr_scheduler.get_last_lr()[0])
            loss = train_loss + args.prior_loss_weight * reg_loss
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss is {loss}; stopping without saving "
                    "(try a lower --learning_rate, or --precision bf16/fp32)"
                )
            tock, tick = tick, time.perf_counter()
            record = {
                "step": state.step + 1,
                "epoch": state.epoch,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "images_per_s": samples_per_step / (tick - tock),
                **({"train_loss": train_loss, "reg_loss": reg_loss} if reg_data else {}),
            }
            epoch_done = epoch > state.epoch
            state.advance(loss, epoch, position)
            # Every process stops at the same step, whichever of them got the signal.
            if dist.any(stop.received is not None):
                stopped = stop.received or signal.SIGTERM

            final = state.step == max_steps
            interval = bool(args.save_interval) and state.step % args.save_interval == 0
            kinds = ["step"] * (interval or bool(stopped) or (final and not epoch_done))
            kinds += ["epoch"] * epoch_done
            validating = bool(args.validation_steps) and state.step % args.validation_steps == 0
            if dist.main and val_batches and (validating or kinds) and not stopped:
                record["val_loss"] = validate(tr, val_batches)
            if dist.main and prompts and validating:
                path = output_dir / f"validation_step{state.step:06d}.png"
                validation_images(tr, parts, prompts, args, path)
                metrics.log_image("validation", path, state.step)
            metrics.log(record)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
            bar.update(1)
            if dist.main and kinds:  # the lowest-loss checkpoint follows val_loss if there is one
                tracked = None if stopped else record.get("val_loss", state.smoothed_loss)
                last = save_checkpoints(
                    output_dir, kinds, tr, state, config, tracked, args.keep_last, share
                )
            if stopped:
                break
    dist.close()
    if lock is not None:
        lock.release()
        print(f"checkpoints, config.json and metrics.jsonl are in {output_dir.resolve()}")
    if stopped:
        raise StoppedBySignal(
            stopped, f"stopped by a signal at step {state.step}; saved {last}", last
        )
    return last


if __name__ == "__main__":
    run_cli(main, lambda: parse_args(sys.argv[1:]))
