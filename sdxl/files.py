"""Writing files so that a crash, a full disk or a kill -9 never leaves a half-written one, and
folders that one process at a time writes into.

Every file the project writes (checkpoints, LoRA files, caches, images, JSON) goes through
`atomic_write`: the content is written to a unique temporary name in the target's own folder, then
renamed over the target, which is atomic on one filesystem. A reader sees the old file or the new
one, never a mix. Temporary names are `.<name>.<random>.tmp`, so two writers never share one, and a
crash's leftovers are found and removed by the next run into the folder (`remove_stale_tmp`).

A write that fails for want of space or permission is reported as one line that names the folder
(a UserError), after the partial file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdxl.errors import UserError

TMP_SUFFIX = ".tmp"


def cache_root() -> Path:
    """Where the project caches things: $SDXL_LORA_CACHE, else ~/.cache/sdxl-lora."""
    return Path(os.environ.get("SDXL_LORA_CACHE") or Path.home() / ".cache" / "sdxl-lora")


def folder_identity(folder: Path) -> str:
    """A model part's identity: a hash of its folder's configs and of the size, first and last MiB
    of its weight files (or of one single file)."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
        if path.suffix == ".json":
            h.update(path.read_bytes())
        elif path.suffix in (".safetensors", ".ckpt", ".pt", ".pth"):
            size = path.stat().st_size
            with open(path, "rb") as f:
                h.update(f"{path.name}:{size}".encode())
                h.update(f.read(2**20))
                f.seek(max(0, size - 2**20))
                h.update(f.read(2**20))
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(e: BaseException, path: Path, free: int | None = None) -> UserError | None:
    """The one-line form of a failed write, or None for a failure that is not about the disk."""
    code = getattr(e, "errno", None)
    # torch.save reports a full disk as "RuntimeError: [enforce fail at inline_container.cc] unexpected
    # pos", with no errno (the free space at the moment of failure tells); safetensors as its own
    # error type, with the system's message in it.
    full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e)
    if full or (free is not None and free < 2**20):
        return UserError(f"cannot write {path}: no space left on {path.parent}; free some space")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write into {path.parent}: permission denied (read-only?)")
    return None


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it becomes `path`, on failure it is removed.

    The file gets the permissions a plain `open(path, "w")` would give (0666 minus the umask), not
    the 0600 that temporary files are created with."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise write_error(e, path) or e from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as e:
        free = shutil.disk_usage(path.parent).free  # before the partial file is removed
        tmp.unlink(missing_ok=True)
        raise write_error(e, path, free) or e from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: str | Path) -> None:
    """Pretty-printed JSON, written atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def make_folder(path: str | Path, name: str) -> Path:
    """Create an output folder (and its parents), or say in one line why it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {name} {path}: {e.strerror}") from None
    return path


def remove_stale_tmp(folder: Path) -> int:
    """Remove the temporary files a crashed writer left in the folder; returns how many. Call it
    only while holding the folder's lock, when no other writer can be mid-write."""
    stale = list(folder.glob(f".*{TMP_SUFFIX}"))
    for path in stale:  # (a folder: a sharded checkpoint's, training/sharded.py)
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return len(stale)


class FolderLock:
    """One writer per folder: `.lock` holds the writer's host and process id, created atomically.

    A second process gets a one-line error naming the holder. A lock whose process has ended (a
    kill -9, a crash) is stale: it is replaced with a warning. The same process may take its own
    lock again (tests call the scripts' main twice)."""

    def __init__(self, folder: Path, name: str):
        self.path, self.name = folder / ".lock", name
        self.me = f"{socket.gethostname()} {os.getpid()}"

    def acquire(self) -> FolderLock:
        try:
            return self._acquire()
        except OSError as e:
            raise write_error(e, self.path) or e from None

    def _acquire(self) -> FolderLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale_or_mine():
                    time.sleep(0.2)
                    continue
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(self.me + "\n")
                return self
        raise UserError(f"could not take the lock {self.path}; is another run starting?")

    def _stale_or_mine(self) -> bool:
        """Whether the existing lock may be taken over (it is then removed); raises if it is held."""
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return False  # being written by its holder right now; look again
        if f"{host} {pid}" != self.me:
            if host != socket.gethostname():
                raise UserError(
                    f"{self.name} {self.path.parent} is in use by process {pid} on {host}; "
                    f"if that run has ended, delete {self.path}"
                )
            if _alive(int(pid)):
                raise UserError(
                    f"{self.name} {self.path.parent} is in use by another run (process {pid}); "
                    "wait for it to finish, or choose another folder"
                )
            print(f"warning: removing the stale lock of process {pid}, which has ended")
        self.path.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.path.read_text().strip() == self.me:
                self.path.unlink()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()  # however the run ends: an error exit leaves no lock behind


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True
