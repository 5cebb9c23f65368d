"""Find the newest usable training checkpoint and resume from it.

    uv run python resume_training.py --auto outputs/tiny                 # show what would resume
    uv run python resume_training.py --auto outputs/tiny --execute       # and run it
    uv run python resume_training.py --auto outputs/tiny --execute -- --max_train_steps 200
    uv run python resume_training.py --list outputs/tiny

--auto DIR takes an output folder or any folder of checkpoints (a `latest` link is followed). A
truncated or corrupt checkpoint is skipped with a warning and the previous one is used. The resume
command is train_sdxl.py with the configuration the checkpoint was trained with, --resume CHECKPOINT,
and any training flags given after `--`, which override the saved ones. The run continues in the
checkpoint's folder, wherever that folder has been moved (unless `-- --output_dir` says otherwise).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from cli.options import Parser, run_cli, values_to_argv
from sdxl.errors import UserError

ROOT = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def config_to_argv(config: dict) -> list[str]:
    """train_sdxl.py flags reproducing a saved configuration (only the parser's own options), by
    the converter --config files use too (cli/options.py)."""
    from cli.train import build_parser

    skip = ("help", "resume", "config")  # (a config file's values are all here)
    return values_to_argv(build_parser(), {k: v for k, v in config.items() if k not in skip})


def describe(path: Path, ckpt: dict) -> str:
    loss = ckpt.get("smoothed_loss")
    loss_text = f"{loss:.4f}" if loss is not None else "-"
    when = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    size = path.stat().st_size / 2**20
    return f"step {ckpt['step']:>7}  epoch {ckpt['epoch']:>4}  loss {loss_text:>8}  {size:8.1f} MiB  {when}  {path.name}"


def main(args: argparse.Namespace) -> int:
    check_args(args)  # before the heavy imports
    from sdxl.checkpoint import find_checkpoints

    if args.list:
        for path, ckpt in find_checkpoints(Path(args.list)):
            print(describe(path, ckpt))
        return 0
    path, ckpt = find_checkpoints(Path(args.auto))[-1]
    config = ckpt["config"]
    # The run goes on where its checkpoint is now, not where config.json says it was.
    here = {"output_dir": str(path.parent)}
    command = [
        sys.executable,
        str(ROOT / "train_sdxl.py"),
        *config_to_argv({**config, **here}),
        "--resume",
        str(path),
        *args.overrides,
    ]
    print(f"newest checkpoint: {describe(path, ckpt)}")
    print(
        f"trained with: {config.get('base_model')}, data "
        f"{config.get('data_dir') or config.get('dataset_config')}, output {config.get('output_dir')}"
    )
    print("resume command:\n  " + " ".join(command))
    if not args.execute:
        return 0
    return subprocess.run(command).returncode  # an argument list: no shell, no quoting issues


if __name__ == "__main__":
    run_cli(main, lambda: parse_args(sys.argv[1:]))
