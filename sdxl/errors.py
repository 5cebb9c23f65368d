"""Errors caused by the user's input. The scripts print them as one line and exit non-zero
(cli/options.py: run_cli)."""

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
