"""What the scripts' flags choose from, and the checks of their values, free of torch.

The scripts parse and check every flag before their heavy imports (torch, transformers and diffusers
take about 20 s to import on a small machine), so that `--help` and a bad flag answer at once. The
names below are defined here for that reason; each is used by the module named beside it, and a
test checks that the two agree.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

from sdxl.errors import UserError

DEFAULT_MODEL = "./weights/sdxl-base-1.0"
DOWNLOAD_HINT = (
    "get the weights with: uv run hf download stabilityai/stable-diffusion-xl-base-1.0 "
    "--local-dir weights/sdxl-base-1.0"
)
PRECISIONS = ("bf16", "fp16", "fp32")  # training/precision_util.py: DTYPES
TARGET_MODES = ("attention", "attention_out", "all")  # sdxl/lora.py
BLOCKS = 23  # kohya's SDXL blocks, as --block_dims counts them: sdxl/lora.py block_index
LORA_FORMATS = ("native", "diffusers", "kohya")  # sdxl/lora_formats.py
SAMPLER_NAMES = ("euler", "ddim", "ddpm")  # sampling/samplers.py: SAMPLERS
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "adafactor", "prodigy")  # training/optimizers.py
LOSS_TYPES = ("l2", "huber", "smooth_l1")  # training/train_loop.py: elementwise_loss
CUDA_GRAPH_MODES = ("auto", "off")  # sdxl/capture.py; auto: on CUDA, where the options allow

# A rule for a number: the test and how to say what it must be.
Rule = tuple[Callable[[float], bool], str]
AT_LEAST_1: Rule = (lambda v: v >= 1, "at least 1")
AT_LEAST_0: Rule = (lambda v: v >= 0, "0 or more")
POSITIVE: Rule = (lambda v: v > 0, "positive")
FRACTION: Rule = (lambda v: 0 <= v <= 1, "between 0 and 1")
BELOW_1: Rule = (lambda v: 0 <= v < 1, "at least 0 and below 1")
MULTIPLE_OF_8: Rule = (lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8 (the VAE's)")
TILE_SIZE: Rule = (lambda v: v == 0 or (v >= 128 and v % 64 == 0), "0 or a multiple of 64 from 128")
# Tiles of the VAE, in pixels: above this an image is encoded or decoded in overlapping tiles
# (sdxl/vae.py). 512 keeps a 1024 px image's VAE activations to about a quarter.
VAE_TILE_SIZE = 512


def flag(dest: str, hyphens: bool) -> str:
    """The flag's spelling: `--batch_size` for training, `--batch-size` for generation."""
    return "--" + (dest.replace("_", "-") if hyphens else dest)


def check_numbers(args: argparse.Namespace, rules: dict[str, Rule], hyphens: bool = False) -> None:
    """One line for the first flag whose value breaks its rule (or is not a finite number).
    Flags left unset (None) are not checked."""
    for dest, (ok, what) in rules.items():
        value = getattr(args, dest)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise UserError(f"{flag(dest, hyphens)} must be {what}, got {value}")


def check_output_dir(path: str | Path, name: str) -> None:
    """A folder the run can create or write into: not a file, and not under one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{name} {path} is a file, not a folder; give a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{name} {path} is inside {parent}, which is a file; give a folder")


def comma_separated(kind: type) -> Callable[[str], list]:
    """An argparse type: "1,2,3" -> [1, 2, 3] (kohya's block_dims style)."""

    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__} values"
            ) from None

    return parse


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command line, over the flags of a TOML file if it names one (`--config FILE.toml`, keys
    spelled as the flags without their dashes, as kohya's config files are): the command line wins.
    The file's values go through the parser like typed flags, so they are checked the same way.
    `sources` records where each value came from: "command line", "config file" or "default"."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    given = {
        parser._option_string_actions[t.split("=")[0]].dest
        for t in argv
        if t.startswith("--") and t.split("=")[0] in parser._option_string_actions
    }
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    config = first.parse_known_args(argv)[0].config
    tokens: list[str] = []
    if config is not None:
        try:
            table = tomllib.loads(Path(config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UserError(f"--config {config}: not a readable TOML file ({e})") from None
        for key, value in table.items():
            if key not in actions or key == "config":
                raise UserError(f"--config {config}: unknown option {key!r}")
            tokens += _flag_tokens(actions[key], value)
    args = parser.parse_args(tokens + argv)
    file_keys = set(table) if config is not None else set()
    args.sources = {
        dest: "command line" if dest in given else "config file" if dest in file_keys else "default"
        for dest in actions
        if dest != "help"
    }
    return args


def _flag_tokens(action: argparse.Action, value: object) -> list[str]:
    """A TOML value as the command-line tokens that set it."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if value else f"--no-{flag[2:]}"]
    if action.nargs == 0:  # store_true: only true can be said
        if not isinstance(value, bool):
            raise UserError(f"config: {flag[2:]} must be true or false, got {value!r}")
        return [flag] if value else []
    if isinstance(value, list) and action.nargs is None:  # one value: a comma-separated list
        return [flag, ",".join(str(v) for v in value)]
    values = value if isinstance(value, list) else [value]
    return [flag, *(str(v) for v in values)]


def check_device(value: str, name: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise UserError(
            f"{name} {value!r} is not a device this project runs on; use cuda, cpu or auto"
        )


def check_model(value: str | None, name: str) -> None:
    """`tiny`, a folder or single file that exists, or what looks like a Hugging Face Hub id
    (`org/name`); what is in it is checked when it is loaded."""
    if value in (None, "tiny") or Path(value).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        return
    raise UserError(
        f"{name}: model {value} does not exist (a folder, a single file or a Hub id); {DOWNLOAD_HINT}"
    )


def check_file(path: str | Path | None, name: str) -> None:
    if path is not None and not Path(path).is_file():
        raise UserError(f"{name} {path} does not exist (or is not a file)")


def check_folder(path: str | Path | None, name: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise UserError(f"{name} {path} does not exist (or is not a folder)")


def default_allocator() -> str:
    """PyTorch's CUDA allocator with expandable segments: a segment grows in place instead of a new
    one being reserved, so blocks of changing sizes (buckets, VAE tiles, the caches' phase and then
    the UNet's) leave less reserved and unused. Set only if the user has not configured the
    allocator, and before CUDA starts (the scripts call it first). Returns the setting in force."""
    user = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_ALLOC_CONF"))
    if user is None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = user = "expandable_segments:True"
    return user
