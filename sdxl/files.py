"""Writing files so that a crash, a full disk or a kill -9 never leaves a half-written one.

Every file the project writes (checkpoints, LoRA files, caches, images, JSON) goes through
`atomic_write`: the content is written to a unique temporary name in the target's own folder, then
renamed over the target, which is atomic on one filesystem. A reader sees the old file or the new
one, never a mix. Temporary names are `.<name>.<random>.tmp`, so two writers never share one and
leftovers are easy to find.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it becomes `path`, on failure it is removed.

    The file gets the permissions a plain `open(path, "w")` would give (0666 minus the umask), not
    the 0600 that temporary files are created with."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: str | Path) -> None:
    """Pretty-printed JSON, written atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
