"""Prompt files, read before anything heavy is imported (so that an empty one fails at once)."""

from __future__ import annotations

from pathlib import Path

from sdxl.errors import UserError


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt a line. Blank lines and lines starting with `#` (comments) are skipped; a missing
    file, or one with no prompts, is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(
            f"prompt file {path} has no prompts (one prompt a line; # starts a comment)"
        )
    return prompts
