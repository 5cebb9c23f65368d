"""Weight updates as low-rank LoRAs: the singular value decomposition behind lora_tools.py's
resize, extract and combine.

Every adapter kind's update dW is a matrix once a convolution's (in, kh, kw) axes are flattened; its
SVD U S V^T, truncated to the k largest singular values, is the closest rank-k matrix to it in the
Frobenius norm (Eckart-Young). A LoRA of rank k holds it as up = U_k sqrt(S_k / scale) and down =
sqrt(S_k / scale) V_k^T, the singular values split evenly between the two, with up (out, k[, 1, 1])
and down (k, in[, kh, kw]) as kohya's conv LoRA has them.

The rank is given, or chosen per layer by kohya's dynamic rules (resize_lora.py):
- sv_ratio X: keep the singular values at least S_max / X;
- sv_fro X: the fewest that keep a fraction X of the Frobenius norm, sqrt(sum S_k^2 / sum S^2);
- sv_cumulative X: the fewest whose sum is a fraction X of the sum of all.
"""

from __future__ import annotations

import math
from typing import cast

import torch

from sdxl.lora import ADAPTERS, Adapter, Factored, Factors, LoRAModules
from sdxl.names import LoRAError

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")


def update_of(record: Adapter | Factors, shape: tuple[int, ...]) -> torch.Tensor:
    """The update dW (fp32, `shape`) an adapter adds to its layer's weight. A DoRA adapter's depends
    on the weight itself, which a LoRA file does not hold: refused."""
    if isinstance(record, Factors):
        kind = cast(type[Factored], ADAPTERS[record.kind])
        return kind.holding(record, shape).delta_weight().detach()
    if record.magnitude is not None:
        raise LoRAError(
            "a DoRA adapter's update depends on the base model's weights, which a LoRA file does "
            "not hold; merge it into the model instead (lora_tools.py merge)"
        )
    up, down = record.up.float(), record.down.float()
    # (out, r[, 1, 1]) @ (r, in[, kh, kw]) -> (out, in[, kh, kw])
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * (record.alpha / record.rank)


def chosen_rank(
    s: torch.Tensor, rank: int | None, dynamic: str | None = None, param: float | None = None
) -> int:
    """How many of the singular values `s` (descending) to keep: `rank`, or kohya's dynamic rule
    (at most `rank` when both are given); at least 1."""
    keep = len(s)
    if dynamic is not None:
        assert param is not None and dynamic in DYNAMIC, dynamic
        if dynamic == "sv_ratio":
            keep = int((s >= s[0] / param).sum())
        else:
            energy = s.square() if dynamic == "sv_fro" else s
            fraction = energy.cumsum(0) / energy.sum().clamp(min=1e-30)
            target = param**2 if dynamic == "sv_fro" else param
            keep = int((fraction < target - 1e-12).sum()) + 1
    if rank is not None:
        keep = min(keep, rank)
    return max(1, min(keep, len(s)))


def low_rank(
    delta: torch.Tensor,
    rank: int | None,
    dynamic: str | None = None,
    param: float | None = None,
    scale: float = 1.0,
) -> tuple[Adapter, float]:
    """The LoRA (alpha = scale x rank) closest to `delta`, and the fraction of its Frobenius norm
    kept."""
    out, flat = delta.shape[0], math.prod(delta.shape[1:])
    # (out, in[, kh, kw]) -> (out, in * kh * kw), in float64: exact up to the last fp32 bit
    u, s, vh = torch.linalg.svd(delta.reshape(out, flat).double(), full_matrices=False)
    k = chosen_rank(s, rank, dynamic, param)
    root = (s[:k] / scale).sqrt()
    up = (u[:, :k] * root).float().reshape(out, k, *[1] * (delta.dim() - 2))
    down = (root[:, None] * vh[:k]).float().reshape(k, *delta.shape[1:])
    total = s.square().sum()
    kept = float((s[:k].square().sum() / total).sqrt()) if total > 0 else 1.0
    return Adapter(down.contiguous(), up.contiguous(), scale * k), kept


def resize(
    modules: LoRAModules,
    shapes: dict[str, tuple[int, ...]],
    rank: int | None,
    dynamic: str | None = None,
    param: float | None = None,
) -> tuple[LoRAModules, dict[str, float]]:
    """Every adapter as a LoRA of `rank` (or by a dynamic rule) with its scale alpha / rank kept
    (1 for a LoKr of full matrices); and, per layer, the fraction of the update's norm kept."""
    out: LoRAModules = {}
    kept: dict[str, float] = {}
    for key, record in modules.items():
        scale = record.alpha / record.rank if record.rank else 1.0
        out[key], kept[key] = low_rank(update_of(record, shapes[key]), rank, dynamic, param, scale)
    return out, kept


def extract(
    base: dict[str, torch.Tensor],
    tuned: dict[str, torch.Tensor],
    rank: int,
    conv_rank: int | None = None,
    threshold: float = 0.0,
) -> LoRAModules:
    """A LoRA (alpha = rank) of the difference tuned - base of each layer's weight (by key): `rank`
    for Linear and 1x1 layers, `conv_rank` for larger convolutions (left out without it); a layer
    whose largest change is at most `threshold` is left out."""
    modules: LoRAModules = {}
    for key, w in base.items():
        diff = tuned[key].double() - w.double()
        if float(diff.abs().max()) <= threshold:
            continue
        spatial = diff.dim() == 4 and diff.shape[2:] != (1, 1)
        layer_rank = conv_rank if spatial else rank
        if layer_rank:
            modules[key] = low_rank(diff.float(), layer_rank)[0]
    return modules


def combine(
    inputs: list[tuple[LoRAModules, float]],
    shapes: dict[str, tuple[int, ...]],
    rank: int | None = None,
) -> LoRAModules:
    """Several adapters (each with its strength) as one LoRA per layer. Without `rank`, plain
    LoRAs are concatenated, which is exact: up = [s_i (alpha_i / r_i) up_i], down = [down_i], alpha =
    the summed rank. With `rank`, the summed update of each layer is factored to that rank (any
    kind goes in; alpha = rank)."""
    keys = list(dict.fromkeys(k for modules, _ in inputs for k in modules))
    out: LoRAModules = {}
    for key in keys:
        records = [(m[key], s) for m, s in inputs if key in m]
        if rank is not None:
            total = sum(s * update_of(r, shapes[key]) for r, s in records)
            out[key] = low_rank(cast(torch.Tensor, total), rank)[0]
            continue
        plain = [r for r, _ in records if isinstance(r, Adapter) and r.magnitude is None]
        if len(plain) < len(records):
            raise LoRAError(
                f"{key}: only plain LoRAs combine exactly (by concatenating ranks); give --rank "
                "to factor the sum of other kinds"
            )
        pairs = cast(list[tuple[Adapter, float]], records)
        ups = [s * (r.alpha / r.rank) * r.up.float() for r, s in pairs]
        down = torch.cat([r.down.float() for r, _ in pairs])
        out[key] = Adapter(down, torch.cat(ups, dim=1), float(down.shape[0]))
    return out
