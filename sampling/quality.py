"""What a set of images is worth: fidelity against real images, agreement with the captions, and
diversity. evaluate_dataset.py reports these; generate_images.py --evaluate runs it after a run.

- FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) between the Inception features of the set
  and of the reference (real images), as torchmetrics computes them. Images are resized to 299 x 299
  as clean-fid does (Parmar et al. 2022: PIL's bicubic filter on each channel in floating point),
  then rounded to 8 bits for torch-fidelity's Inception (the standard TF-FID weights).
- Precision and recall (Kynkaenniemi et al. 2019): the share of the set inside the reference's
  k-nearest-neighbour manifold (fidelity), and of the reference inside the set's (coverage), k = 3,
  on the same Inception features.
- CLIP score (Hessel et al. 2021): 100 x max(cos(image, caption), 0), averaged, as torchmetrics.
- Vendi score (Friedman and Dieng 2023) of the CLIP image embeddings: exp of the entropy of the
  eigenvalues of their similarity matrix / n: 1 when all images are one, n when all differ.
- Near-duplicates: pairs of images whose CLIP embeddings' cosine similarity exceeds a threshold.

The feature networks are arguments (`Embedders`), so tests inject small random ones.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdxl.device import Distributed
from sdxl.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
INCEPTION_SIZE = 299
K_NEAREST = 3


# ---------------------------------------------------------------------------------------------
# The images
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image of a set: where its bytes are (a file, or a tar member) and its caption."""

    key: str
    path: Path
    member: str | None = None  # the image's name inside the tar shard
    caption: str = ""

    def image(self) -> Image.Image:
        if self.member is None:
            return Image.open(self.path).convert("RGB")
        with tarfile.open(self.path) as tar:
            data = tar.extractfile(self.member).read()  # type: ignore[union-attr]
        return Image.open(io.BytesIO(data)).convert("RGB")


def read_set(path: str | Path) -> list[Sample]:
    """A folder of images (with `name.txt` captions where there are any, subfolders included,
    `annotations/` aside), or a folder of WebDataset shards (`key.png|jpg|webp` + `key.txt`)."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images or .tar shards")
    shards = sorted(folder.glob("*.tar"))
    samples = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in sorted(members):
                stem, ext = name.rsplit(".", 1) if "." in name else (name, "")
                if f".{ext.lower()}" in IMAGE_EXTENSIONS:
                    text = members.get(f"{stem}.txt")
                    caption = tar.extractfile(text).read().decode().strip() if text else ""  # type: ignore[union-attr]
                    samples.append(Sample(f"{shard.name}/{stem}", shard, name, caption))
    for image in [] if shards else sorted(folder.rglob("*")):
        inside = image.relative_to(folder).parts
        if image.suffix.lower() in IMAGE_EXTENSIONS and inside[0] != "annotations":
            caption_file = image.with_suffix(".txt")
            caption = caption_file.read_text().strip() if caption_file.is_file() else ""
            samples.append(Sample(image.relative_to(folder).as_posix(), image, None, caption))
    if not samples:
        raise UserError(f"no images in {folder} (png, jpg, jpeg, webp files, or .tar shards)")
    return samples


def clean_resize(image: Image.Image, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """clean-fid's resize: each channel as 32-bit floats through PIL's bicubic filter, clipped to
    [0, 255]; rounded to uint8 (3, size, size) for torch-fidelity's Inception."""
    channels = [
        np.asarray(Image.fromarray(np.asarray(image)[..., c].astype(np.float32), mode="F")
                   .resize((size, size), Image.Resampling.BICUBIC))
        for c in range(3)
    ]  # fmt: skip
    pixels = np.clip(np.stack(channels), 0, 255).round().astype(np.uint8)  # (3, size, size)
    return torch.from_numpy(pixels)


# ---------------------------------------------------------------------------------------------
# The feature networks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedders:
    """The networks behind the numbers: `inception` maps uint8 images (B, 3, 299, 299) to features
    (B, D); `clip_model` and `clip_processor` are a transformers CLIP model and its processor."""

    inception: torch.nn.Module
    clip_model: Any
    clip_processor: Any
    names: dict[str, str]  # what each is, for the report

    def to(self, device: torch.device) -> Embedders:
        return replace(self, inception=self.inception.to(device), clip_model=self.clip_model.to(device))  # fmt: skip


class Pool3(torch.nn.Module):
    """torch-fidelity's Inception as a function of images: the 2048 pool3 features (B, 2048)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0].reshape(len(images), -1)


def load_embedders(clip_name: str) -> Embedders:
    """torch-fidelity's Inception (the TF-FID weights) and a CLIP model from the Hugging Face cache,
    on the CPU; a machine without them gets one line naming what to fetch."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import (
            URL_INCEPTION_V3,
            FeatureExtractorInceptionV3,
        )
        from transformers import CLIPModel, CLIPProcessor
    except ImportError:
        raise UserError(
            "scoring needs torchmetrics and torch-fidelity: uv sync --extra evaluate"
        ) from None
    try:
        inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).eval()
    except Exception as e:
        raise UserError(
            f"cannot load the Inception weights ({type(e).__name__}); fetch {URL_INCEPTION_V3} "
            f"into {torch.hub.get_dir()}/checkpoints/"
        ) from None
    try:
        model = CLIPModel.from_pretrained(clip_name).eval()
        processor = CLIPProcessor.from_pretrained(clip_name)
    except OSError:
        raise UserError(
            f"CLIP model {clip_name} is not in the Hugging Face cache; fetch it with: "
            f"uv run hf download {clip_name}"
        ) from None
    names = {"inception": "torch-fidelity inception-v3-compat (TF FID weights), pool3 2048",
             "clip": clip_name}  # fmt: skip
    return Embedders(Pool3(inception), model, processor, names)


@dataclass
class Features:
    """A set's features: Inception (N, D), and L2-normalised CLIP image and caption embeddings."""

    keys: list[str]
    captions: list[str]
    inception: torch.Tensor
    clip_images: torch.Tensor | None = None
    clip_captions: torch.Tensor | None = None


@torch.no_grad()
def embed(
    samples: list[Sample],
    nets: Embedders,
    dist: Distributed,
    batch_size: int = 32,
    with_clip: bool = True,
) -> Features:
    """Every sample's features: each process embeds its share (every world-th sample) and the
    shares are gathered, in the samples' order, on every process."""
    mine = list(range(dist.rank, len(samples), dist.world))
    device = next(nets.inception.parameters()).device
    inception, images, captions = [], [], []
    for start in range(0, len(mine), batch_size):
        batch = [samples[i] for i in mine[start : start + batch_size]]
        pictures = [s.image() for s in batch]
        inception.append(
            nets.inception(torch.stack([clean_resize(p) for p in pictures]).to(device))
            .float()
            .cpu()
        )
        if with_clip:
            image, text = clip_embeddings(nets, pictures, [s.caption for s in batch])
            images.append(image)
            captions.append(text)
    parts = [torch.cat(inception)]
    if with_clip:
        parts += [torch.cat(images), torch.cat(captions)]
    gathered = [gather(torch.tensor(mine), part, len(samples), dist) for part in parts]
    return Features([s.key for s in samples], [s.caption for s in samples], *gathered)


def clip_embeddings(
    nets: Embedders, pictures: list[Image.Image], captions: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLIP embeddings of images and their captions (truncated to CLIP's context),
    with the inputs torchmetrics' CLIPScore gives the model (uint8 (3, H, W) tensors, padded text).
    """
    model, processor = nets.clip_model, nets.clip_processor
    device = next(model.parameters()).device
    tensors = [torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pictures]  # (3, H, W)
    pixels = processor(images=tensors, return_tensors="pt")["pixel_values"].to(device)
    image = _pooled(model.get_image_features(pixel_values=pixels))
    limit = model.config.text_config.max_position_embeddings
    text = processor(
        text=captions, return_tensors="pt", padding=True, truncation=True, max_length=limit
    )
    caption = _pooled(model.get_text_features(input_ids=text["input_ids"].to(device),
                                              attention_mask=text["attention_mask"].to(device)))  # fmt: skip
    return (
        torch.nn.functional.normalize(image.float(), dim=-1).cpu(),
        torch.nn.functional.normalize(caption.float(), dim=-1).cpu(),
    )


def _pooled(output: Any) -> torch.Tensor:
    """The projected embedding (transformers returns a tensor, or an output holding it)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def gather(
    indices: torch.Tensor, part: torch.Tensor, total: int, dist: Distributed
) -> torch.Tensor:
    """Every process's rows of `part` (this process's samples `indices`) in the samples' order."""
    if dist.world == 1:
        return part
    import torch.distributed as td

    shares: list[Any] = [None] * dist.world
    td.all_gather_object(shares, (indices, part))
    out = torch.empty(total, *part.shape[1:], dtype=part.dtype)
    for idx, rows in shares:
        out[idx] = rows
    return out


# ---------------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------------


class _Given(torch.nn.Module):
    """A 'feature extractor' for torchmetrics that hands back the features it is given."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(features: torch.Tensor, reference: torch.Tensor) -> float:
    """FID between two sets of Inception features (torchmetrics, in float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # (the features are gathered already: no sync of the metric's state between processes)
    metric = FrechetInceptionDistance(feature=_Given(features.shape[1]), sync_on_compute=False)
    metric.update(reference.double(), real=True)
    metric.update(features.double(), real=False)
    return float(metric.compute())


def kid(features: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over 100 subsets of at most 1,000) between two sets of Inception features."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(1000, len(features), len(reference))
    metric = KernelInceptionDistance(
        feature=_Given(features.shape[1]), subset_size=size, sync_on_compute=False
    )
    metric.update(reference.double(), real=True)
    metric.update(features.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # its subsets are drawn from the global generator
        mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall(
    features: torch.Tensor, reference: torch.Tensor, k: int = K_NEAREST, rows: int = 512
) -> tuple[float, float]:
    """(precision, recall): the share of `features` within the k-NN balls of `reference` (each
    ball's radius the distance to its k-th nearest neighbour in its own set), and the converse.
    Distances are taken `rows` at a time: 50,000 x 50,000 of them would not fit in memory."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        # (the 1st nearest is the point itself, at 0)
        return torch.cat([torch.cdist(x[i : i + rows], x).kthvalue(k + 1, dim=1).values
                          for i in range(0, len(x), rows)])  # fmt: skip

    def inside(x: torch.Tensor, manifold: torch.Tensor) -> float:
        r = radii(manifold)[None, :]
        hits = sum(int((torch.cdist(x[i : i + rows], manifold) <= r).any(dim=1).sum())
                   for i in range(0, len(x), rows))  # fmt: skip
        return hits / len(x)

    a, b = features.double(), reference.double()
    return inside(a, b), inside(b, a)


def clip_score(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """Each image's CLIP score against its caption: 100 x max(cosine, 0), from L2-normalised
    embeddings."""
    return 100 * (images * captions).sum(dim=1).clamp(min=0)


def vendi(embeddings: torch.Tensor) -> float:
    """The Vendi score of L2-normalised embeddings (N, D): exp(-sum(l log l)) over the eigenvalues
    l of X X^T / N; computed from the smaller Gram matrix (the nonzero eigenvalues are shared)."""
    x = embeddings.double()
    gram = x.T @ x if x.shape[0] > x.shape[1] else x @ x.T
    eigenvalues = torch.linalg.eigvalsh(gram / len(x)).clamp(min=0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()))


def near_duplicates(
    embeddings: torch.Tensor, keys: list[str], threshold: float, worst: int = 10, rows: int = 512
) -> tuple[float, list[tuple[str, str, float]]]:
    """(the share of image pairs whose cosine similarity exceeds `threshold`, the `worst` pairs),
    from `rows` rows of the similarity matrix at a time."""
    x, n = embeddings.double(), len(keys)
    over, best = 0, torch.empty(0, 3, dtype=torch.float64)  # (similarity, i, j) rows
    for start in range(0, n, rows):
        sim = x[start : start + rows] @ x.T  # (rows, n)
        i = torch.arange(start, start + len(sim))[:, None]
        sim = sim.masked_fill(torch.arange(n)[None, :] <= i, -2.0)  # each pair once: i < j
        over += int((sim > threshold).sum())
        top = sim.flatten().topk(min(worst, sim.numel()))
        pairs = torch.stack([top.values, (top.indices // n + start).double(),
                             (top.indices % n).double()], dim=1)  # fmt: skip
        best = torch.cat([best, pairs])
        best = best[best[:, 0].argsort(descending=True)[:worst]]
    listed = [(keys[int(i)], keys[int(j)], round(float(s), 4)) for s, i, j in best if s > threshold]
    return over / max(n * (n - 1) // 2, 1), listed


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def report(
    data: Features,
    reference: torch.Tensor | None,
    threshold: float,
    names: dict[str, str],
) -> dict[str, Any]:
    """Every number, with what is behind it (models, sizes, counts)."""
    assert data.clip_images is not None and data.clip_captions is not None
    out: dict[str, Any] = {"images": len(data.keys), "models": names}
    if reference is not None:
        out["reference_images"] = len(reference)
        out["fid"] = fid(data.inception, reference)
        out["kid_mean"], out["kid_std"] = kid(data.inception, reference)
        out["kid_subset_size"] = min(1000, len(data.inception), len(reference))
        out["k_nearest"] = K_NEAREST
        if min(len(data.inception), len(reference)) > K_NEAREST:
            out["precision"], out["recall"] = precision_recall(data.inception, reference)
        else:  # a k-th neighbour needs k others
            print(f"note: precision and recall need more than {K_NEAREST} images in each set")
    captioned = [i for i, c in enumerate(data.captions) if c]
    if captioned:
        scores = clip_score(data.clip_images[captioned], data.clip_captions[captioned])
        out["clip_score"] = float(scores.mean())
        out["clip_score_images"] = len(captioned)
    out["vendi"] = vendi(data.clip_images)
    groups: dict[str, list[int]] = {}
    for i, caption in enumerate(data.captions):
        groups.setdefault(caption, []).append(i)
    per_prompt = [vendi(data.clip_images[idx]) for idx in groups.values() if len(idx) > 1]
    if per_prompt:
        out["vendi_per_prompt_mean"] = sum(per_prompt) / len(per_prompt)
        out["prompts_with_several_images"] = len(per_prompt)
    share, pairs = near_duplicates(data.clip_images, data.keys, threshold)
    out |= {"duplicate_threshold": threshold, "near_duplicate_share": share, "worst_pairs": pairs}
    return out


def table(numbers: dict[str, Any]) -> str:
    """The report as printed: one line per number, with the better direction."""
    rows = [
        ("fid", "FID (lower is better)", "{:.3f}"),
        ("kid_mean", "KID x 1000 (lower is better)", None),
        ("precision", "precision (fidelity; higher is better)", "{:.3f}"),
        ("recall", "recall (coverage; higher is better)", "{:.3f}"),
        ("clip_score", "CLIP score (higher is better)", "{:.2f}"),
        ("vendi", "Vendi score, whole set (higher: more diverse)", "{:.2f}"),
        ("vendi_per_prompt_mean", "Vendi score per prompt, mean", "{:.2f}"),
        ("near_duplicate_share", "near-duplicate pairs (lower is better)", "{:.4%}"),
    ]
    lines = [f"{numbers['images']} images"]
    for key, label, form in rows:
        if key not in numbers:
            continue
        if key == "kid_mean":
            text = f"{1000 * numbers['kid_mean']:.3f} +- {1000 * numbers['kid_std']:.3f}"
        else:
            text = (form or "{}").format(numbers[key])
        lines.append(f"  {label:48s} {text}")
    lines += [f"  near-duplicate: {a} ~ {b} ({s})" for a, b, s in numbers["worst_pairs"]]
    return "\n".join(lines)


def save_reference(path: Path, features: torch.Tensor, names: dict[str, str]) -> None:
    """The reference's Inception features (all of them: KID and precision/recall need them, not
    only their mean and covariance), written atomically."""
    from sdxl.files import atomic_write

    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, inception=features.numpy().astype(np.float32), model=json.dumps(names))


def load_reference(path: Path, names: dict[str, str]) -> torch.Tensor:
    """Saved reference features, refused in one line if another network made them."""
    with np.load(path, allow_pickle=False) as saved:
        made_by = json.loads(str(saved["model"]))
        if made_by.get("inception") != names.get("inception"):
            raise UserError(f"{path} holds features of {made_by.get('inception')}, not of "
                            f"{names.get('inception')}; compute the reference again")  # fmt: skip
        return torch.from_numpy(saved["inception"]).float()


def evaluate(
    data: Path,
    reference: Path | None,
    load: Callable[[], Embedders],
    dist: Distributed,
    threshold: float = 0.95,
    batch_size: int = 32,
    save_to: Path | None = None,
    output: Path | None = None,
) -> dict[str, Any] | None:
    """Score the set in `data` (against `reference`: real images, or saved features); the first
    process prints the table and writes the report (default DATA/annotations/quality.json).
    The networks are loaded (`load`) once both sets are found, so an empty folder is told at
    once. Returns the numbers on the first process, None on the others."""
    from sdxl.files import write_json

    samples = read_set(data)
    real = read_set(reference) if reference is not None and reference.suffix != ".npz" else None
    nets = load().to(dist.device)
    features = embed(samples, nets, dist, batch_size)
    ref = None
    if reference is not None and real is None:
        ref = load_reference(reference, nets.names)
    elif real is not None:
        ref = embed(real, nets, dist, batch_size, with_clip=False).inception
        if save_to is not None and dist.main:
            save_reference(save_to, ref, nets.names)
    if not dist.main:
        return None
    numbers = report(features, ref, threshold, nets.names)
    numbers["data"], numbers["reference"] = str(data), str(reference) if reference else None
    target = output or data / "annotations" / "quality.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(numbers, target)
    print(table(numbers))
    print(f"report: {target}")
    return numbers
