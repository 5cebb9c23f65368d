"""Cached latents and text embeddings; aspect-ratio buckets."""

import json

import torch
from conftest import train_argv
from PIL import Image

import train_sdxl
from training.data_loader import SampleRules, TrainingData, assign_buckets, batches, bucket_sizes
from training.scan import scan


def run(tiny_model, out, *extra):
    argv = train_argv(
        tiny_model,
        out,
        "--use_lora",
        "--center_crop",
        "--max_train_steps",
        "4",
        "--caption_dropout",
        "0.3",
        *extra,
    )
    train_sdxl.main(train_sdxl.parse_args(argv))
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cached_run_has_the_same_losses(tiny_model, tmp_path):
    cache = tmp_path / "cache"
    plain = run(tiny_model, tmp_path / "plain")
    cached = run(
        tiny_model,
        tmp_path / "cached",
        "--cache_latents",
        "--cache_text_embeddings",
        "--cache_dir",
        str(cache),
    )
    # Same moments, same per-sample noise; fp32 on the CPU: stated tolerance 1e-6 relative (measured 0).
    assert len(plain) == len(cached) == 4
    for a, b in zip(plain, cached):
        assert abs(a - b) <= 1e-6 * abs(a), (plain, cached)
    latents = sorted((cache / "latents").iterdir())
    texts = sorted((cache / "text").iterdir())
    assert len(latents) == 8 and len(texts) == 9  # 8 captions + the empty prompt (caption dropout)
    # A second run reuses every entry.
    stamps = {p: p.stat().st_mtime_ns for p in latents + texts}
    run(
        tiny_model,
        tmp_path / "again",
        "--cache_latents",
        "--cache_text_embeddings",
        "--cache_dir",
        str(cache),
    )
    assert {
        p: p.stat().st_mtime_ns
        for p in sorted((cache / "latents").iterdir()) + sorted((cache / "text").iterdir())
    } == stamps


def test_changed_image_gets_a_new_cache_entry(tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (10 * i, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a square")
    cache = tmp_path / "cache"
    args = [
        "--data_dir",
        str(data),
        "--pretrained_model",
        str(tiny_model),
        "--use_lora",
        "--image_size",
        "32",
        "--precision",
        "fp32",
        "--max_train_steps",
        "1",
        "--cache_latents",
        "--cache_dir",
        str(cache),
    ]
    train_sdxl.main(train_sdxl.parse_args([*args, "--output_dir", str(tmp_path / "a")]))
    assert len(list((cache / "latents").iterdir())) == 2
    Image.new("RGB", (40, 40), (0, 200, 0)).save(data / "1.png")  # same name, new content
    train_sdxl.main(train_sdxl.parse_args([*args, "--output_dir", str(tmp_path / "b")]))
    assert len(list((cache / "latents").iterdir())) == 3  # the stale entry is not used


def test_bucket_table_and_assignment(tmp_path):
    sizes = bucket_sizes(128)
    assert (128, 128) in sizes and (192, 64) in sizes and (64, 192) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 128 * 128 for w, h in sizes)
    shapes = {"wide": (300, 100), "tall": (100, 300), "square": (120, 110)}
    for name, size in shapes.items():
        Image.new("RGB", size).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(name)
    records = scan(tmp_path)
    buckets = dict(zip([r.key for r in records], assign_buckets(records, 128)))
    assert buckets == {"square.png": (128, 128), "tall.png": (64, 192), "wide.png": (192, 64)}
    data = TrainingData(
        records, 128, rules=SampleRules(center_crop=True), buckets=[buckets[r.key] for r in records]
    )
    pixels, time_ids, _, _, _ = data[([r.key for r in records].index("wide.png"), 0)]
    # 300 x 100 covers 192 x 64 at scale 0.64: resized to 192 x 64, nothing cropped.
    assert pixels.shape == (3, 64, 192)
    assert time_ids.tolist() == [100, 300, 0, 0, 64, 192]


def test_every_batch_comes_from_one_bucket(tmp_path):
    for i in range(12):
        size = [(300, 100), (100, 300), (120, 120)][i % 3]
        Image.new("RGB", size, (i * 20, 0, 0)).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text(f"image {i}")
    records = scan(tmp_path)
    data = TrainingData(records, 128, buckets=assign_buckets(records, 128))
    seen = []
    for pixels, time_ids, _, ids, _ in batches(data, batch_size=2, epoch=0):
        assert len({tuple(t[4:].tolist()) for t in time_ids}) == 1
        assert pixels.shape[2:] == tuple(int(v) for v in time_ids[0, 4:])
        seen += ids.tolist()
    assert sorted(seen) == list(range(12))  # 4 per bucket: two full batches each
    # With two processes, each takes its half of the same global batches.
    halves = [list(batches(data, 1, 0, rank=r, world=2)) for r in (0, 1)]
    together = sorted(int(b[3]) for h in halves for b in h)
    assert together == list(range(12))


def test_bucketed_training_run(tiny_model, tmp_path, capsys):
    for i in range(4):
        Image.new("RGB", [(300, 100), (100, 300)][i % 2], (60 * i, 0, 0)).save(
            tmp_path / f"{i}.png"
        )
        (tmp_path / f"{i}.txt").write_text(f"shape {i}")
    argv = [
        "--data_dir",
        str(tmp_path),
        "--pretrained_model",
        str(tiny_model),
        "--output_dir",
        str(tmp_path / "out"),
        "--use_lora",
        "--image_size",
        "128",
        "--precision",
        "fp32",
        "--bucket",
        "--batch_size",
        "2",
        "--max_train_steps",
        "2",
    ]
    last = train_sdxl.main(train_sdxl.parse_args(argv))
    assert last.exists()
    out = capsys.readouterr().out
    assert "192 x 64    2" in out and "64 x 192   2" in out
    assert torch.load(last, weights_only=True)["step"] == 2
