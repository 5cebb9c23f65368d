"""Finding the training data: a folder of image + caption pairs, or WebDataset tar shards.

The scan runs before anything heavy is imported, so that a data folder with no usable pairs fails
at once. It needs only the standard library and Pillow.

- A folder: `name.jpg|jpeg|png|webp` with `name.txt` beside it (`--caption_extension` changes the
  `.txt`), in the folder and its subfolders (hidden ones aside). A top-level subfolder named
  `<digits>_name` is a kohya repeat folder: `10_name` repeats its images 10 times an epoch, `0_name`
  leaves them out (both said in the summary), and more than MAX_REPEATS is refused as a folder that
  was not meant as one (`2023_trip`); the folder's name is its images' concept (for the tag counts).
  Two images that share a name stem (`a.png`, `a.jpg`) share its caption; a caption without an image
  is ignored. `name.mask.png` beside an image is its loss mask (--masked_loss), not an image.
- Shards: `*.tar` files as the webdataset package writes them: the members of one sample share the
  path before the first dot of the file name (`000123.png`, `000123.txt`). A shard that is empty,
  not a tar file, cut short inside a member or missing its end-of-archive marker is named in a
  warning, with the samples lost to it; whatever can be read from it is used.
- Captions are UTF-8, with or without a byte-order mark; a caption that is not UTF-8 is read as
  Latin-1, with a warning naming the file.
- Every image is opened and checked (`verify`), and its size is read with its EXIF orientation
  applied (a phone photo stored sideways counts as upright). A file that fails is skipped with a
  warning. `verify` does not decode a JPEG fully; a JPEG that turns out to be truncated when it is
  decoded in training is skipped then (training/data_loader.py).

The results are kept in an index in the cache folder, one per data folder, keyed by each file's size
and modification time, so that a restart on an unchanged dataset reads only the index; changed
files are scanned again. Files are scanned in parallel worker processes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from sdxl.errors import UserError
from sdxl.files import write_json

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
INDEX_VERSION = 4
MASK_SUFFIX = ".mask.png"
_REPEATS = re.compile(r"(\d+)_(.+)")  # kohya's "10_name" folders
# kohya's repeat folders count 1 to about 100; a larger number is more likely a date or a year.
MAX_REPEATS = 1000
LOUD_REPEATS = 100
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class DataError(UserError, ValueError):
    """Unusable training data; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Record:
    """One training example: where its image bytes are, its caption and its (upright) size."""

    key: str  # file name (folder) or "<shard>/<key>" (WebDataset)
    caption: str
    path: Path  # the image file, or the tar shard
    offset: int = -1  # where the image's bytes start inside the shard (-1: a plain file)
    length: int = 0
    size: tuple[int, int] = (0, 0)  # (width, height) with the EXIF orientation applied
    repeats: int = 1  # times an epoch (a "10_name" folder's 10)
    concept: str = ""  # the top folder it came from, for the tag counts
    mask: Path | None = None  # its name.mask.png, if there is one
    mask_size: tuple[int, int] = (0, 0)  # that file's upright (width, height)


def image_size(data: bytes | Path) -> tuple[int, int]:
    """(width, height) of an image as it is meant to be seen; raises if it is not readable."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        w, h = im.size
        # The orientation from the header alone: no pixels are decoded (for a PNG, getexif()
        # would decode them to look for an EXIF chunk after the pixel data).
        exif = Image.Exif()
        exif.load(im.info.get("exif", b""))
        im.verify()
    return (h, w) if exif.get(0x0112, 1) in _ROTATED else (w, h)


def decode_caption(data: bytes, where: str) -> tuple[str, str | None]:
    """(caption, warning or None): UTF-8 with or without a BOM, else Latin-1."""
    try:
        return data.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError:
        return data.decode("latin-1").strip(), f"{where} is not UTF-8; read it as Latin-1"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


# ---------------------------------------------------------------------------------------------
# Scanning one file (in a worker process)
# ---------------------------------------------------------------------------------------------


def _scan_image(path: Path, caption_extension: str = ".txt") -> dict:
    """One image of a folder: its size, caption and mask, or why it is skipped (an image without
    a caption file keeps its size: kohya's class_tokens can caption it)."""
    try:
        w, h = image_size(path)
    except Exception:
        return {"skip": f"skipping {path}: not a readable image"}
    caption_file = path.with_suffix(caption_extension)
    entry: dict = {"size": [w, h], "warnings": []}
    if not caption_file.is_file():
        entry["skip"] = f"skipping {path}: no caption file {caption_file.name}"
    else:
        entry["caption"], warning = decode_caption(caption_file.read_bytes(), str(caption_file))
        entry["warnings"] += [warning] if warning else []
    mask = path.with_name(path.stem + MASK_SUFFIX)
    if mask.is_file():
        try:
            entry["mask_size"] = list(image_size(mask))
        except Exception:
            entry["warnings"].append(f"{mask} is not a readable image; {path} has no mask")
    return entry


def _scan_shard(path: Path) -> dict:
    """One shard: its samples, and what was skipped or lost."""
    file_size = path.stat().st_size
    members: dict[str, dict[str, tuple[int, int]]] = {}  # key -> ext -> (offset, size)
    warnings, cut = [], None
    try:
        with tarfile.open(path) as tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, OSError) as e:
                    cut = str(e)
                    break
                if member is None:
                    break
                if member.isfile():
                    folder, _, name = member.name.rpartition("/")
                    stem, _, ext = name.partition(".")
                    key = f"{folder}/{stem}" if folder else stem
                    members.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as e:
        message = f"{path}: not a readable tar file ({e}); none of its samples are used"
        return {"records": [], "skipped": 0, "lost": 0, "damaged": True, "warnings": [message]}
    with open(path, "rb") as f:
        if cut is None and file_size >= 1024:
            f.seek(file_size - 1024)
            if f.read(1024) != bytes(1024):
                cut = "no end-of-archive marker"
        records, skipped, lost = [], 0, 0
        for key, parts in sorted(members.items()):
            name = f"{path.name}/{key}"
            if any(offset + size > file_size for offset, size in parts.values()):
                lost += 1
                continue
            image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            if image_ext is None or "txt" not in parts:
                skipped += 1
                warnings.append(
                    f"skipping {name}: no {'image' if image_ext is None else 'caption'}"
                )
                continue
            f.seek(parts[image_ext][0])
            data = f.read(parts[image_ext][1])
            try:
                w, h = image_size(data)
            except Exception:
                skipped += 1
                warnings.append(f"skipping {name}.{image_ext}: not a readable image")
                continue
            f.seek(parts["txt"][0])
            caption, warning = decode_caption(f.read(parts["txt"][1]), f"{name}.txt")
            warnings += [warning] if warning else []
            records.append([f"{name}", caption, *parts[image_ext], w, h])
    if cut is not None:
        warnings.append(
            f"{path}: the shard is cut short ({cut}); {len(records)} samples read, "
            f"{lost} cut in half, and any after the cut are lost"
        )
    damaged = cut is not None or lost > 0
    return {
        "records": records,
        "skipped": skipped,
        "lost": lost,
        "damaged": damaged,
        "warnings": warnings,
    }


# ---------------------------------------------------------------------------------------------
# The scan
# ---------------------------------------------------------------------------------------------


def check_data_dir(data_dir: str | Path) -> None:
    """The quick check before the scan: a folder holding images or shards at all."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(
            f"data folder {folder} does not exist; pass --data_dir FOLDER of image + .txt pairs or .tar shards"
        )
    if next(iter(_candidates(folder)), None) is None and not any(folder.glob("*.tar")):
        raise DataError(
            f"no usable image + caption pairs in {folder}: expected name.jpg|jpeg|png|webp with name.txt, or .tar shards"
        )


def _candidates(folder: Path, subfolders: bool = True):
    """The folder's image files, in it and its subfolders (not hidden ones), masks aside."""
    for path in folder.rglob("*") if subfolders else folder.glob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        image = path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.endswith(MASK_SUFFIX)
        if image and not hidden and path.is_file():
            yield path


def scan(
    data_dir: str | Path,
    index_dir: Path | None = None,
    workers: int | None = None,
    caption_extension: str = ".txt",
    subfolders: bool = True,
    class_tokens: str | None = None,
) -> list[Record]:
    """Every usable (image, caption) pair, sorted by key, with a summary line printed. With
    `index_dir`, results are reused from (and saved to) the index there. kohya's dataset-config
    subsets read only the folder's own images (`subfolders=False`: no shards, no repeat folders),
    and caption an image without a caption file with `class_tokens`, if given."""
    check_data_dir(data_dir)
    folder = Path(data_dir)
    start = time.perf_counter()
    shards = sorted(folder.glob("*.tar")) if subfolders else []
    sources = shards or sorted(_candidates(folder, subfolders))
    names = {p: p.relative_to(folder).as_posix() for p in sources}
    index_path = _index_path(folder, index_dir, caption_extension)
    old = _read_index(index_path)
    stamps = {
        names[p]: _stamp(p) + ([] if shards else _side_stamps(p, caption_extension))
        for p in sources
    }
    todo = [p for p in sources if old.get(names[p], {}).get("stamp") != stamps[names[p]]]
    scan_one = (
        _scan_shard
        if shards
        else functools.partial(_scan_image, caption_extension=caption_extension)
    )
    scanned = dict(zip([names[p] for p in todo], _map(scan_one, todo, workers)))
    entries = {names[p]: scanned.get(names[p]) or old[names[p]] for p in sources}
    for name, entry in entries.items():
        entry["stamp"] = stamps[name]
    if index_path is not None and todo:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(
            {"version": INDEX_VERSION, "folder": str(folder.resolve()), "files": entries},
            index_path,
        )

    records, skipped, lost, damaged = [], 0, 0, 0
    for path in sources:
        entry = entries[names[path]]
        if class_tokens is not None and "size" in entry and "caption" not in entry:
            entry = {k: v for k, v in entry.items() if k != "skip"} | {"caption": class_tokens}
        for warning in entry.get("warnings", []) + ([entry["skip"]] if "skip" in entry else []):
            log.warning(warning)
        if shards:
            records += [
                Record(key, cap, path, off, n, (w, h))
                for key, cap, off, n, w, h in entry["records"]
            ]
            skipped += entry["skipped"]
            lost += entry["lost"]
            damaged += entry["damaged"]
        elif "skip" in entry:
            skipped += 1
        else:
            top = names[path].split("/")[0] if "/" in names[path] else ""
            repeats = int(m[1]) if (m := _REPEATS.fullmatch(top)) else 1
            mask = path.with_name(path.stem + MASK_SUFFIX)
            w, h = entry["size"]
            record = Record(names[path], entry["caption"], path, -1, 0, (w, h), repeats, top)
            if "mask_size" in entry:
                record = replace(record, mask=mask, mask_size=tuple(entry["mask_size"]))
            records.append(record)
    kind = f"{len(shards)} WebDataset shards" if shards else "an image folder"
    lost_text = f"; {damaged} damaged shards, at least {lost} samples lost" if damaged else ""
    print(
        f"data: {len(records)} image-caption pairs from {kind} in {folder}; {skipped} skipped"
        f"{lost_text} ({len(todo)} files scanned, {len(sources) - len(todo)} from the index, "
        f"{time.perf_counter() - start:.1f} s)"
    )
    records = with_checked_repeats(records)
    if not records:
        raise DataError(
            f"no usable image + caption pairs in {folder}: expected name.jpg|jpeg|png|webp with name.txt, or .tar shards"
        )
    return sorted(records, key=lambda r: r.key)


def with_checked_repeats(records: list[Record]) -> list[Record]:
    """kohya's repeat folders, said in the summary: each folder's images and repeats, the images of
    a `0_name` folder left out with a warning, a count above LOUD_REPEATS warned of, and one above
    MAX_REPEATS refused (most likely a date or a year, not a count: `20240101_vacation`)."""
    folders: dict[str, list[Record]] = {}
    for r in records:
        if _REPEATS.fullmatch(r.concept):
            folders.setdefault(r.concept, []).append(r)
    if not folders:
        return records
    for name, members in sorted(folders.items()):
        repeats = members[0].repeats
        if repeats > MAX_REPEATS:
            digits, rest = name.split("_", 1)
            raise DataError(
                f"subfolder {name}/ would repeat its {len(members)} images {repeats:,} times an "
                f"epoch (a <digits>_name folder is a kohya repeat folder); rename it (e.g. "
                f"{rest}_{digits}), or give it at most {MAX_REPEATS} repeats"
            )
        if repeats == 0:
            log.warning("%s/: 0 repeats, so its %d images are left out", name, len(members))
        elif repeats > LOUD_REPEATS:
            log.warning(
                "%s/ repeats its %d images %d times an epoch; is %d a repeat count? (kohya's "
                "folders use 1 to about %d)",
                name,
                len(members),
                repeats,
                repeats,
                LOUD_REPEATS,
            )
    table = ", ".join(f"{n}/ {len(m)} x {m[0].repeats}" for n, m in sorted(folders.items()))
    total = sum(r.repeats for r in records)
    print(f"repeat folders (images x repeats): {table}; {total} samples an epoch")
    return [r for r in records if r.repeats > 0]


def _side_stamps(image: Path, caption_extension: str) -> list[int]:
    """The stamps of the files beside an image that the scan reads: its caption and its mask."""
    side = [image.with_suffix(caption_extension), image.with_name(image.stem + MASK_SUFFIX)]
    return [n for p in side for n in (_stamp(p) if p.is_file() else [-1, -1])]


def _map(fn, paths: list[Path], workers: int | None) -> list[dict]:
    """fn over the paths, in worker processes when there are enough of them to pay off."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < 64:
        return [fn(p) for p in paths]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, paths, chunksize=max(1, min(256, len(paths) // (4 * workers)))))


def _index_path(folder: Path, index_dir: Path | None, caption_extension: str) -> Path | None:
    if index_dir is None:
        return None
    key = f"{folder.resolve()}|{caption_extension}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return index_dir / f"{folder.resolve().name}-{digest}.json"


def _read_index(path: Path | None) -> dict:
    """The saved entries, or none if there is no usable index (a bad one is simply rebuilt)."""
    try:
        index = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return index.get("files", {}) if index.get("version") == INDEX_VERSION else {}
