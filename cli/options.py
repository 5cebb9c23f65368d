"""What both scripts' command lines share, free of torch: number rules and path checks, the flags
both define, the TOML config file, the one converter between flags and values, and the entry point
that turns bad input into one line.

Values and flags convert both ways in one place (`flag_tokens`): a `--config` file's values become
command-line tokens, and resume_training.py turns a checkpoint's recorded values back into the
training command. A type that reads a value from text (`comma_separated`, `image_size`) carries
the inverse (`.format`), so that a value always prints as the text that reads it back.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli.choices import DEFAULT_MODEL, DOWNLOAD_HINT
from sdxl.errors import StoppedBySignal, UserError

# A rule for a number: the test and how to say what it must be.
Rule = tuple[Callable[[float], bool], str]
AT_LEAST_1: Rule = (lambda v: v >= 1, "at least 1")
AT_LEAST_0: Rule = (lambda v: v >= 0, "0 or more")
POSITIVE: Rule = (lambda v: v > 0, "positive")
FRACTION: Rule = (lambda v: 0 <= v <= 1, "between 0 and 1")
BELOW_1: Rule = (lambda v: 0 <= v < 1, "at least 0 and below 1")
TILE_SIZE: Rule = (lambda v: v == 0 or (v >= 128 and v % 64 == 0), "0 or a multiple of 64 from 128")
ANY: Rule = (lambda v: True, "a number")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (a UserError: exit code 2, no usage dump)."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


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


# ---------------------------------------------------------------------------------------------
# Types that read a value from text, and print it back
# ---------------------------------------------------------------------------------------------


def comma_separated(kind: type) -> Callable[[str], list]:
    """An argparse type: "1,2,3" -> [1, 2, 3] (kohya's block_dims style); `.format` inverts it."""

    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__} values"
            ) from None

    parse.format = lambda values: ",".join(str(v) for v in values)  # type: ignore[attr-defined]
    return parse


def image_size(text: str) -> tuple[int, int]:
    """An argparse type: '512' -> (512, 512); '768x512' or '768,512' (kohya's) -> width 768,
    height 512. Returns (width, height), each a positive multiple of 8 (the VAE's factor)."""
    parts = re.split(r"[x,]", text.lower().replace(" ", ""))
    try:
        w, h = (int(parts[0]),) * 2 if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        if len(parts) > 2:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; use 512, or WIDTHxHEIGHT such as 768x512"
        ) from None
    if w < 8 or h < 8 or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(
            f"{text!r}: width and height must be positive multiples of 8 (the VAE's)"
        )
    return w, h


image_size.format = lambda v: f"{v[0]}x{v[1]}"  # type: ignore[attr-defined]


def flag_tokens(action: argparse.Action, value: Any) -> list[str]:
    """A value as the command-line tokens that set it: the converter that `--config` files and
    resume_training.py share. One value is written `--flag=value`, which reads back even when it
    starts with a minus sign."""
    name = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [] if value is None else [name if value else f"--no-{name[2:]}"]
    if action.nargs == 0:  # store_true: only true can be said
        if not isinstance(value, bool):
            raise UserError(f"{name[2:]} must be true or false, got {value!r}")
        return [name] if value else []
    if value is None:
        return []
    fmt = getattr(action.type, "format", None)
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list | tuple) else [value]
        return [name, *(str(v) for v in values)] if values else []
    if fmt is not None and isinstance(value, list | tuple):
        return [f"{name}={fmt(value)}"]
    if isinstance(value, list | tuple):  # a list where one value is expected
        raise UserError(f"{name[2:]} takes one value, got the list {value!r}")
    return [f"{name}={value}"]


def values_to_argv(parser: argparse.ArgumentParser, values: dict[str, Any]) -> list[str]:
    """The flags that reproduce `values` (by dest), for the parser's own options only."""
    argv: list[str] = []
    for action in parser._actions:
        if action.option_strings and action.dest in values and action.dest != "help":
            argv += flag_tokens(action, values[action.dest])
    return argv


# ---------------------------------------------------------------------------------------------
# Checks of paths and names
# ---------------------------------------------------------------------------------------------


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


def check_device(value: str, name: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise UserError(
            f"{name} {value!r} is not a device this project runs on; use cuda, cpu or auto"
        )


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def looks_like_hub_id(value: str) -> bool:
    """`owner/name`, and not a path: no leading ./ or ../ or /, and not a file name."""
    return bool(HUB_ID.fullmatch(value)) and not value.startswith((".", "/"))


def check_model(value: str | None, name: str) -> None:
    """`tiny`, a folder or single file that exists, or a Hugging Face Hub id (`owner/name`);
    what is in it is checked when it is loaded."""
    if value in (None, "tiny") or Path(value).exists() or looks_like_hub_id(value):
        return
    if value == DEFAULT_MODEL:
        raise UserError(f"{name}: no model at {value}; {DOWNLOAD_HINT}")
    raise UserError(
        f"{name}: there is no folder or file {value}; give a model folder, a single "
        ".safetensors file, or a Hub id of the form owner/name"
    )


def check_file(path: str | Path | None, name: str) -> None:
    if path is not None and not Path(path).is_file():
        raise UserError(f"{name} {path} does not exist (or is not a file)")


def check_folder(path: str | Path | None, name: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise UserError(f"{name} {path} does not exist (or is not a folder)")


# ---------------------------------------------------------------------------------------------
# The flags both scripts define: one definition, each script's spelling
# ---------------------------------------------------------------------------------------------

SHARED: dict[str, dict[str, Any]] = {
    "pretrained_model": dict(
        default=DEFAULT_MODEL,
        help="an SDXL base model: a diffusers-layout folder, a single .safetensors file (the SGM "
        "layout of Civitai fine-tunes), a Hugging Face Hub id, or 'tiny' (a small random SDXL)",
    ),
    "vae": dict(type=Path, default=None, help="another VAE folder (e.g. the fp16-fix VAE)"),
    "vae_tile_size": dict(
        type=int,
        help="encode and decode images larger than this (px) in overlapping tiles of this size, "
        "to bound the VAE's memory (0: never tile)",
    ),
    "prediction_type": dict(
        default=None,
        help="what the UNet predicts (default: the model's scheduler config; v_prediction for "
        "v-pred fine-tunes such as NoobAI-XL)",
    ),
    "zero_terminal_snr": dict(
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rescale the noise schedule to zero SNR at the last timestep (Lin et al. 2023; "
        "with v_prediction); default: the model's scheduler config",
    ),
    "precision": dict(default="auto", help="UNet precision; auto = bf16 on CUDA, fp32 on the CPU"),
    "device": dict(default="auto", help="cuda, cpu, or auto"),
    "cuda_graph": dict(default="auto"),
    "compile": dict(
        action="store_true",
        help="torch.compile the UNet's ResNet and transformer blocks (regional compilation: a "
        "minute or two of compiling at the first step of each shape, then fused kernels)",
    ),
    "seed": dict(type=int, default=0),
    "image_size": dict(type=image_size, default=(1024, 1024)),
    "batch_size": dict(type=int, default=1),
    "fp8_base": dict(
        action="store_true",
        help="store the frozen UNet in fp8 (e4m3, one scale per channel), upcast a layer at a "
        "time: half the UNet's memory, at a small cost in fidelity (kohya's --fp8_base)",
    ),
    "output_dir": dict(),
    "overwrite": dict(action="store_true"),
}


def add_shared(group: Any, dest: str, hyphens: bool, **overrides: Any) -> None:
    """Add one of SHARED's flags to a parser or group, in the script's spelling."""
    kwargs = {**SHARED[dest], **overrides}
    group.add_argument(flag(dest, hyphens), dest=dest, **kwargs)


def lenient_negatives(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let a value such as -1,2,3 follow its flag: argparse takes only plain negative numbers for
    values, and would read "-1,..." as an unknown flag ("expected one argument")."""
    parser._negative_number_matcher = re.compile(r"^-\d[\d.,eE+-]*$")
    return parser


# ---------------------------------------------------------------------------------------------
# --config FILE.toml
# ---------------------------------------------------------------------------------------------


def read_toml(path: Path, name: str = "--config") -> dict:
    """A TOML file in UTF-8 (a byte-order mark allowed) or UTF-16 (what PowerShell's `>` writes)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{name} {path}: cannot read it ({e.strerror})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        raise UserError(f"{name} {path}: not UTF-8 or UTF-16 text; save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{name} {path}: not valid TOML ({e})") from None


def flattened(table: dict) -> dict:
    """kohya's sectioned files (what its --output_config writes: [model_arguments],
    [training_arguments], ...) read as its own reader reads them: each section's keys at the top."""
    flat: dict = {}
    for key, value in table.items():
        flat |= value if isinstance(value, dict) else {key: value}
    return flat


def config_argv(parser: argparse.ArgumentParser, path: Path) -> tuple[list[str], set[str]]:
    """A config file's values as command-line tokens, each checked on its own so that an error
    names the file and the key. Relative paths in the file are read from the working directory,
    as on the command line."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    tokens: list[str] = []
    table = flattened(read_toml(path))
    for key, value in table.items():
        if key not in actions or key in ("config", "help"):
            raise UserError(
                f"--config {path}: unknown option {key!r} (keys are this script's flags without "
                "their dashes; README.md, 'Coming from kohya', maps kohya's names)"
            )
        try:
            part = flag_tokens(actions[key], value)
            check = argparse.ArgumentParser(add_help=False, exit_on_error=False)
            check._add_action(actions[key])
            lenient_negatives(check).parse_args(part)
        except (argparse.ArgumentError, UserError) as e:
            message = str(e).split(": ", 1)[-1] if isinstance(e, argparse.ArgumentError) else e
            raise UserError(f"--config {path}: {key} = {value!r}: {message}") from None
        tokens += part
    return tokens, set(table)


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command line, over the flags of a TOML file if it names one (`--config FILE.toml`,
    keys spelled as the flags without their dashes, as kohya's config files are): the command
    line wins. `sources` records where each value came from: "command line", "config file" or
    "default"."""
    lenient_negatives(parser)
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    given = {
        parser._option_string_actions[t.split("=")[0]].dest
        for t in argv
        if t.startswith("--") and t.split("=")[0] in parser._option_string_actions
    }
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    config = first.parse_known_args(argv)[0].config
    tokens, file_keys = config_argv(parser, Path(config)) if config is not None else ([], set())
    args = parser.parse_args(tokens + argv)
    args.sources = {
        dest: "command line" if dest in given else "config file" if dest in file_keys else "default"
        for dest in actions
        if dest != "help"
    }
    return args


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def run_cli(
    main: Callable[[argparse.Namespace], Any],
    parse: argparse.ArgumentParser | Callable[[], argparse.Namespace],
) -> None:
    """A script's entry point: parse the command line (with the parser, or the function given), run,
    and turn a UserError into one line on stderr and exit code 2 (no traceback); a run stopped by a
    signal exits with 128 + the signal's number, and an int that `main` returns is the exit code."""
    try:
        args = parse.parse_args() if isinstance(parse, argparse.ArgumentParser) else parse()
        result = main(args)
        if isinstance(result, int):
            sys.exit(result)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except StoppedBySignal as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
