"""Errors caused by the user's input. Scripts print them as one line and exit non-zero."""

import argparse
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Bad input (a missing file, unusable data, an impossible option); the message names the
    problem and the fix."""


class StoppedBySignal(Exception):
    """A run that saved its state and stopped on SIGINT or SIGTERM. The scripts exit with the
    shell's code for that signal, 128 + its number (130, 143), so that `train && generate` stops."""

    def __init__(self, signum: int, message: str, checkpoint: Any = None):
        super().__init__(message)
        self.signum, self.checkpoint = int(signum), checkpoint


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
