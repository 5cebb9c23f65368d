"""train_sdxl.py's command line: its flags, their checks, and the specs they become. Free of torch,
so that --help and a bad flag answer at once."""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path

from cli.choices import (
    ADAPTER_KINDS,
    BLOCKS,
    COMPILE_BACKENDS,
    CUDA_GRAPH_MODES,
    LOGGERS,
    LORA_FORMATS,
    LOSS_TYPES,
    LR_SCHEDULERS,
    OPTIMIZER_NAMES,
    PRECISIONS,
    PREDICTION_TYPES,
    TARGET_MODES,
    TIMESTEP_SAMPLINGS,
    VAE_TILE_SIZE,
)
from cli.dataset_config import command_line_defaults, read_dataset_config
from cli.options import (
    AT_LEAST_0,
    AT_LEAST_1,
    BELOW_1,
    FRACTION,
    POSITIVE,
    TILE_SIZE,
    Parser,
    add_shared,
    check_device,
    check_file,
    check_folder,
    check_model,
    check_numbers,
    check_output_dir,
    comma_separated,
    lenient_negatives,
    parse_with_config,
)
from sampling.prompts import read_prompt_file
from sdxl.errors import UserError
from sdxl.files import cache_root
from training.scan import check_data_dir
from training.specs import (
    AdapterSpec,
    DatasetSpec,
    DataSpec,
    LossSpec,
    ModelSpec,
    OptimizerSpec,
    StepSpec,
    TrainSpecs,
)

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
    "logging_dir",
    "dataset_config",
)

# The packages an optimizer needs beyond torch and transformers, and how to get them.
OPTIMIZER_PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}
# What kohya users put in --optimizer_args that this project also has as a flag: the value given
# there wins (as in kohya), and this says which flag it replaces.
BUILT_IN_ARGS = {"weight_decay": "--adam_weight_decay", "eps": "--adam_epsilon"}


def parse_args(argv: list[str], description: str = "") -> argparse.Namespace:
    """The command line over the --config file, if one is named."""
    return parse_with_config(build_parser(description), argv)


def check_args(args: argparse.Namespace) -> None:
    """Every flag, checked before anything heavy is imported, any model is loaded or any file is
    written: one line for the first problem."""
    if args.dataset_config is not None:
        for flag in ("data_dir", "reg_data_dir"):
            if getattr(args, flag) is not None:
                raise UserError(f"--dataset_config names the data (its subsets' image_dir and "
                                f"is_reg); drop --{flag}")  # fmt: skip
        for note in dataset_config(args)[1]:
            print(note)
    elif args.data_dir is None:
        if not args.estimate_memory:
            raise UserError(
                "--data_dir FOLDER is required (a folder of image + .txt pairs or shards), or "
                "--dataset_config FILE.toml (kohya's)"
            )
    elif not args.estimate_memory or Path(args.data_dir).is_dir():
        check_data_dir(args.data_dir)
    check_numbers(
        args,
        {
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
            "max_grad_norm": AT_LEAST_0,
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
            "logit_std": POSITIVE,
            "gradient_checkpointing_interval": AT_LEAST_1,
        },
    )
    check_timesteps(args.min_timestep, args.max_timestep)
    if args.gradient_checkpointing_interval > 1 and not args.gradient_checkpointing:
        raise UserError(
            "--gradient_checkpointing_interval chooses which blocks are checkpointed; drop "
            "--no-gradient_checkpointing"
        )
    check_caption_args(args)
    check_adapter_args(args)
    check_full_args(args)
    check_trackers(args)
    optimizer_args(args.optimizer, args.optimizer_args, not args.estimate_memory)
    if args.reg_data_dir is not None:
        check_data_dir(args.reg_data_dir)
    if args.bucket and min(args.image_size) < 64:
        raise UserError(
            f"--bucket needs --image_size 64 or more (buckets have sides in multiples of 64), "
            f"got {args.image_size[0]}x{args.image_size[1]}"
        )
    check_device(args.device, "--device")
    if args.compile_backend != "inductor" and not args.compile:
        raise UserError("--compile_backend chooses the backend of --compile; add --compile")
    if not args.estimate_memory:  # (the preflight reads the configs, shipped ones if need be)
        check_model(args.pretrained_model, "--pretrained_model")
    check_folder(args.vae, "--vae")
    if args.validation_prompts is not None:
        read_prompt_file(args.validation_prompts)
    check_file(args.resume, "--resume")
    check_output_dir(args.output_dir, "--output_dir")
    check_numbers(args, {"ddp_timeout": POSITIVE, "num_processes": AT_LEAST_1})
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir, "--cache_dir")


def check_timesteps(low: int, high: int | None) -> None:
    """kohya's range: t is drawn from low .. high-1, within SDXL's 1000 timesteps."""
    top = 1000 if high is None else high
    if not 0 <= low < top <= 1000:
        raise UserError(
            f"--min_timestep {low} and --max_timestep {top} leave no timestep: t is drawn from "
            "min .. max-1, with 0 <= min < max <= 1000 (kohya's meaning)"
        )


def dataset_config(args: argparse.Namespace) -> tuple[tuple[DatasetSpec, ...], list[str]]:
    """--dataset_config's datasets (the flags of the same meaning as their defaults), and a line
    for each key this project lacks; checked against the caches as the flags are."""
    datasets, notes = read_dataset_config(args.dataset_config, command_line_defaults(args))
    for i, dataset in enumerate(datasets):
        if dataset.bucket and min(dataset.size) < 64:
            raise UserError(f"--dataset_config: datasets[{i}] has enable_bucket with a side "
                            "under 64 (buckets have sides in multiples of 64)")  # fmt: skip
        changing = any(s.shuffle_caption or s.caption_tag_dropout_rate for s in dataset.subsets)
        if changing and args.cache_text_embeddings:
            raise UserError(f"--dataset_config: datasets[{i}] shuffles or drops tags, which "
                            "cached text embeddings would freeze; drop --cache_text_embeddings")  # fmt: skip
    return datasets, notes


def trackers(args: argparse.Namespace) -> tuple[str | None, Path | None]:
    """Where the run logs besides metrics.jsonl: (the W&B project or None, TensorBoard's folder or
    None), from --log_with, --wandb_project and --logging_dir as kohya reads them."""
    chosen = args.log_with
    if chosen is None:  # no --log_with: the folder or project given says which
        chosen = {(True, True): "all", (True, False): "wandb", (False, True): "tensorboard"}.get(
            (args.wandb_project is not None, args.logging_dir is not None)
        )
    wandb_project = None
    if chosen in ("wandb", "all"):
        wandb_project = args.wandb_project or "train_sdxl"
    tensorboard_dir = None
    if chosen in ("tensorboard", "all"):
        output_dir = Path(args.output_dir)
        folder = Path(args.logging_dir) / output_dir.resolve().name if args.logging_dir else None
        tensorboard_dir = folder or output_dir / "tensorboard"
    return wandb_project, tensorboard_dir


def check_trackers(args: argparse.Namespace) -> None:
    """--log_with, --wandb_project and --logging_dir agree, and the trackers are installed."""
    if args.log_with == "tensorboard" and args.wandb_project is not None:
        raise UserError("--wandb_project logs to W&B, which --log_with tensorboard leaves out; "
                        "use --log_with all")  # fmt: skip
    if args.log_with == "wandb" and args.logging_dir is not None:
        raise UserError("--logging_dir is TensorBoard's, which --log_with wandb leaves out; "
                        "use --log_with all")  # fmt: skip
    wandb_project, tensorboard_dir = trackers(args)
    if tensorboard_dir is not None and importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            "TensorBoard logging needs the tensorboard package: uv sync --extra tensorboard"
        )
    if args.logging_dir is not None:
        check_output_dir(args.logging_dir, "--logging_dir")


def check_caption_args(args: argparse.Namespace) -> None:
    """kohya's caption options: they fit together and with the caches."""
    tags = args.shuffle_caption or args.caption_tag_dropout_rate or args.keep_tokens
    if tags and args.caption_separator == "":
        raise UserError(
            "--caption_separator is empty; tags need a separator to split at (kohya's is ,)"
        )
    if (args.shuffle_caption or args.caption_tag_dropout_rate) and args.cache_text_embeddings:
        raise UserError(
            "--shuffle_caption and --caption_tag_dropout_rate change captions every epoch, which "
            "cached text embeddings would freeze; drop --cache_text_embeddings or them"
        )


def adapter_kind(args: argparse.Namespace) -> str:
    """--adapter, with --use_dora as the older spelling of --adapter dora."""
    return args.adapter or ("dora" if args.use_dora else "lora")


def check_full_args(args: argparse.Namespace) -> None:
    """The full fine-tuning flags: each refused with --use_lora, and what the fused backward pass
    cannot do, each in one line that says why."""
    if args.use_lora and args.save_model_as is not None:
        raise UserError("--save_model_as is for full fine-tuning; a LoRA's file format is "
                        "--lora_save_format")  # fmt: skip
    check_fsdp_args(args)
    for name in ("full_bf16", "fused_backward_pass"):
        if getattr(args, name) and args.use_lora:
            raise UserError(f"--{name} is for full fine-tuning (a LoRA's weights are few and "
                            "fp32); drop --use_lora or it")  # fmt: skip
    if args.full_bf16 and args.precision not in ("bf16", "auto"):
        raise UserError(
            f"--full_bf16 trains in bf16; it cannot go with --precision {args.precision}"
        )
    if not args.fused_backward_pass:
        return
    if args.optimizer not in ("adamw", "adamw8bit", "adafactor"):
        raise UserError(f"--fused_backward_pass steps adamw, adamw8bit or adafactor; --optimizer "
                        f"{args.optimizer} keeps state across parameters")  # fmt: skip
    if args.gradient_accumulation_steps > 1:
        raise UserError("--fused_backward_pass steps and frees each gradient during the backward "
                        "pass, so gradients cannot accumulate; drop --gradient_accumulation_steps")  # fmt: skip
    if args.max_grad_norm:
        raise UserError("--fused_backward_pass steps each parameter before the others' gradients "
                        "exist, so the global norm clipping needs is never known; drop "
                        "--max_grad_norm")  # fmt: skip


def check_fsdp_args(args: argparse.Namespace) -> None:
    """What --fsdp does not go with, each in one line that says why."""
    if args.num_processes is not None and not args.estimate_memory:
        raise UserError("--num_processes sets the processes --estimate_memory predicts for; "
                        "a run's processes are torchrun's --nproc_per_node")  # fmt: skip
    if not args.fsdp:
        return
    if args.use_lora:
        raise UserError("--fsdp shards a full fine-tune's weights; a LoRA's are few, and torchrun "
                        "without --fsdp trains it data-parallel (DDP)")  # fmt: skip
    for name in ("full_bf16", "fused_backward_pass", "compile"):
        if getattr(args, name):
            raise UserError(f"--fsdp keeps fp32 master weights sharded and steps them with "
                            f"AdamW after the backward pass; drop --{name} or --fsdp")  # fmt: skip
    if args.optimizer != "adamw":
        raise UserError(f"--fsdp steps torch's AdamW on the sharded weights; --optimizer "
                        f"{args.optimizer} does not take sharded tensors here")  # fmt: skip


def check_adapter_args(args: argparse.Namespace) -> None:
    """The adapter flags: each needs --use_lora, and their values fit together."""
    check_numbers(args, {"conv_rank": AT_LEAST_0, "conv_alpha": POSITIVE})
    adapter_flags = {
        "--adapter": args.adapter,
        "--use_dora": args.use_dora,
        "--conv_rank": args.conv_rank,
        "--block_dims": args.block_dims,
        "--train_text_encoder": args.train_text_encoder,
        "--fp8_base": args.fp8_base,
    }
    for name, value in adapter_flags.items():
        if value and not args.use_lora:
            raise UserError(f"{name} is an adapter option; add --use_lora")
    if args.use_dora and args.adapter not in (None, "dora"):
        raise UserError(f"--use_dora is --adapter dora; it cannot go with --adapter {args.adapter}")
    if adapter_kind(args) in ("loha", "lokr") and args.lora_dropout:
        raise UserError(
            f"--adapter {args.adapter} has no dropout (LyCORIS's has none); drop --lora_dropout"
        )
    if args.lokr_factor != -1 and adapter_kind(args) != "lokr":
        raise UserError("--lokr_factor is LoKr's; add --adapter lokr")
    if args.lokr_factor == 0 or args.lokr_factor < -1:
        raise UserError(
            f"--lokr_factor must be -1 (the most even split) or at least 1, got {args.lokr_factor}"
        )
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
    blocks = "kohya's SDXL blocks: embeddings, input_blocks 0-8, middle_block 0-2, output_blocks 0-8, out"  # fmt: skip
    for name, values in (("--block_dims", args.block_dims), ("--block_alphas", args.block_alphas)):
        if values is not None and len(values) != BLOCKS:
            raise UserError(
                f"{name} takes {BLOCKS} comma-separated values ({blocks}), got {len(values)}"
            )
        if values is not None and min(values) < 0:
            raise UserError(f"{name} values must be 0 or more, got {min(values)}")
    if args.block_dims is not None and not any(args.block_dims) and not args.conv_rank:
        raise UserError(
            "--block_dims are all 0, which adapts no layer; give some block a rank (or --conv_rank)"
        )
    if args.block_alphas is not None and args.block_dims is None:
        raise UserError("--block_alphas needs --block_dims")


def optimizer_args(optimizer: str, pairs: list[str], installed: bool = True) -> dict[str, object]:
    """`--optimizer_args key=value ...` as keyword arguments (values read as Python literals: 0.9,
    True, (0.9, 0.99); a bare word is a string), and (`installed`) the optimizer's package
    installed: checked before the heavy imports. Keys the optimizer does not take are found when it
    is built, before the model loads (training/optimizers.py)."""
    package = OPTIMIZER_PACKAGES.get(optimizer)
    if installed and package is not None and importlib.util.find_spec(package) is None:
        raise UserError(f"--optimizer {optimizer} needs {package}: uv sync --extra optimizers")
    kwargs: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--optimizer_args {pair!r} is not key=value (e.g. betas=(0.9,0.99))")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if not text.isidentifier():  # meant as a number, tuple or list, but not one
                raise UserError(
                    f"--optimizer_args {pair!r}: {text!r} is not a Python value (a number, "
                    "True/False, or a tuple such as (0.9,0.99); quote the whole pair in the shell)"
                ) from None
            kwargs[key] = text
    if optimizer == "adafactor" and "eps" in kwargs:  # a pair in transformers' Adafactor
        kwargs["eps"] = tuple(kwargs["eps"]) if isinstance(kwargs["eps"], list) else kwargs["eps"]
    return kwargs


def training_specs(args: argparse.Namespace) -> TrainSpecs:
    """The flags, once, as the records the library takes (training/specs.py)."""
    data = DataSpec(
        data_dir=Path(args.data_dir or "."),
        reg_data_dir=Path(args.reg_data_dir) if args.reg_data_dir else None,
        size=tuple(args.image_size),
        bucket=args.bucket,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        caption_dropout=args.caption_dropout,
        caption_extension=args.caption_extension,
        shuffle_caption=args.shuffle_caption,
        keep_tokens=args.keep_tokens,
        caption_separator=args.caption_separator,
        caption_tag_dropout_rate=args.caption_tag_dropout_rate,
        masked_loss=args.masked_loss,
        validation_split=args.validation_split,
        max_token_length=args.max_token_length,
        cache_latents=args.cache_latents,
        cache_text_embeddings=args.cache_text_embeddings,
        cache_dir=Path(args.cache_dir) if args.cache_dir else cache_root() / "cache",
        num_workers=args.num_workers,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=args.seed,
        datasets=dataset_config(args)[0] if args.dataset_config else (),
    )
    model = ModelSpec(
        pretrained_model=args.pretrained_model,
        vae=args.vae,
        vae_tile_size=args.vae_tile_size,
        prediction_type=args.prediction_type,
        zero_terminal_snr=args.zero_terminal_snr,
    )
    adapter = None
    if args.use_lora:
        adapter = AdapterSpec(
            kind=adapter_kind(args),
            lokr_factor=args.lokr_factor,
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            target_mode=args.lora_target_mode,
            dropout=args.lora_dropout,
            conv_rank=args.conv_rank,
            conv_alpha=args.conv_alpha,
            block_dims=tuple(args.block_dims) if args.block_dims else None,
            block_alphas=tuple(args.block_alphas) if args.block_alphas else None,
            train_text_encoder=args.train_text_encoder,
        )
    loss = LossSpec(
        loss_type=args.loss_type,
        huber_c=args.huber_c,
        snr_gamma=args.snr_gamma,
        debiased=args.debiased_estimation_loss,
        noise_offset=args.noise_offset,
        multires_iterations=args.multires_noise_iterations,
        multires_discount=args.multires_noise_discount,
        ip_noise_gamma=args.ip_noise_gamma,
        prior_loss_weight=args.prior_loss_weight,
        min_timestep=args.min_timestep,
        max_timestep=args.max_timestep,
        timestep_sampling=args.timestep_sampling,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
    )
    optimizer = OptimizerSpec(
        name=args.optimizer,
        learning_rate=args.learning_rate,
        text_encoder_lr=tuple(args.text_encoder_lr) if args.text_encoder_lr else None,
        eps=args.adam_epsilon,
        weight_decay=args.adam_weight_decay,
        extra=optimizer_args(args.optimizer, args.optimizer_args, not args.estimate_memory),
        lr_scheduler=args.lr_scheduler,
        warmup_steps=args.lr_warmup_steps,
        max_grad_norm=(1.0 if args.max_grad_norm is None and not args.fused_backward_pass
                       else args.max_grad_norm or 0.0),
        ema_decay=args.ema_decay if args.use_ema else None,
        fused_backward_pass=args.fused_backward_pass,
    )  # fmt: skip
    step = StepSpec(
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_interval=args.gradient_checkpointing_interval,
        fp8_base=args.fp8_base,
        cuda_graph=args.cuda_graph,
        compile=args.compile,
        compile_backend=args.compile_backend,
        seed=args.seed,
        full_bf16=args.full_bf16,
        fsdp=args.fsdp,
    )
    return TrainSpecs(data, model, adapter, loss, optimizer, step)


def resolved_config(
    args: argparse.Namespace, model: Path, precision: str, prediction_type: str
) -> dict:
    """What config.json and every checkpoint record of the run: the flags, with paths made absolute,
    and what was resolved from them. Plain values only, as weights_only loading requires."""
    values = vars(args)
    return {
        **values,
        **{k: str(Path(v).resolve()) for k, v in values.items() if k in PATH_FLAGS and v},
        "image_size": list(args.image_size),
        "base_model": str(model.resolve()),
        "resolved_precision": precision,
        "resolved_prediction_type": prediction_type,
    }


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = Parser(
        description=description,
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
        default=None,
        help="folder of name.jpg|jpeg|png|webp + name.txt pairs, or of WebDataset .tar shards",
    )
    g.add_argument(
        "--dataset_config",
        default=None,
        help="kohya's dataset config (TOML or JSON): several datasets, each with its own "
        "resolution, buckets and batch size, of subsets with their own folders, repeats and "
        "caption options; replaces --data_dir and --reg_data_dir (the data flags are its defaults)",
    )
    add_shared(
        g,
        "image_size",
        False,
        help="training resolution: 1024, or WIDTHxHEIGHT (kohya's W,H); "
        "512 fits under 12 GB; with --bucket, the area the buckets keep",
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
    add_shared(g, "pretrained_model", False)
    add_shared(g, "vae", False)
    add_shared(g, "vae_tile_size", False, default=VAE_TILE_SIZE)
    add_shared(g, "prediction_type", False, choices=PREDICTION_TYPES)
    add_shared(g, "zero_terminal_snr", False)
    add_shared(g, "precision", False, choices=["auto", *PRECISIONS])
    g.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute activations in backward (on by default: needed for <12 GB)",
    )
    g.add_argument(
        "--gradient_checkpointing_interval",
        type=int,
        default=1,
        help="recompute only every N-th UNet block (SimpleTuner's): faster, more memory; "
        "--estimate_memory shows what each N costs",
    )
    add_shared(g, "device", False)
    add_shared(
        g,
        "cuda_graph",
        False,
        choices=CUDA_GRAPH_MODES,
        help="run the UNet step (forward, backward, clipping, optimizer) as replayed CUDA graphs, "
        "one per input shape: auto = on CUDA where the options allow (one line says why not), "
        "off = eager steps",
    )
    add_shared(g, "compile", False)
    g.add_argument(
        "--compile_backend",
        default="inductor",
        choices=COMPILE_BACKENDS,
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
        "--adapter",
        default=None,
        choices=ADAPTER_KINDS,
        help="the adapter kind: lora (default), dora (a trained magnitude per output channel, Liu "
        "et al. 2024), loha (LyCORIS: Hadamard product of two low-rank products), lokr "
        "(LyCORIS: Kronecker product of a small matrix and a low-rank one)",
    )
    g.add_argument(
        "--use_dora",
        action="store_true",
        help="the same as --adapter dora",
    )
    g.add_argument(
        "--lokr_factor",
        type=int,
        default=-1,
        help="LoKr: split each side of a weight as factor x rest (-1: as evenly as possible, "
        "LyCORIS's default); a larger factor makes the Kronecker factor w1 larger",
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
    add_shared(g, "fp8_base", False)
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
    add_shared(g, "batch_size", False, help="images per step per process")
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
        choices=LR_SCHEDULERS,
        help="learning-rate schedule after warm-up",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="linear warm-up steps")
    g.add_argument(
        "--max_grad_norm",
        type=float,
        default=None,
        help="gradient clipping norm (default 1; 0: no clipping, the default with "
        "--fused_backward_pass)",
    )
    g.add_argument(
        "--full_bf16",
        action="store_true",
        help="full fine-tuning with the UNet's weights in bf16 (no fp32 copy), each update "
        "computed in fp32 and rounded back stochastically, so that small updates are kept on "
        "average",
    )
    g.add_argument(
        "--fused_backward_pass",
        action="store_true",
        help="full fine-tuning: each parameter's optimizer step runs as soon as its gradient is "
        "complete, and the gradient is freed (no full set of gradients ever exists); adamw, "
        "adamw8bit or adafactor, one process, no accumulation, no clipping",
    )
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="full fine-tuning under torchrun with the UNet's fp32 weights, gradients and AdamW "
        "state sharded over the processes (PyTorch's FSDP2; bf16 compute on GPUs); checkpoints "
        "are saved sharded and resume with any number of processes",
    )
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
        help="key=value arguments for the optimizer, e.g. betas=(0.9,0.99) d_coef=1; they win "
        "over --adam_epsilon and --adam_weight_decay (weight_decay=0.01 as kohya's)",
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
        "--min_timestep",
        type=int,
        default=0,
        help="train on timesteps from this one (kohya's; with --max_timestep: t in min .. max-1); "
        "high values train composition and style, low ones detail",
    )
    g.add_argument(
        "--max_timestep",
        type=int,
        default=None,
        help="train on timesteps below this one (kohya's; default: all, 1000)",
    )
    g.add_argument(
        "--timestep_sampling",
        default="uniform",
        choices=TIMESTEP_SAMPLINGS,
        help="uniform; or logit_normal, which favours the middle of the range (SD3's)",
    )
    g.add_argument(
        "--logit_mean", type=float, default=0.0, help="mean of logit_normal timestep sampling"
    )
    g.add_argument(
        "--logit_std", type=float, default=1.0, help="spread of logit_normal timestep sampling"
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
    add_shared(g, "seed", False, help="seed for data order, crops, noise and timesteps")
    g = p.add_argument_group("output")
    g.add_argument(
        "--save_model_as",
        default=None,
        choices=["sgm", "diffusers"],
        help="full fine-tuning: beside each checkpoint, the model as one SGM single file (UNet, "
        "text encoders, VAE: what ComfyUI, AUTOMATIC1111 and Forge open; default), or the UNet "
        "alone in diffusers' names",
    )
    add_shared(
        g,
        "output_dir",
        False,
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
        "--log_with",
        default=None,
        choices=LOGGERS,
        help="also log to TensorBoard, W&B or both (kohya's; metrics.jsonl is always written); "
        "default: W&B with --wandb_project, TensorBoard with --logging_dir",
    )
    g.add_argument(
        "--logging_dir",
        default=None,
        help="TensorBoard's folder: the run logs to LOGGING_DIR/<name of --output_dir>, so that "
        "tensorboard --logdir LOGGING_DIR shows several runs (default: OUTPUT_DIR/tensorboard)",
    )
    g.add_argument(
        "--wandb_project",
        default=None,
        help="the Weights & Biases project to log to (default with --log_with wandb: train_sdxl)",
    )
    g.add_argument("--resume", default=None, help="continue from this checkpoint (.pt)")
    g.add_argument(
        "--estimate_memory",
        action="store_true",
        help="print the run's predicted GPU memory (max_memory_reserved) phase by phase and exit: "
        "on any machine, in seconds, without weights or a GPU (with the data folder if it is "
        "there, for its largest bucket)",
    )
    g.add_argument(
        "--num_processes",
        type=int,
        default=None,
        help="with --estimate_memory: the torchrun processes to predict for (--fsdp shards over "
        "them; default: 1)",
    )
    g.add_argument(
        "--ddp_timeout",
        type=float,
        default=240,
        help="minutes a torchrun process waits for the others (while the first builds the "
        "caches or renders validation images) before giving up (kohya's --ddp_timeout)",
    )
    g.add_argument(
        "--lora_save_format",
        default="kohya",
        choices=[*LORA_FORMATS, "none"],
        help="the LoRA file written beside each checkpoint: kohya (ComfyUI, AUTOMATIC1111, Forge), "
        "diffusers (load_lora_weights), native, or none",
    )
    add_shared(
        g,
        "overwrite",
        False,
        help="delete the run already in --output_dir first (without it such a folder is refused)",
    )
    return lenient_negatives(p)
