"""What scoring a generated dataset costs on this machine, per 1,000 images, for each metric of
evaluate_dataset.py (sampling/quality.py).

The networks are the real architectures at their real sizes with random weights (torch-fidelity's
Inception v3 and CLIP ViT-L/14, whose weights this machine may not have): the time is the same,
the numbers are not. Writes N random PNGs with captions, then times each stage on them:

- reading and decoding the images, and clean-fid's resize to 299 x 299 (every metric reads them);
- Inception features (FID, KID, precision and recall share them, and the reference needs them too);
- CLIP embeddings of the images and their captions (CLIP score, Vendi, near-duplicates);
- each metric itself, on 1,000 random features of the real widths (1,000 reference images).

    uv run python bench/quality_cost.py --images 32 --size 1024
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from PIL import Image

from sampling.quality import (
    Embedders,
    Pool3,
    clean_resize,
    clip_embeddings,
    clip_score,
    fid,
    kid,
    near_duplicates,
    precision_recall,
    read_set,
    vendi,
)

TOKENIZER = ROOT / "sdxl" / "configs" / "sdxl-base-1.0" / "tokenizer"


def random_networks() -> Embedders:
    """Inception v3 (torch-fidelity's, 2048 features) and CLIP ViT-L/14, randomly initialised."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    # torch-fidelity loads its weights in the constructor: skip that, keep the random ones
    load = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None  # type: ignore
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    fetch = inception_module.load_state_dict_from_url
    inception_module.load_state_dict_from_url = lambda *a, **k: {}
    try:
        inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).eval()
    finally:
        FeatureExtractorInceptionV3.load_state_dict = load  # type: ignore
        inception_module.load_state_dict_from_url = fetch
    config = CLIPConfig(
        text_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
        },
        projection_dim=768,
    )  # fmt: skip  (openai/clip-vit-large-patch14's sizes)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(), tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER)
    )
    names = {"inception": "random inception", "clip": "random ViT-L/14"}
    return Embedders(Pool3(inception), CLIPModel(config).eval(), processor, names)


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    nets = random_networks()
    n, per = args.images, 1000 / args.images
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            Image.effect_noise((args.size, args.size), 40 + i % 50).convert("RGB").save(
                Path(tmp) / f"{i:05d}.png"
            )
            (Path(tmp) / f"{i:05d}.txt").write_text(f"a photograph of a red circle, number {i}")
        samples = read_set(tmp)
        start = time.perf_counter()
        pictures = [s.image() for s in samples]
        rows.append((f"read and decode {args.size} px PNGs", time.perf_counter() - start))
        start = time.perf_counter()
        resized = [clean_resize(p) for p in pictures]
        rows.append(("clean-fid resize to 299 x 299", time.perf_counter() - start))
    with torch.no_grad():
        start = time.perf_counter()
        for b in range(0, n, args.batch_size):
            nets.inception(torch.stack(resized[b : b + args.batch_size]))
        rows.append(("Inception v3 features", time.perf_counter() - start))
        start = time.perf_counter()
        for b in range(0, n, args.batch_size):
            captions = [s.caption for s in samples[b : b + args.batch_size]]
            clip_embeddings(nets, pictures[b : b + args.batch_size], captions)
        rows.append(("CLIP ViT-L/14 image + caption embeddings", time.perf_counter() - start))
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {n} images of {args.size} px, batches of {args.batch_size}")  # fmt: skip
    for label, seconds in rows:
        print(f"  {label:48s} {seconds * per:8.1f} s per 1,000 images")

    # the metrics themselves, on 1,000 images' features against 1,000 reference images
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 2048, generator=g), torch.randn(1000, 2048, generator=g) + 0.1
    clip = torch.nn.functional.normalize(torch.randn(1000, 768, generator=g), dim=1)
    keys = [str(i) for i in range(1000)]
    metrics = {
        "FID (2048-d, torchmetrics, float64)": lambda: fid(a, b),
        "KID (100 subsets of 1,000)": lambda: kid(a, b),
        "precision and recall (k = 3)": lambda: precision_recall(a, b),
        "CLIP score": lambda: clip_score(clip, clip),
        "Vendi score": lambda: vendi(clip),
        "near-duplicates (all pairs)": lambda: near_duplicates(clip, keys, 0.95),
    }
    for label, compute in metrics.items():
        start = time.perf_counter()
        compute()
        print(f"  {label:48s} {time.perf_counter() - start:8.1f} s per 1,000 images")


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=32, help="how many images to time the networks on")
    p.add_argument("--size", type=int, default=1024, help="their width and height (SDXL: 1024)")
    p.add_argument("--batch-size", type=int, default=16, help="images per network call")
    main(p.parse_args())
