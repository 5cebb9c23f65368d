"""Errors caused by the user's input. Scripts print them as one line and exit non-zero."""


class UserError(Exception):
    """Bad input (a missing file, unusable data, an impossible option); the message names the
    problem and the fix."""
