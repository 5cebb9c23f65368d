"""Dataset generation at scale: processes, resumption after kill -9, shards, the COCO index, prompt
rows, several LoRAs."""

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from conftest import ROOT, train_argv
from PIL import Image

import generate_images
import train_sdxl
from sdxl.lora import apply_lora_to_unet, export_adapters
from sdxl.lora_formats import save_lora_file
from sdxl.unet import load_unet


def gen_argv(tiny_model, out, *extra):
    return [
        "--pretrained-model",
        str(tiny_model),
        "--output-dir",
        str(out),
        "--image-size",
        "64",
        *extra,
    ]


def gen(tiny_model, out, *extra):
    return generate_images.main(generate_images.parse_args(gen_argv(tiny_model, out, *extra)))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_run_finishes_with_two_processes_as_one_would(tiny_model, tmp_path):
    """kill -9 a one-process run part-way, finish it with two processes (gloo): the same files and
    the same pixels as one uninterrupted process, nothing missing, doubled or half-written.
    Every run uses one CPU thread a process (torchrun's default): the CPU's sums are ordered by the
    number of threads, which moves the last bits, and an image's pixel now and then."""
    flags = ["--prompt", "a red circle", "--num-images", "12", "--batch-size", "2", "--steps", "6"]
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen(tiny_model, reference, *flags)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "killed"
    argv = [
        sys.executable,
        "generate_images.py",
        *gen_argv(tiny_model, out, *flags, "--writers", "0"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while len(list(out.glob("*.png"))) < 3 and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done = len(list(out.glob("*.png")))
    assert 0 < done < 12  # killed in the middle
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    res = subprocess.run(
        [*torchrun, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir() if p.name[0].isdigit())
    assert names == sorted(p.name for p in reference.iterdir() if p.name[0].isdigit())
    assert len([n for n in names if n.endswith(".png")]) == 12 and not list(out.glob(".*.tmp"))
    for i in range(12):
        assert np.array_equal(pixels(out / f"{i:05d}.png"), pixels(reference / f"{i:05d}.png")), i
        assert json.loads((out / f"{i:05d}.json").read_text()) == json.loads(
            (reference / f"{i:05d}.json").read_text()
        )
    coco = json.loads((out / "annotations" / "captions.json").read_text())
    assert [im["id"] for im in coco["images"]] == list(range(12))


def test_webdataset_shards_are_atomic_rebuilt_and_trainable(tiny_model, tmp_path):
    out = tmp_path / "shards"
    flags = [
        "--prompt",
        "a blue square",
        "--num-images",
        "5",
        "--steps",
        "1",
        "--output-format",
        "webdataset",
        "--shard-size",
        "2",
    ]
    gen(tiny_model, out, *flags)
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(out / "shard-000001.tar") as tar:
        assert tar.getnames() == [f"00000{i}.{e}" for i in (2, 3) for e in ("png", "txt", "json")]
    index = json.loads((out / "annotations" / "index.json").read_text())
    assert index["shards"]["shard-000002.tar"] == ["000004"]
    # An unfinished shard (killed while it was written) is made again, the same bytes.
    before = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").unlink()
    (out / ".shard-000001.tar.k3j5.tmp").write_bytes(before[:1000])
    gen(tiny_model, out, *flags)
    assert (out / "shard-000001.tar").read_bytes() == before and not list(out.glob(".*.tmp"))
    # train_sdxl.py reads the shards directly.
    argv = train_argv(tiny_model, tmp_path / "run", "--use_lora", "--max_train_steps", "1")
    argv[argv.index("--data_dir") + 1] = str(out)
    assert train_sdxl.main(train_sdxl.parse_args(argv)).exists()


def test_the_coco_index_loads_in_pycocotools(tiny_model, tmp_path):
    from pycocotools.coco import COCO

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na green triangle\n")
    out = tmp_path / "gen"
    gen(tiny_model, out, "--prompt-file", str(prompts), "--steps", "1", "--image-format", "jpg")
    coco = COCO(str(out / "annotations" / "captions.json"))
    # What torchvision's CocoCaptions does with it: the sorted image ids, each image's file under
    # the root folder, and its captions.
    ids = sorted(coco.imgs.keys())
    assert ids == [0, 1]
    for i, prompt in zip(ids, ("a red circle", "a green triangle")):
        info = coco.loadImgs(i)[0]
        assert (
            Image.open(out / info["file_name"]).size == (info["width"], info["height"]) == (64, 64)
        )
        assert [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=i))] == [prompt]


def test_prompt_rows_with_seeds_sizes_counts_and_extra_columns(tiny_model, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "a red circle", "num_images": 2, "label": "circle"})
        + "\n"
        + json.dumps(
            {"prompt": "a wide square", "seed": 100, "width": 96, "height": 64, "label": "square"}
        )
        + "\n"
    )
    out = tmp_path / "gen"
    gen(
        tiny_model,
        out,
        "--prompt-file",
        str(rows),
        "--steps",
        "1",
        "--batch-size",
        "3",
        "--seed",
        "7",
    )
    metas = [json.loads((out / f"{i:05d}.json").read_text()) for i in range(3)]
    assert [m["seed"] for m in metas] == [7, 8, 100]
    assert [m["label"] for m in metas] == ["circle", "circle", "square"]
    assert Image.open(out / "00002.png").size == (96, 64)
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("prompt,negative_prompt,group\na cat,blurry,1\na dog,,2\n")
    out = tmp_path / "csv"
    gen(tiny_model, out, "--prompt-file", str(csv_file), "--steps", "1", "--images-per-prompt", "2")
    metas = [json.loads((out / f"{i:05d}.json").read_text()) for i in range(4)]
    assert [(m["prompt"], m["group"]) for m in metas] == [
        ("a cat", "1"),
        ("a cat", "1"),
        ("a dog", "2"),
        ("a dog", "2"),
    ]
    assert metas[0]["negative_prompt"] == "blurry" and metas[2]["negative_prompt"] == ""


def random_lora(tiny_model, path: Path, seed: int) -> Path:
    unet = load_unet(tiny_model / "unet")
    apply_lora_to_unet(unet, rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_lora_file(path, export_adapters({"unet": unet}), "kohya", {"rank": 4, "alpha": 8})
    return path


def test_several_loras_are_merged_in_turn(tiny_model, tmp_path):
    from sampling.inference import apply_lora
    from sdxl.checkpoint import read_lora_weights

    a, b = random_lora(tiny_model, tmp_path / "a.safetensors", 1), random_lora(
        tiny_model, tmp_path / "b.safetensors", 2
    )
    unet = load_unet(tiny_model / "unet")
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    apply_lora({"unet": unet}, read_lora_weights(a, unet), 0.8)
    apply_lora({"unet": unet}, read_lora_weights(b, unet), 0.5)
    expected = dict(base)
    for path, scale in ((a, 0.8), (b, 0.5)):
        for key, lora in read_lora_weights(path, unet).items():
            name = key.removeprefix("unet.")
            expected[f"{name}.weight"] = (
                expected[f"{name}.weight"] + scale * lora.alpha / lora.rank * lora.up @ lora.down
            )
    merged = unet.state_dict()
    assert merged.keys() == base.keys()  # plain Linear layers again
    for k in base:
        torch.testing.assert_close(
            merged[k], expected[k], rtol=0, atol=1e-6
        )  # fp32 sums, reordered
    out = tmp_path / "gen"
    gen(
        tiny_model,
        out,
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--lora-checkpoint",
        f"{a}:0.8",
        "--lora-checkpoint",
        f"{b}:0.5",
    )
    meta = json.loads((out / "00000.json").read_text())
    assert meta["loras"] == [["a.safetensors", 0.8], ["b.safetensors", 0.5]]


def test_the_writer_pool_writes_the_same_files(tiny_model, tmp_path):
    flags = ["--prompt", "a cat", "--num-images", "4", "--batch-size", "2", "--steps", "1"]
    gen(tiny_model, tmp_path / "pool", *flags, "--writers", "3")
    gen(tiny_model, tmp_path / "plain", *flags, "--writers", "0")
    for i in range(4):
        for ext in ("png", "txt", "json"):
            a, b = (tmp_path / d / f"{i:05d}.{ext}" for d in ("pool", "plain"))
            assert a.read_bytes() == b.read_bytes()
