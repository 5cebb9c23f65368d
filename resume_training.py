"""Find the newest usable training checkpoint and resume from it.

    uv run python resume_training.py --auto outputs/tiny                 # show what would resume
    uv run python resume_training.py --auto outputs/tiny --execute       # and run it
    uv run python resume_training.py --auto outputs/tiny --execute -- --max_train_steps 200
    uv run python resume_training.py --list outputs/tiny

--auto DIR takes an output folder or any folder of checkpoints (a `latest` link is followed). A
truncated or corrupt checkpoint is skipped with a warning and the previous one is used. The resume
command is train_sdxl.py with the configuration the checkpoint was trained with, --resume CHECKPOINT,
and any training flags given after `--`, which override the saved ones.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from sdxl.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--auto",
        metavar="DIR",
        help="find the newest loadable checkpoint in DIR and print the resume command",
    )
    mode.add_argument(
        "--list",
        metavar="DIR",
        help="list every checkpoint in DIR with step, epoch, loss, size and date",
    )
    p.add_argument(
        "--execute", action="store_true", help="run the resume command and exit with its exit code"
    )
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags after `--` are training flags that override the saved configuration."""
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    return args


def check_args(args: argparse.Namespace) -> None:
    folder = Path(args.auto or args.list)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of checkpoints")
    if not any(folder.glob("*.pt")):
        raise UserError(f"no loadable training checkpoint (.pt) in {folder.resolve()}")


if __name__ == "__main__":
    # --help, bad flags and a folder without checkpoints answer before the heavy imports below.
    run_cli(check_args, lambda: parse_args(sys.argv[1:]))

import train_sdxl
from training.checkpoint import find_checkpoints


def config_to_argv(config: dict) -> list[str]:
    """train_sdxl.py flags reproducing a saved configuration (only the parser's own options)."""
    argv: list[str] = []
    for action in train_sdxl.build_parser()._actions:
        if (
            not action.option_strings
            or action.dest in ("help", "resume", "config")  # (a config file's values are all here)
            or action.dest not in config
        ):
            continue
        value, flag = config[action.dest], action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true
            argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [flag, *map(str, value)] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def describe(path: Path, ckpt: dict) -> str:
    loss = ckpt.get("smoothed_loss")
    loss_text = f"{loss:.4f}" if loss is not None else "-"
    when = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    size = path.stat().st_size / 2**20
    return f"step {ckpt['step']:>7}  epoch {ckpt['epoch']:>4}  loss {loss_text:>8}  {size:8.1f} MiB  {when}  {path.name}"


def main(args: argparse.Namespace) -> int:
    if args.list:
        for path, ckpt in find_checkpoints(Path(args.list)):
            print(describe(path, ckpt))
        return 0
    path, ckpt = find_checkpoints(Path(args.auto))[-1]
    config = ckpt["config"]
    command = [
        sys.executable,
        str(ROOT / "train_sdxl.py"),
        *config_to_argv(config),
        "--resume",
        str(path),
        *args.overrides,
    ]
    print(f"newest checkpoint: {describe(path, ckpt)}")
    print(
        f"trained with: {config.get('base_model')}, data {config.get('data_dir')}, output {config.get('output_dir')}"
    )
    print("resume command:\n  " + " ".join(command))
    if not args.execute:
        return 0
    return subprocess.run(command).returncode  # an argument list: no shell, no quoting issues


if __name__ == "__main__":
    run_cli(main, lambda: parse_args(sys.argv[1:]))
