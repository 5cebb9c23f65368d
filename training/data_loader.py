"""Image + caption data for SDXL training, as scanned by training/scan.py: decoding, crops,
buckets, and the batches of each optimizer step.

Each example becomes a square `image_size` crop in [-1, 1] plus SDXL's micro-conditioning, taken from
the real numbers: the source image's size, the crop's top-left corner in the resized image (mirrored
when the crop is flipped, so it describes what the model actually sees), and the training size.

Randomness (crop position, flip, caption dropout, and in training the noise and timestep) is drawn
from a generator seeded by (seed, sample id), the sample id being the sample's place in the run (epoch
and position in the epoch's shuffled order). So a run is the same whether it goes straight through,
resumes mid-way, or is split over several processes.
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sdxl.device import Distributed
from sdxl.files import cache_root
from training.scan import DataError, Record, scan
from training.specs import DataSpec, SubsetSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors Pillow raises for a file it cannot decode (truncated, corrupt, too large to be safe).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def record_bytes(record: Record) -> bytes:
    """The image file's bytes: the whole file, or its member's byte range inside the shard."""
    with open(record.path, "rb") as f:
        if record.offset < 0:
            return f.read()
        f.seek(record.offset)
        return f.read(record.length)


def load_mask(record: Record) -> Image.Image | None:
    """The record's loss mask as 8-bit grayscale (white: full weight), upright: its image's alpha
    channel, else its name.mask.png; None if it has neither."""
    with Image.open(io.BytesIO(record_bytes(record))) as file:
        im = ImageOps.exif_transpose(file)
        if "A" in im.getbands() or "transparency" in im.info:
            return im.convert("RGBA").getchannel("A")
    if record.mask is None:
        return None
    with Image.open(record.mask) as m:
        return eight_bit(ImageOps.exif_transpose(m)).convert("L")


def eight_bit(im: Image.Image) -> Image.Image:
    """A 16-bit or float grayscale image (mode I;16, I or F) scaled to 8 bits, not clipped (a
    50% grey stays 50%); other modes as they are."""
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    values = np.asarray(im, dtype=np.float64)
    scale = 255 / 65535 if im.mode.startswith("I") else (255 if values.max() <= 1 else 1)
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8))


def load_image(record: Record) -> Image.Image:
    """The record's image, upright (its EXIF orientation applied) and in 8-bit RGB. A 16-bit
    grayscale image is scaled down to 8 bits, not clipped; an alpha channel is dropped (the stored
    colours are used, as kohya does)."""
    with Image.open(io.BytesIO(record_bytes(record))) as file:
        return eight_bit(ImageOps.exif_transpose(file)).convert("RGB")


def prepare(
    image: Image.Image,
    size: int | tuple[int, int],
    center_crop: bool,
    random_flip: bool,
    g: torch.Generator,
    mask: Image.Image | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resize to cover the target (`size`, or (width, height) for a bucket), crop it, maybe flip;
    the mask, if given, goes through exactly the same. Returns the image (3, height, width) in
    [-1, 1], SDXL's time ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w), and the loss
    mask on the latent grid (1, height / 8, width / 8) in [0, 1] (ones without a mask)."""
    tw, th = (size, size) if isinstance(size, int) else size
    orig_w, orig_h = image.size
    scale = max(tw / orig_w, th / orig_h)
    w, h = max(tw, round(orig_w * scale)), max(th, round(orig_h * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    mask = mask.resize((w, h), Image.Resampling.BILINEAR) if mask is not None else None
    if center_crop:
        top, left = (h - th) // 2, (w - tw) // 2
    else:
        top = int(torch.randint(0, h - th + 1, (1,), generator=g))
        left = int(torch.randint(0, w - tw + 1, (1,), generator=g))
    image = image.crop((left, top, left + tw, top + th))
    mask = mask.crop((left, top, left + tw, top + th)) if mask is not None else None
    if random_flip and torch.rand(1, generator=g).item() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
        left = w - left - tw  # the crop, mirrored, as seen in the flipped resized image
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(th, tw, 3)
    pixels = pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, th, tw) in [-1, 1]
    time_ids = torch.tensor([orig_h, orig_w, top, left, th, tw], dtype=torch.float32)
    if mask is None:
        weights = torch.ones(1, th // 8, tw // 8)
    else:  # the mean of each 8 x 8 block of pixels: one weight per latent
        m = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).reshape(1, 1, th, tw)
        weights = F.avg_pool2d(m.float() / 255, 8)[0]  # (1, th / 8, tw / 8)
    return pixels, time_ids, weights


# ---------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ---------------------------------------------------------------------------------------------


def bucket_sizes(size: int | tuple[int, int], max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs with sides in multiples of 64 and at most the training size's area
    (size^2, or width x height): for each width the largest height, and the same turned on its
    side; aspect ratios up to `max_ratio`."""
    width, height = (size, size) if isinstance(size, int) else size
    area, sizes = width * height, set()
    side = math.isqrt(area)
    for w in range(64, 4 * side + 1, 64):
        h = area // w // 64 * 64
        if h >= 64 and max(w / h, h / w) <= max_ratio:
            sizes |= {(w, h), (h, w)}
    return sorted(sizes)


def assign_buckets(records: list[Record], size: int | tuple[int, int]) -> list[tuple[int, int]]:
    """Each record's bucket: the one whose aspect ratio is closest to the image's (in log space),
    from the upright size the scan recorded."""
    sizes = bucket_sizes(size)
    return [
        min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - math.log(r.size[0] / r.size[1])))
        for r in records
    ]


# (pixels (B, 3, H, W) or cached VAE moments (B, 8, h, w), time ids (B, 6), captions, sample ids
# (B,), loss masks on the latent grid (B, 1, h, w))
Batch = tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CaptionRules:
    """kohya's caption options, applied to each sample with its own generator: the caption split into
    tags at `separator`, the first `keep_tokens` left in place, each other tag dropped with
    probability `tag_dropout`, and the rest shuffled."""

    shuffle: bool = False
    keep_tokens: int = 0
    separator: str = ","
    tag_dropout: float = 0.0

    def apply(self, caption: str, g: torch.Generator) -> str:
        if not (self.shuffle or self.tag_dropout):
            return caption  # (and no random draws: the sample's other choices stay as they were)
        tags = [t.strip() for t in caption.split(self.separator) if t.strip()]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
        if self.tag_dropout:
            keep = torch.rand(len(rest), generator=g) >= self.tag_dropout
            rest = [t for t, k in zip(rest, keep.tolist()) if k]
        if self.shuffle:
            rest = [rest[i] for i in torch.randperm(len(rest), generator=g).tolist()]
        joiner = ", " if self.separator == "," else self.separator
        return joiner.join(kept + rest)


PLAIN_CAPTIONS = CaptionRules()


@dataclass(frozen=True)
class SampleRules:
    """How a sample is drawn from its image and caption: its crop, flip and caption dropout, and
    kohya's caption rules (one set for a folder; one per subset of a kohya dataset config)."""

    center_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = 0.0  # the empty prompt, for classifier-free guidance
    captions: CaptionRules = PLAIN_CAPTIONS


def split_validation(records: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """The training records and a fixed validation subset (the same for every run with this seed)."""
    if fraction <= 0:
        return records, []
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    val = set(order[: max(1, int(len(records) * fraction))])
    return [r for i, r in enumerate(records) if i not in val], [
        r for i, r in enumerate(records) if i in val
    ]


def bucket_table(buckets: list[tuple[int, int]]) -> str:
    """How many images each bucket holds, as printed at the start of a bucketed run."""
    counts: dict[tuple[int, int], int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    lines = [f"  {w:5d} x {h:<5d} {n}" for (w, h), n in sorted(counts.items())]
    return "\n".join(["aspect-ratio buckets (width x height: images):", *lines])


class TrainingData(torch.utils.data.Dataset):
    """Map-style view of the records. Item (i, sample_id) -> (pixels, time_ids, caption, sample_id);
    the sample id (epoch * N + position in the epoch's order) seeds every random choice for it.

    The records may come from several datasets (kohya's dataset config): `groups` gives each
    record's dataset, `batch_sizes` each dataset's batch size, and every batch comes from one
    dataset. One dataset (the default) takes the run's --batch_size."""

    def __init__(
        self,
        records: list[Record],
        size: int | tuple[int, int],
        *,
        rules: SampleRules | list[SampleRules] = SampleRules(),
        seed: int = 0,
        buckets: list[tuple[int, int]] | None = None,
        masked: bool = False,
        first_id: int = 0,
        groups: list[int] | None = None,
        batch_sizes: tuple[int, ...] | None = None,
    ):
        size = (size, size) if isinstance(size, int) else size  # (width, height)
        self.records, self.size, self.seed, self.masked = records, size, seed, masked
        # Each record's rules, (width, height) target (its bucket, or the training size) and
        # dataset.
        self.rules = rules if isinstance(rules, list) else [rules] * len(records)
        self.targets = buckets or [size] * len(records)
        self.groups = groups or [0] * len(records)
        self.batch_sizes = batch_sizes
        # Where its sample ids start: regularisation data starts far from the training data, so
        # that their samples' seeds (and noise) differ.
        self.first_id = first_id
        self.unreadable: set[str] = set()  # keys already warned about

    def batch_size(self, group: int, default: int) -> int:
        """The batch size of a dataset: its own, or the run's."""
        return self.batch_sizes[group] if self.batch_sizes else default

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(
        self, item: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, str, int, torch.Tensor]:
        """(image, time ids, caption, sample id, loss mask). A file that cannot be decoded (a
        truncated JPEG, say) is skipped with one warning and the next record of its kind takes
        its place, so that a bad file found mid-run never ends the run."""
        i, sample_id = item
        kind = (self.groups[i], self.targets[i])  # the batch's shape holds for the replacement
        for j in itertools.islice(itertools.count(i), len(self.records)):
            j %= len(self.records)
            if (self.groups[j], self.targets[j]) != kind:
                continue
            g = torch.Generator().manual_seed(sample_seed(self.seed, sample_id))
            # Caption dropout: the empty prompt, so the model also learns the unconditional branch
            # of classifier-free guidance. Drawn first, so it does not depend on the image.
            rules = self.rules[j]
            dropped = torch.rand(1, generator=g).item() < rules.caption_dropout
            caption = "" if dropped else rules.captions.apply(self.records[j].caption, g)
            try:
                image, time_ids, mask = self.image(j, g)
            except UNREADABLE as e:
                if self.records[j].key not in self.unreadable:
                    self.unreadable.add(self.records[j].key)
                    log.warning(
                        "skipping %s: %s (the next image takes its place)", self.records[j].key, e
                    )
                continue
            return image, time_ids, caption, sample_id, mask
        raise DataError(f"none of the {len(self.records)} images can be decoded")

    def image(self, i: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Record i's training input, time ids and loss mask, with its random crop and flip drawn
        from g (the mask is all ones unless the run trains with --masked_loss)."""
        record, rules = self.records[i], self.rules[i]
        mask = load_mask(record) if self.masked else None
        return prepare(
            load_image(record), self.targets[i], rules.center_crop, rules.random_flip, g, mask
        )


def joined(sets: list[TrainingData], batch_sizes: list[int], first_id: int = 0) -> TrainingData:
    """Several datasets as one, each its own group with its own batch size."""
    return TrainingData(
        [r for d in sets for r in d.records],
        sets[0].size,
        rules=[x for d in sets for x in d.rules],
        seed=sets[0].seed,
        buckets=[t for d in sets for t in d.targets],
        masked=sets[0].masked,
        first_id=first_id,
        groups=[k for k, d in enumerate(sets) for _ in d.records],
        batch_sizes=tuple(batch_sizes),
    )


REGULARISATION_IDS = 2**40  # the first sample id of the regularisation data


def caption_rules(spec: DataSpec | SubsetSpec) -> SampleRules:
    """The sample rules a folder's flags, or a dataset config's subset, give."""
    return SampleRules(
        center_crop=spec.center_crop,
        random_flip=spec.random_flip,
        caption_dropout=spec.caption_dropout,
        captions=CaptionRules(
            shuffle=spec.shuffle_caption,
            keep_tokens=spec.keep_tokens,
            separator=spec.caption_separator,
            tag_dropout=spec.caption_tag_dropout_rate,
        ),
    )


def shaped(
    pairs: list[tuple[Record, SampleRules]],
    size: tuple[int, int],
    bucket: bool,
    spec: DataSpec,
    first_id: int = 0,
) -> TrainingData:
    """Training data of (record, rules) pairs: each record as often as it repeats (kohya's "10_name"
    folders, or num_repeats: an epoch sees it that often, each time with its own crop, flip and
    noise), in its bucket (or at `size`)."""
    pairs = [pair for pair in pairs for _ in range(pair[0].repeats)]
    records = [r for r, _ in pairs]
    return TrainingData(
        records,
        size,
        rules=[rules for _, rules in pairs],
        seed=spec.seed,
        buckets=assign_buckets(records, size) if bucket else None,
        masked=spec.masked_loss,
        first_id=first_id,
    )


def validation_data(records: list[Record], size: tuple[int, int], spec: DataSpec) -> TrainingData:
    """Each validation record once, centre-cropped, as its caption says."""
    return TrainingData(
        records, size, rules=SampleRules(center_crop=True), seed=spec.seed, masked=spec.masked_loss
    )


def read_data(
    spec: DataSpec,
) -> tuple[list[Record], TrainingData, TrainingData, TrainingData | None]:
    """Scan the spec's folders (with the scan index in the cache folder), hold out the validation
    split, and shape the sets: (training records, training, validation and regularisation data).
    With a kohya dataset config, `read_datasets`."""
    if spec.datasets:
        return read_datasets(spec)
    index = (spec.cache_dir or cache_root() / "cache") / "scan"
    records = scan(spec.data_dir, index, caption_extension=spec.caption_extension)
    reg = (
        scan(spec.reg_data_dir, index, caption_extension=spec.caption_extension)
        if spec.reg_data_dir
        else []
    )
    if spec.masked_loss:
        check_masks(records, spec.data_dir)
    train, val = split_validation(records, spec.validation_split, spec.seed)
    rules = caption_rules(spec)
    return (
        records,
        shaped([(r, rules) for r in train], spec.size, spec.bucket, spec),
        validation_data(val, spec.size, spec),
        (
            shaped([(r, rules) for r in reg], spec.size, spec.bucket, spec, REGULARISATION_IDS)
            if reg
            else None
        ),
    )


def read_datasets(
    spec: DataSpec,
) -> tuple[list[Record], TrainingData, TrainingData, TrainingData | None]:
    """`read_data` for the datasets of a kohya dataset config: each subset scanned with its own
    caption options and rules, each dataset's validation split held out, and the datasets joined
    (each keeps its size, buckets and batch size). The `is_reg` subsets of all datasets are the
    regularisation data, paired with the training steps as --reg_data_dir's are."""
    index = (spec.cache_dir or cache_root() / "cache") / "scan"
    records: list[Record] = []
    train, val, reg = [], [], []  # (dataset, its data)
    for k, dataset in enumerate(spec.datasets):
        pairs: dict[bool, list[tuple[Record, SampleRules]]] = {False: [], True: []}
        for subset in dataset.subsets:
            found = subset_records(subset, index)
            if spec.masked_loss and found:
                check_masks(found, subset.image_dir)
            pairs[subset.is_reg] += [(r, caption_rules(subset)) for r in found]
        kept, held = split_validation(pairs[False], dataset.validation_split, spec.seed)
        records += [r for r, _ in pairs[False]]
        train.append((k, shaped(kept, dataset.size, dataset.bucket, spec)))
        val.append((k, validation_data([r for r, _ in held], dataset.size, spec)))
        if pairs[True]:
            reg.append((k, shaped(pairs[True], dataset.size, dataset.bucket, spec)))
    if not records:
        raise DataError("the dataset config's subsets hold no training images (only is_reg "
                        "ones); give a subset without is_reg")  # fmt: skip

    def join(sets: list[tuple[int, TrainingData]], first_id: int = 0) -> TrainingData:
        sizes = [spec.datasets[k].batch_size for k, _ in sets]
        return joined([d for _, d in sets], sizes, first_id)

    return (
        records,
        join(train),
        join(val),
        join(reg, REGULARISATION_IDS) if reg else None,
    )


def subset_records(subset: SubsetSpec, index: Path) -> list[Record]:
    """A dataset-config subset's records: the images directly in its folder, captioned by their
    caption files (or `class_tokens`), or by its metadata file; with its prefix, suffix and
    repeats, and the folder's name as their concept."""
    if subset.num_repeats == 0:
        log.warning("%s: num_repeats = 0, so its images are left out", subset.image_dir)
        return []
    metadata = subset.metadata_file
    found = scan(
        subset.image_dir,
        index,
        caption_extension=subset.caption_extension,
        subfolders=False,
        class_tokens="" if metadata else subset.class_tokens,
    )
    if metadata is not None:
        found = with_metadata(found, metadata, subset.image_dir, subset.caption_separator)
    prefix = subset.caption_prefix + " " if subset.caption_prefix else ""
    suffix = " " + subset.caption_suffix if subset.caption_suffix else ""
    return [
        replace(
            r,
            caption=prefix + r.caption + suffix,
            repeats=subset.num_repeats,
            concept=subset.image_dir.name,
        )
        for r in found
    ]


def with_metadata(records: list[Record], path: Path, folder: Path, separator: str) -> list[Record]:
    """kohya's fine-tuning metadata (JSON {image: {"caption", "tags"}}, or JSONL lines with
    "image_path"): the records it names, captioned "caption<separator>tags". An image is named by
    its path (absolute, or from the folder) with or without its extension."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".jsonl":
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            table = {line["image_path"]: line for line in lines}
        else:
            table = json.loads(text)
        entries = {
            (Path(key) if Path(key).is_absolute() else folder / key).resolve(): value
            for key, value in table.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"metadata_file {path}: not kohya's metadata JSON ({e!r})") from None
    named = []
    for r in records:
        where = r.path.resolve()
        entry = entries.get(where, entries.get(where.with_suffix("")))
        if isinstance(entry, dict):
            parts = [entry.get("caption") or "", entry.get("tags") or ""]
            named.append(replace(r, caption=separator.join(p for p in parts if p)))
    if not named:
        raise DataError(f"metadata_file {path} names none of the images in {folder}")
    return named


def check_masks(records: list[Record], folder: Path) -> None:
    """--masked_loss: each name.mask.png has its image's size (one line naming both files, else);
    an image whose mask (file or alpha channel) is all zero trains nothing, which is warned of,
    and if every mask is empty the run stops."""
    empty = []
    for r in records:
        if r.mask is not None and r.mask_size != r.size:
            raise DataError(
                f"the mask {r.mask} is {r.mask_size[0]}x{r.mask_size[1]} but its image {r.path} is "
                f"{r.size[0]}x{r.size[1]}; give the mask the image's size"
            )
        try:
            mask = load_mask(r)
        except UNREADABLE:
            continue  # the image itself is unreadable: skipped when a batch asks for it
        if mask is not None and mask.getextrema()[1] == 0:
            empty.append(r.key)
    if empty and len(empty) == len(records):
        raise DataError(
            f"every loss mask in {folder} is empty (all zero, or a fully transparent alpha), so "
            "--masked_loss would train nothing; check the masks, or drop --masked_loss"
        )
    for key in empty:
        log.warning("%s: its loss mask is empty (all zero), so it trains nothing", key)


def paired_steps(
    reg: TrainingData | None,
    batch_size: int,
    grad_accum: int,
    step: int,
    dist: Distributed,
    workers: int,
) -> Iterator[list[Batch]]:
    """The regularisation micro-batches of each optimizer step from `step` on: one regularisation
    step a training step, epoch after epoch of its own, so where it stands follows from the step
    count (nothing more to save for a resume). No regularisation data: no micro-batches."""
    if reg is None:
        return itertools.repeat([])
    per_epoch = steps_per_epoch(reg, batch_size, dist.world, grad_accum)
    epoch, done = divmod(step, per_epoch)
    _, chunks = epoch_chunks(reg, batch_size, epoch, dist.world)
    position = sum(len(c) for c in chunks[: done * grad_accum])
    steps = optimizer_steps(reg, batch_size, grad_accum, epoch, position, dist, workers)
    return (micro for micro, _, _ in steps)


def sample_seed(seed: int, sample_id: int) -> int:
    """A seed for one sample's random choices (crop, flip, dropout, noise, timestep)."""
    return (seed * 2_654_435_761 + sample_id * 40_503 + 1) % 2**63


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch (the same on every process and after a resume)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def epoch_chunks(
    data: TrainingData, batch_size: int, epoch: int, world: int
) -> tuple[list[int], list[list[int]]]:
    """One epoch's shuffled order, and its global batches: lists of positions in that order.

    The order is cut into global batches of a dataset's batch size x `world` samples, each from one
    dataset and bucket (all samples share one size when there are no buckets), and the global
    batches are shuffled. Samples that do not fill a global batch of their kind are dropped."""
    order = epoch_order(len(data), data.seed, epoch)
    by_kind: dict[tuple[int, tuple[int, int]], list[int]] = {}
    for p, i in enumerate(order):
        by_kind.setdefault((data.groups[i], data.targets[i]), []).append(p)
    chunks = []
    for (group, _), positions in by_kind.items():
        n = data.batch_size(group, batch_size) * world
        chunks += [positions[b : b + n] for b in range(0, len(positions) - n + 1, n)]
    if len(by_kind) > 1:  # interleave the buckets and datasets
        perm = torch.randperm(
            len(chunks), generator=torch.Generator().manual_seed(data.seed * 31 + epoch)
        )
        chunks = [chunks[k] for k in perm.tolist()]
    return order, chunks


def batches(
    data: TrainingData,
    batch_size: int,
    epoch: int,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
) -> Iterator[Batch]:
    """This process's batches of one epoch (`epoch_chunks`), from sample `start` of the epoch (a
    resumed epoch): process `rank` takes its slice of each global batch, so the data seen per step
    does not depend on how many processes share it."""
    order, chunks = epoch_chunks(data, batch_size, epoch, world)
    ends = list(itertools.accumulate(len(c) for c in chunks))
    first = bisect.bisect_right(ends, start)  # a resumed epoch: the global batches taken
    sampler = []
    for chunk in chunks[first:]:
        b = len(chunk) // world
        ids = [(order[p], data.first_id + epoch * len(order) + p) for p in chunk]
        sampler.append(ids[rank * b : (rank + 1) * b])
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=sampler, num_workers=workers, collate_fn=collate
    )
    return iter(loader)


def steps_per_epoch(data: TrainingData, batch_size: int, world: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch: full global batches of each dataset and bucket, then full
    accumulations (an incomplete accumulation at the end of the epoch is dropped)."""
    counts: dict[tuple[int, tuple[int, int]], int] = {}
    for kind in zip(data.groups, data.targets):
        counts[kind] = counts.get(kind, 0) + 1
    global_batches = sum(
        n // (data.batch_size(group, batch_size) * world) for (group, _), n in counts.items()
    )
    steps = global_batches // grad_accum
    if steps == 0:
        raise DataError(
            f"{len(data)} training images are fewer than --batch_size x processes x "
            f"--gradient_accumulation_steps = {batch_size * world * grad_accum}; lower them or add images"
        )
    return steps


def optimizer_steps(
    data: TrainingData,
    batch_size: int,
    grad_accum: int,
    epoch: int,
    position: int,
    dist: Distributed,
    workers: int = 0,
) -> Iterator[tuple[list[Batch], int, int]]:
    """The micro-batches of every optimizer step from (epoch, position) on, epoch after epoch,
    without end. Yields (micro-batches, epoch, position): the step's `grad_accum` batches of this
    process, and where the run stands after the step (the next epoch and 0 after an epoch's last
    step). `position` counts the samples of the epoch's order consumed by all processes."""
    per_epoch = steps_per_epoch(data, batch_size, dist.world, grad_accum)
    while True:
        _, chunks = epoch_chunks(data, batch_size, epoch, dist.world)
        ends = list(itertools.accumulate(len(c) for c in chunks))
        done = bisect.bisect_right(ends, position)  # global batches already taken
        loader = batches(data, batch_size, epoch, position, dist.rank, dist.world, workers)
        for step in range(done // grad_accum, per_epoch):
            micro = [next(loader) for _ in range(grad_accum)]
            epoch_done = step == per_epoch - 1
            position = ends[(step + 1) * grad_accum - 1]
            yield micro, epoch + epoch_done, 0 if epoch_done else position
        epoch, position = epoch + 1, 0


def fixed_batches(data: TrainingData, batch_size: int) -> list[Batch]:
    """Every item once, in order, each with its index as sample id (validation); a batch holds
    items of one dataset and size."""
    runs = itertools.groupby(range(len(data)), key=lambda i: (data.groups[i], data.targets[i]))
    out = []
    for (group, _), items in runs:
        indices, n = list(items), data.batch_size(group, batch_size)
        out += [
            collate([data[(i, i)] for i in indices[s : s + n]]) for s in range(0, len(indices), n)
        ]
    return out


def collate(items: list[tuple[torch.Tensor, torch.Tensor, str, int, torch.Tensor]]) -> Batch:
    pixels, time_ids, captions, ids, masks = zip(*items)
    stacked = torch.stack(pixels), torch.stack(time_ids)
    return *stacked, list(captions), torch.tensor(ids), torch.stack(masks)
