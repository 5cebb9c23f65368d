"""Training data: folder and WebDataset sources, crops and micro-conditioning, bad data."""

import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from training.data_loader import SampleRules, TrainingData, prepare
from training.scan import DataError, scan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "shapes"


def write_tar(folder: Path, name: str, files: list[Path]) -> Path:
    path = folder / name
    with tarfile.open(path, "w") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    return path


def test_folder_and_webdataset_give_the_same_samples(tmp_path):
    files = sorted(EXAMPLES.iterdir())
    images = [f for f in files if f.suffix == ".png"]
    half = len(images) // 2
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, chunk in enumerate((images[:half], images[half:])):
        write_tar(
            shards,
            f"shard_{k:05d}.tar",
            [f for img in chunk for f in (img, img.with_suffix(".txt"))],
        )
    folder_records, tar_records = scan(EXAMPLES), scan(shards)
    assert len(folder_records) == len(tar_records) == len(images)
    a = TrainingData(folder_records, 32, rules=SampleRules(random_flip=True), seed=3)
    b = TrainingData(tar_records, 32, rules=SampleRules(random_flip=True), seed=3)
    for i in range(len(a)):
        pa, ida, ca, _, _ = a[(i, i)]
        pb, idb, cb, _, _ = b[(i, i)]
        assert torch.equal(pa, pb) and torch.equal(ida, idb) and ca == cb


def test_crop_and_micro_conditioning_for_a_known_image():
    # 200 x 100 (w x h): the shorter side (100) goes to 50, so the resized image is 100 x 50.
    image = Image.new("RGB", (200, 100))
    image.paste((255, 0, 0), (0, 0, 100, 100))  # left half red, right half black
    pixels, ids, _ = prepare(image, 50, center_crop=True, random_flip=False, g=torch.Generator())
    assert ids.tolist() == [100, 200, 0, 25, 50, 50]  # orig (h, w), crop (top, left), target (h, w)
    assert pixels.shape == (3, 50, 50)
    assert pixels[0, 25, 5] > 0.9 and pixels[0, 25, 45] < -0.9  # crop spans the red/black boundary
    # Random crops: the recorded left offset is where the crop really was.
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        pixels, ids, _ = prepare(image, 50, center_crop=False, random_flip=False, g=g)
        left = int(ids[3])
        red_columns = int((pixels[0, 25] > 0.9).sum())
        assert abs(red_columns - max(0, 50 - left)) <= 1
    # Flip-aware: after flipping, the left offset is measured in the flipped image.
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        flipped, ids, _ = prepare(image, 50, center_crop=False, random_flip=True, g=g)
        g = torch.Generator().manual_seed(seed)
        plain, plain_ids, _ = prepare(image, 50, center_crop=False, random_flip=False, g=g)
        if not torch.equal(flipped, plain):
            assert int(ids[3]) == 100 - int(plain_ids[3]) - 50
            assert torch.equal(flipped, plain.flip(-1))


def test_bad_files_are_skipped_and_named(tmp_path, caplog, capsys):
    for i in range(3):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    (tmp_path / "1.txt").unlink()
    (tmp_path / "2.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="training.scan"):
        records = scan(tmp_path)
    assert [r.key for r in records] == ["0.png"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("1.png" in m and "no caption" in m for m in messages)
    assert any("2.png" in m and "not a readable image" in m for m in messages)
    # The summary is printed (it was logged at INFO, which nothing showed).
    out = capsys.readouterr().out
    assert "data: 1 image-caption pairs" in out and "; 2 skipped" in out


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no usable image"):
        scan(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "missing")


def test_cli_empty_folder_is_one_line_error_before_loading(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "train_sdxl.py",
            "--data_dir",
            str(tmp_path),
            "--pretrained_model",
            "/nonexistent",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: no usable image + caption pairs")
    assert "Traceback" not in out.stderr
