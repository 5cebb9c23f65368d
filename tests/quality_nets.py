"""Small random networks in place of Inception and CLIP, for the scoring tests (no weights needed);
run as a script (under torchrun), evaluate_dataset.py with them."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FEATURES = 8


class TinyInception(torch.nn.Module):
    """uint8 images (B, 3, 299, 299) -> (B, 8) features: pooled, then a fixed random projection."""

    num_features = FEATURES

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(
            torch.randn(3 * 4 * 4, FEATURES, generator=g), requires_grad=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4)  # (B, 3, 4, 4)
        return torch.tanh(pooled.flatten(1) @ self.proj)


def tiny_clip(tokenizer_folder: Path):
    """A random CLIP (transformers) with the tiny SDXL's tokenizer, and its processor."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "vocab_size": 49408},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_folder),
    )  # fmt: skip
    return model, processor


def fake_embedders(tokenizer_folder: Path):
    from sampling.quality import Embedders

    model, processor = tiny_clip(tokenizer_folder)
    names = {"inception": "tiny random inception", "clip": "tiny random clip"}
    return Embedders(TinyInception(), model, processor, names)


if __name__ == "__main__":  # python quality_nets.py TOKENIZER_FOLDER evaluate_dataset.py's flags
    import evaluate_dataset

    nets = fake_embedders(Path(sys.argv[1]))
    evaluate_dataset.main(evaluate_dataset.parse_args(sys.argv[2:]), nets)
