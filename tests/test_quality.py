"""What a generated dataset is worth (evaluate_dataset.py, sampling/quality.py) and the index files
that dataset tools read (sampling/outputs.py: write_index)."""

import json
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from quality_nets import TinyInception, fake_embedders

import evaluate_dataset
import generate_images
from sampling.quality import (
    clean_resize,
    clip_score,
    embed,
    fid,
    kid,
    near_duplicates,
    precision_recall,
    read_set,
    vendi,
)
from sdxl.device import Distributed
from sdxl.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gen(tiny_model, out, *extra):
    argv = ["--pretrained-model", str(tiny_model), "--output-dir", str(out), "--image-size", "64"]
    return generate_images.main(generate_images.parse_args([*argv, "--steps", "1", *extra]))


# -- the index files ----------------------------------------------------------------------------


def test_each_shard_has_a_parquet_index_that_follows_resumes_and_extensions(tiny_model, tmp_path):
    import pyarrow.parquet as pq

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "a red circle", "num_images": 3, "label": "circle"}) + "\n"
        + json.dumps({"prompt": "a blue square", "seed": 100, "group": 2}) + "\n"
    )  # fmt: skip
    out = tmp_path / "shards"
    flags = ["--prompt-file", str(rows), "--output-format", "webdataset", "--shard-size", "2"]

    def check(count):
        tars = sorted(out.glob("shard-*.tar"))
        assert len(tars) == (count + 1) // 2
        for tar_path in tars:
            table = pq.read_table(tar_path.with_suffix(".parquet")).to_pylist()
            with tarfile.open(tar_path) as tar:
                metas = {
                    m.name.split(".")[0]: json.loads(tar.extractfile(m).read())
                    for m in tar.getmembers()
                    if m.name.endswith(".json")
                }
                names = tar.getnames()
            assert [row["key"] for row in table] == sorted(metas)  # one row per sample
            for row in table:
                meta = metas[row["key"]]
                assert row["file_name"] == f"{row['key']}.png" and row["file_name"] in names
                assert (row["caption"], row["seed"]) == (meta["prompt"], meta["seed"])
                assert (row["width"], row["height"]) == (64, 64)
                assert row.get("label") == meta.get("label") and row.get("group") == meta.get(
                    "group"
                )

    gen(tiny_model, out, *flags)
    check(4)
    # killed while shard 1 was written: it is rebuilt, and so is its index
    (out / "shard-000001.tar").unlink()
    gen(tiny_model, out, *flags)
    check(4)
    # extended to 6 images: a new shard, with its index
    gen(tiny_model, out, *flags, "--num-images", "6")
    check(6)


def test_a_generated_folder_loads_as_a_hugging_face_imagefolder(tiny_model, tmp_path):
    from datasets import load_dataset

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na green triangle\n")
    out = tmp_path / "gen"
    gen(tiny_model, out, "--prompt-file", str(prompts), "--images-per-prompt", "2")
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == [f"{i:05d}.png" for i in range(4)]
    data = load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(data) == 4
    got = sorted((row["caption"], row["seed"], row["image"].size) for row in data)
    assert got == sorted(
        (p, s, (64, 64)) for p, s in zip(["a red circle"] * 2 + ["a green triangle"] * 2, range(4))
    )
    # extended: the index covers the new images too
    gen(
        tiny_model,
        out,
        "--prompt-file",
        str(prompts),
        "--images-per-prompt",
        "2",
        "--num-images",
        "6",
    )
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 6


# -- the numbers --------------------------------------------------------------------------------


def image_set(folder, n, shift=0.0, seed=0, captions=("a red circle", "a blue square")):
    """n random images (smooth colour fields, 64 px) with captions, brightened by `shift`."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        small = torch.rand(3, 4, 4, generator=g) * (1 - shift) + shift
        big = torch.nn.functional.interpolate(small[None], size=64, mode="bilinear")[0]
        pixels = (big.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(captions[i % len(captions)])
    return folder


@pytest.fixture(scope="module")
def nets(tiny_model):
    return fake_embedders(tiny_model / "tokenizer")


ONE = Distributed(0, 1, torch.device("cpu"))


def test_fid_kid_and_clip_score_equal_torchmetrics_with_the_same_networks(nets, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    from torchmetrics.multimodal.clip_score import CLIPScore

    gen, ref = read_set(image_set(tmp_path / "g", 24, 0.2, 1)), read_set(
        image_set(tmp_path / "r", 30)
    )
    ours, theirs = embed(gen, nets, ONE, 7), embed(ref, nets, ONE, 7, with_clip=False)

    def images(samples):  # (N, 3, 299, 299) uint8, clean-fid's resize
        return torch.stack([clean_resize(s.image()) for s in samples])

    reference_fid = FrechetInceptionDistance(feature=TinyInception())
    reference_fid.update(images(ref), real=True)
    reference_fid.update(images(gen), real=False)
    # float32 features (ours in batches of 7, theirs in one) and float64 statistics: bar 1e-6 relative
    assert fid(ours.inception, theirs.inception) == pytest.approx(float(reference_fid.compute()), rel=1e-6)  # fmt: skip
    reference_kid = KernelInceptionDistance(feature=TinyInception(), subset_size=24)
    reference_kid.update(images(ref), real=True)
    reference_kid.update(images(gen), real=False)
    torch.manual_seed(0)
    mean, std = reference_kid.compute()

    # KID is a difference of kernel means (it cancels): bar 1e-6 absolute (its printed 3 decimals
    # are of KID x 1000)
    assert kid(ours.inception, theirs.inception) == pytest.approx((float(mean), float(std)), abs=1e-6)  # fmt: skip
    class Projected(torch.nn.Module):
        """torchmetrics 1.9 expects the embeddings as tensors; transformers 5 returns outputs that
        hold them (pooler_output): the same model, its answers unwrapped."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    score = CLIPScore(model_name_or_path=lambda: (Projected(nets.clip_model), nets.clip_processor))
    pictures = [torch.from_numpy(np.array(s.image())).permute(2, 0, 1) for s in gen]
    score.update(pictures, [s.caption for s in gen])
    ours_score = clip_score(ours.clip_images, ours.clip_captions).mean()
    # float32 embeddings, normalised in another order: stated bar 1e-5 relative
    assert float(ours_score) == pytest.approx(float(score.compute()), rel=1e-5)


def test_fid_is_0_for_a_set_against_itself_and_grows_with_a_shift(nets, tmp_path):
    base = embed(read_set(image_set(tmp_path / "a", 40)), nets, ONE).inception
    assert abs(fid(base, base)) < 1e-6
    shifted = [fid(embed(read_set(image_set(tmp_path / f"s{s}", 40, s, 5)), nets, ONE).inception, base)
               for s in (0.0, 0.3, 0.6)]  # fmt: skip
    assert 0 < shifted[0] < shifted[1] < shifted[2]


def test_precision_and_recall_are_1_for_one_set_and_fall_for_disjoint_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g)
    assert precision_recall(a, a) == (1.0, 1.0)
    far = torch.randn(200, 8, generator=g) + 10
    assert precision_recall(far, a) == (0.0, 0.0)
    # a set that covers only half of the reference: full precision, recall about a half
    half = a[a[:, 0] > 0]
    p, r = precision_recall(half, a)
    assert p == 1.0 and 0.3 < r < 0.8
    # taken a few rows at a time, as for large sets: the same as the whole matrices at once
    b = torch.randn(150, 8, generator=g) + 0.5
    radius = torch.cdist(a.double(), a.double()).kthvalue(4, dim=1).values
    precision = (torch.cdist(b.double(), a.double()) <= radius).any(dim=1).double().mean()
    assert precision_recall(b, a, rows=7)[0] == precision_recall(b, a)[0] == float(precision)
    assert precision_recall(b, a, rows=7) == precision_recall(b, a, rows=1000)


def test_the_vendi_score_is_1_for_copies_and_n_for_orthogonal_embeddings():
    one = torch.nn.functional.normalize(torch.randn(1, 16, dtype=torch.float64), dim=1)
    assert vendi(one.repeat(10, 1)) == pytest.approx(1.0, abs=1e-9)
    assert vendi(torch.eye(12)) == pytest.approx(12.0, rel=1e-9)
    assert vendi(torch.eye(12, dtype=torch.float64).repeat(1, 2) / 2**0.5) == pytest.approx(
        12.0, rel=1e-9
    )


def test_near_duplicates_are_found_and_listed():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 64, generator=g), dim=1)
    x[4] = torch.nn.functional.normalize(x[1] + 0.01 * torch.randn(64, generator=g), dim=0)
    share, pairs = near_duplicates(x, [f"k{i}" for i in range(6)], 0.95)
    assert share == pytest.approx(1 / 15) and [p[:2] for p in pairs] == [("k1", "k4")]
    # many pairs, found a few rows at a time: the share and the worst pairs of the whole matrix
    y = torch.nn.functional.normalize(torch.randn(40, 64, generator=g), dim=1)
    y[20:] = torch.nn.functional.normalize(y[:20] + 0.02 * torch.randn(20, 64, generator=g), dim=1)
    keys = [f"k{i}" for i in range(40)]
    sim = (y.double() @ y.double().T).triu(diagonal=1)
    share, pairs = near_duplicates(y, keys, 0.95, worst=5, rows=3)
    assert share == pytest.approx(int((sim > 0.95).sum()) / (40 * 39 / 2)) and share > 0
    assert len(pairs) == 5
    assert [s for *_, s in pairs] == [round(float(v), 4) for v in sim.flatten().topk(5).values]
    assert (share, pairs) == near_duplicates(y, keys, 0.95, worst=5)


# -- the script ---------------------------------------------------------------------------------


def test_evaluate_dataset_writes_the_report_and_reuses_saved_statistics(nets, tmp_path):
    data = image_set(tmp_path / "data", 12, 0.1, 3)
    ref = image_set(tmp_path / "ref", 16)
    stats = tmp_path / "ref.npz"
    argv = [str(data), "--reference", str(ref), "--save-reference", str(stats), "--batch-size", "5"]
    assert evaluate_dataset.main(evaluate_dataset.parse_args(argv), nets) == 0
    first = json.loads((data / "annotations" / "quality.json").read_text())
    for key in (
        "fid",
        "kid_mean",
        "precision",
        "recall",
        "clip_score",
        "vendi",
        "near_duplicate_share",
    ):
        assert isinstance(first[key], float), key
    assert (first["images"], first["reference_images"], first["models"]) == (12, 16, nets.names)
    out = tmp_path / "again.json"
    argv = [str(data), "--reference", str(stats), "--output", str(out)]
    evaluate_dataset.main(evaluate_dataset.parse_args(argv), nets)
    again = json.loads(out.read_text())
    assert {k: again[k] for k in ("fid", "kid_mean", "precision", "recall")} == {
        k: first[k] for k in ("fid", "kid_mean", "precision", "recall")
    }
    for argv, message in (
        ([str(tmp_path / "nope")], "is not a folder"),
        ([str(data), "--reference", str(tmp_path / "x.npz")], "no such statistics file"),
        ([str(data), "--save-reference", str(stats)], "give one"),
        ([str(data), "--duplicate-threshold", "2"], "--duplicate-threshold must be"),
    ):
        with pytest.raises(UserError, match=message):
            evaluate_dataset.main(evaluate_dataset.parse_args(argv), nets)


def test_two_gloo_processes_give_the_numbers_of_one(nets, tiny_model, tmp_path):
    data = image_set(tmp_path / "data", 9, 0.1, 3)
    ref = image_set(tmp_path / "ref", 10)
    one = tmp_path / "one.json"
    evaluate_dataset.main(evaluate_dataset.parse_args([str(data), "--reference", str(ref), "--output", str(one)]), nets)  # fmt: skip
    two = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(ROOT / "tests" / "quality_nets.py"), str(tiny_model / "tokenizer"),
           str(data), "--reference", str(ref), "--output", str(two), "--device", "cpu"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    # float32 features from batches of other sizes: bar 1e-5 relative (1e-6 absolute for KID)
    for key in ("fid", "kid_mean", "precision", "recall", "clip_score", "vendi"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert (a["images"], a["reference_images"]) == (b["images"], b["reference_images"]) == (9, 10)


def test_generate_images_evaluate_scores_the_run(nets, tiny_model, tmp_path, monkeypatch):
    import sampling.quality

    monkeypatch.setattr(sampling.quality, "load_embedders", lambda name: nets)
    ref = image_set(tmp_path / "ref", 6)
    out = tmp_path / "gen"
    gen(tiny_model, out, "--prompt", "a red circle", "--num-images", "3", "--evaluate", str(ref))
    numbers = json.loads((out / "annotations" / "quality.json").read_text())
    assert numbers["images"] == 3 and numbers["reference_images"] == 6
    assert "fid" in numbers and numbers["vendi_per_prompt_mean"] >= 1
    assert "precision" not in numbers  # 3 images: no 3rd neighbour among the others
    # without a reference: the CLIP score and diversity only
    gen(
        tiny_model,
        tmp_path / "alone",
        "--prompt",
        "a red circle",
        "--num-images",
        "2",
        "--evaluate",
    )
    alone = json.loads((tmp_path / "alone" / "annotations" / "quality.json").read_text())
    assert "fid" not in alone and "clip_score" in alone


def test_missing_weights_are_one_line_naming_what_to_fetch(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    from sampling.quality import load_embedders

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="weights-inception-2015-12-05-6726825d.pth into "):
        load_embedders("openai/clip-vit-large-patch14")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    monkeypatch.setattr(inception, "FeatureExtractorInceptionV3", lambda *a, **k: TinyInception())
    with pytest.raises(UserError, match="uv run hf download nobody/no-such-clip"):
        load_embedders("nobody/no-such-clip")
