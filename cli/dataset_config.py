"""kohya's dataset config (`--dataset_config FILE.toml`, or .json), read as its documentation writes
it (sd-scripts, docs/config_README-en.md): `[general]`, then `[[datasets]]`, each with its
`[[datasets.subsets]]`. A key set in a subset wins over its dataset's, which wins over `[general]`'s,
which wins over the command line's flag of the same meaning (kohya's order).

The keys this project has mean what they mean in kohya. The keys it lacks are each named in one
printed line (unless set to kohya's default, which changes nothing), and a key kohya does not know
either is an error, as in kohya. Free of torch: it is read with the flags, before the heavy imports.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli.options import read_toml
from sdxl.errors import UserError
from training.specs import DatasetSpec, SubsetSpec


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _int(low: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"a whole number, {low} or more")
        return value

    return check


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError("a number from 0 to 1")
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def _resolution(value: Any) -> tuple[int, int]:
    """256 (square) or [width, height], as kohya's resolution; sides in multiples of 8."""
    sides = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    ok = isinstance(sides, list) and len(sides) == 2
    if not (ok and all(isinstance(s, int) and s >= 8 and s % 8 == 0 for s in sides)):
        raise ValueError("a side such as 1024, or [width, height], in multiples of 8")
    return sides[0], sides[1]


# The keys this project reads, with their checks. DATASET_KEYS go in [general] or [[datasets]];
# SUBSET_KEYS anywhere (a subset's wins); SUBSET_ONLY in [[datasets.subsets]] alone.
DATASET_KEYS: dict[str, Callable[[Any], Any]] = {
    "resolution": _resolution,
    "batch_size": _int(1),
    "enable_bucket": _bool,
    "validation_split": _fraction,
    "bucket_reso_steps": _int(1),  # 64 only: this project's buckets step by 64
}
SUBSET_KEYS: dict[str, Callable[[Any], Any]] = {
    "num_repeats": _int(0),
    "flip_aug": _bool,
    "random_crop": _bool,
    "shuffle_caption": _bool,
    "keep_tokens": _int(0),
    "caption_separator": _text,
    "caption_prefix": _text,
    "caption_suffix": _text,
    "caption_dropout_rate": _fraction,
    "caption_tag_dropout_rate": _fraction,
    "caption_extension": _text,
    "class_tokens": _text,
    "cache_info": _bool,  # kohya's cache of sizes and captions: the scan index always does that
}
SUBSET_ONLY: dict[str, Callable[[Any], Any]] = {
    "image_dir": _text,
    "metadata_file": _text,
    "is_reg": _bool,
}

# kohya's keys this project lacks: (kohya's default, which changes nothing, or None when any value
# would; what to know). Each is named in one line when a file sets it otherwise.
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "bucket_no_upscale": (False, "buckets here may upscale small images"),
    "min_bucket_reso": (
        None,
        "buckets here keep the dataset's area, sides from 64 px, aspect up to 4",
    ),
    "max_bucket_reso": (
        None,
        "buckets here keep the dataset's area, sides from 64 px, aspect up to 4",
    ),
    "validation_seed": (None, "the validation split is drawn from --seed"),
    "network_multiplier": (1.0, "every dataset trains the adapter at strength 1"),
    "resize_interpolation": (None, "images are resized with bicubic filtering"),
    "color_aug": (False, "no colour augmentation"),
    "face_crop_aug_range": (None, "no face crops"),
    "keep_tokens_separator": (None, "use keep_tokens"),
    "secondary_separator": (None, "tags are split at caption_separator only"),
    "enable_wildcard": (False, "captions are used as written"),
    "token_warmup_min": (1, "no token warm-up"),
    "token_warmup_step": (0, "no token warm-up"),
    "custom_attributes": (None, "not read"),
    "caption_dropout_every_n_epochs": (0, "use caption_dropout_rate"),
    "alpha_mask": (False, "pass --masked_loss (alpha channels or name.mask.png, for every subset)"),
}
UNSUPPORTED_DATASET = {"bucket_no_upscale", "min_bucket_reso", "max_bucket_reso", "validation_seed",
                       "network_multiplier"}  # fmt: skip


def command_line_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of the same meaning, as the keys' values when the file leaves them out."""
    return {
        "resolution": tuple(args.image_size),
        "batch_size": args.batch_size,
        "enable_bucket": args.bucket,
        "validation_split": args.validation_split,
        "num_repeats": 1,
        "flip_aug": args.random_flip,
        "random_crop": not args.center_crop,
        "shuffle_caption": args.shuffle_caption,
        "keep_tokens": args.keep_tokens,
        "caption_separator": args.caption_separator,
        "caption_prefix": "",
        "caption_suffix": "",
        "caption_dropout_rate": args.caption_dropout,
        "caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "caption_extension": args.caption_extension,
        "class_tokens": None,
        "is_reg": False,
    }


def read_dataset_config(
    path: str | Path, defaults: dict[str, Any]
) -> tuple[tuple[DatasetSpec, ...], list[str]]:
    """The file's datasets, and one line for each key it sets that this project lacks. Raises
    UserError, naming the key and where it is, for anything kohya would refuse too."""
    path = Path(path)
    table = _read(path)
    where = f"--dataset_config {path}"
    extra = set(table) - {"general", "datasets"}
    if extra:
        raise UserError(f"{where}: unknown table {sorted(extra)[0]!r} (kohya's are [general] "
                        "and [[datasets]] with their [[datasets.subsets]])")  # fmt: skip
    general = table.get("general", {})
    datasets = table.get("datasets", [])
    if not isinstance(general, dict) or not isinstance(datasets, list) or not datasets:
        raise UserError(f"{where}: no [[datasets]] (each with [[datasets.subsets]] naming an "
                        "image_dir)")  # fmt: skip
    unsupported: dict[str, list[str]] = {}
    base = defaults | _values(general, "[general]", where, unsupported)
    specs = []
    for i, dataset in enumerate(datasets):
        here = f"datasets[{i}]"
        if not isinstance(dataset, dict):
            raise UserError(f"{where}: {here} is not a table; write it as [[datasets]]")
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not subsets:
            raise UserError(f"{where}: {here} has no [[datasets.subsets]]; give it one with an "
                            "image_dir")  # fmt: skip
        values = base | _values(dataset, here, where, unsupported)
        if values.get("bucket_reso_steps", 64) != 64:
            unsupported.setdefault("bucket_reso_steps", []).append(here)
        specs.append(
            DatasetSpec(
                subsets=tuple(
                    _subset(values | _values(s, f"{here}.subsets[{j}]", where, unsupported),
                            f"{here}.subsets[{j}]", where)  # fmt: skip
                    for j, s in enumerate(subsets)
                ),
                size=values["resolution"],
                bucket=values["enable_bucket"],
                batch_size=values["batch_size"],
                validation_split=values["validation_split"],
            )
        )
    notes = [
        f"{where}: {key} ({', '.join(places)}) is not supported here and is left out: "
        f"{UNSUPPORTED.get(key, (None, 'buckets here step by 64 px'))[1]}"
        for key, places in unsupported.items()
    ]
    return tuple(specs), notes


def _read(path: Path) -> dict:
    if path.suffix.lower() != ".json":
        return read_toml(path, "--dataset_config")
    try:
        table = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise UserError(f"--dataset_config {path}: not readable JSON ({e})") from None
    if not isinstance(table, dict):
        raise UserError(f"--dataset_config {path}: not a JSON object")
    return table


def _values(
    table: dict, here: str, where: str, unsupported: dict[str, list[str]]
) -> dict[str, Any]:
    """A table's keys, each checked; the unsupported ones noted (not kept). `here` says which
    table: [general], datasets[i] or datasets[i].subsets[j]."""
    values = {}
    in_subset = ".subsets[" in here
    for key, value in table.items():
        if key == "subsets" and here.startswith("datasets[") and not in_subset:
            continue
        if key in UNSUPPORTED:
            neutral = UNSUPPORTED[key][0]
            if in_subset and key in UNSUPPORTED_DATASET:
                raise UserError(f"{where}: {key} in {here} belongs in [[datasets]] or [general]")
            if neutral is None or value != neutral:
                unsupported.setdefault(key, []).append(here)
            continue
        check = DATASET_KEYS.get(key) or SUBSET_KEYS.get(key) or SUBSET_ONLY.get(key)
        if check is None:
            raise UserError(f"{where}: unknown key {key!r} in {here} (a misspelling? kohya's "
                            "keys are in its docs/config_README-en.md)")  # fmt: skip
        if key in DATASET_KEYS and in_subset:
            raise UserError(f"{where}: {key} in {here} belongs in [[datasets]] or [general]; "
                            "subsets of one dataset share it")  # fmt: skip
        if key in SUBSET_ONLY and not in_subset:
            raise UserError(f"{where}: {key} in {here} belongs in a [[datasets.subsets]]")
        try:
            values[key] = check(value)
        except ValueError as e:
            raise UserError(f"{where}: {key} = {value!r} in {here} is not {e}") from None
    return values


def _subset(values: dict[str, Any], here: str, where: str) -> SubsetSpec:
    """One subset from its resolved values; its folder and metadata file checked."""
    image_dir = Path(values["image_dir"]) if "image_dir" in values else None
    metadata = Path(values["metadata_file"]) if "metadata_file" in values else None
    if image_dir is None:
        raise UserError(f"{where}: {here} has no image_dir (the folder of its images)")
    if not image_dir.is_dir():
        raise UserError(f"{where}: image_dir {image_dir} of {here} is not a folder")
    if metadata is not None and not metadata.is_file():
        raise UserError(f"{where}: metadata_file {metadata} of {here} is not a file")
    if not values["caption_separator"] and (
        values["shuffle_caption"] or values["keep_tokens"] or values["caption_tag_dropout_rate"]
    ):
        raise UserError(f"{where}: caption_separator is empty in {here}, but its tags are "
                        "shuffled, kept or dropped; tags need a separator")  # fmt: skip
    return SubsetSpec(
        image_dir=image_dir,
        metadata_file=metadata,
        num_repeats=values["num_repeats"],
        is_reg=values["is_reg"],
        class_tokens=values["class_tokens"],
        caption_extension=values["caption_extension"],
        caption_prefix=values["caption_prefix"],
        caption_suffix=values["caption_suffix"],
        center_crop=not values["random_crop"],
        random_flip=values["flip_aug"],
        caption_dropout=values["caption_dropout_rate"],
        shuffle_caption=values["shuffle_caption"],
        keep_tokens=values["keep_tokens"],
        caption_separator=values["caption_separator"],
        caption_tag_dropout_rate=values["caption_tag_dropout_rate"],
    )
