"""Errors caused by the user's input. Scripts print them as one line and exit non-zero."""

import argparse
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Bad input (a missing file, unusable data, an impossible option); the message names the
    problem and the fix."""


def run_cli(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser) -> None:
    """A script's entry point: parse, run, and turn a UserError into one line on stderr and exit
    code 2 (no traceback)."""
    try:
        main(parser.parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
