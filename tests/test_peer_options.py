"""What every peer trainer has: TensorBoard logging, timestep ranges (tests/test_noise.py and
test_kohya_options.py hold their statistics), kohya's dataset config, partial checkpointing."""

import dataclasses
import itertools
import json
import shutil

import pytest
import torch
from conftest import EXAMPLES, tiny_specs, train_argv
from PIL import Image

import train_sdxl
from cli.dataset_config import command_line_defaults, read_dataset_config
from cli.train import trackers, training_specs
from sdxl.checkpoint import load_checkpoint
from sdxl.device import Distributed
from sdxl.errors import UserError
from training.data_loader import optimizer_steps, read_data, steps_per_epoch
from training.preflight import at_largest, estimate_training
from training.specs import DataSpec

# -- TensorBoard --------------------------------------------------------------------------------


def events(folder):
    """The scalars {tag: [(step, value)]} and images {tag: [(step, width, height)]} that
    TensorBoard's own reader finds in a log folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    tags = reader.Tags()
    scalars = {t: [(e.step, e.value) for e in reader.Scalars(t)] for t in tags["scalars"]}
    images = {t: [(e.step, e.width, e.height) for e in reader.Images(t)] for t in tags["images"]}
    return scalars, images


def test_tensorboard_holds_every_scalar_per_step_and_the_validation_images(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    out = tmp_path / "run"
    flags = ["--use_lora", "--log_with", "tensorboard", "--save_interval", "2"]
    flags += ["--validation_split", "0.25", "--validation_steps", "2"]
    flags += ["--validation_prompts", str(prompts), "--validation_sampling_steps", "2"]
    train_sdxl.main(train_sdxl.parse_args(train_argv(tiny_model, out, *flags, "--max_train_steps", "4")))  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars, images = events(out / "tensorboard")
    for name in ("loss", "lr", "grad_norm", "images_per_s", "val_loss", "epoch"):
        logged = [(r["step"], r[name]) for r in rows if name in r]
        assert [s for s, _ in scalars[name]] == [s for s, _ in logged], name
        assert [v for _, v in scalars[name]] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert [s for s, _ in scalars["val_loss"]] == [2, 4]
    png = Image.open(out / "validation_step000002.png")
    assert images["validation"] == [(2, png.width, png.height), (4, png.width, png.height)]

    # Resumed from step 2 (the first run went on to 4): the log continues from step 3, and the
    # reader shows each step once, as the resumed run logged it.
    step2 = next(out.glob("lora_step000002_*.pt"))
    argv = train_argv(tiny_model, out, *flags, "--max_train_steps", "3", "--resume", str(step2))
    train_sdxl.main(train_sdxl.parse_args(argv))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars, images = events(out / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3] == [r["step"] for r in rows]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [s for s, *_ in images["validation"]] == [2]


def test_the_trackers_as_kohya_chooses_them(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def chosen(*flags):
        return trackers(train_sdxl.parse_args(train_argv(tmp_path, out, *flags)))

    assert chosen() == (None, None)
    assert chosen("--log_with", "tensorboard") == (None, out / "tensorboard")
    assert chosen("--logging_dir", str(tmp_path / "logs")) == (None, tmp_path / "logs" / "run")
    assert chosen("--wandb_project", "p") == ("p", None)
    assert chosen("--log_with", "wandb") == ("train_sdxl", None)
    assert chosen("--log_with", "all", "--wandb_project", "p") == ("p", out / "tensorboard")
    for flags, message in (
        (["--log_with", "tensorboard", "--wandb_project", "p"], "use --log_with all"),
        (["--log_with", "wandb", "--logging_dir", "x"], "use --log_with all"),
    ):
        with pytest.raises(UserError, match=message):
            train_sdxl.check_args(train_sdxl.parse_args(train_argv(tmp_path, out, *flags)))
    real = __import__("importlib").util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(UserError, match="uv sync --extra tensorboard"):
        train_sdxl.check_args(
            train_sdxl.parse_args(train_argv(tmp_path, out, "--log_with", "tensorboard"))
        )


# -- kohya's dataset config ---------------------------------------------------------------------


def folders(root, layout):
    """Image folders from the examples: {name: [(example index, caption or None)]}."""
    for name, images in layout.items():
        (root / name).mkdir(parents=True)
        for k, caption in images:
            shutil.copy(EXAMPLES / f"{k:03d}.png", root / name / f"{k:03d}.png")
            if caption is not None:
                (root / name / f"{k:03d}.txt").write_text(caption)


# kohya's first example (docs/config_README-en.md), word for word but for its folders (here under
# ROOT) and resolutions small enough for the CPU (512 and 768 in the documentation).
KOHYA_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 64
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'ROOT/hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = 'ROOT/fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'ROOT/reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [32, 32]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'ROOT/piyo'
  metadata_file = 'ROOT/piyo/piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""


def kohya_example(root):
    folders(
        root,
        {
            "hoge": [(0, "a red circle, one"), (1, None), (2, "a shape, two"), (3, None)],
            "fuga": [(4, "a square, three, four"), (5, None), (6, None), (7, None)],
            "reg": [(0, None), (1, None), (2, None), (3, None)],
            "piyo": [(4, None), (5, "ignored: the metadata captions"), (6, None), (7, None)],
        },
    )
    metadata = {
        str(root / "piyo" / "004.png"): {"caption": "a picture", "tags": "red, round"},
        "005": {"caption": "another picture"},
        "006.png": {"tags": "blue, square"},
    }  # (007 is not named: not used)
    (root / "piyo" / "piyo_md.json").write_text(json.dumps(metadata))
    config = root / "dataset.toml"
    config.write_text(KOHYA_EXAMPLE.replace("ROOT", root.as_posix()))
    return config


def dataset_argv(tiny_model, out, config, *extra):
    argv = train_argv(tiny_model, out, "--use_lora", "--dataset_config", str(config), *extra)
    i = argv.index("--data_dir")
    return argv[:i] + argv[i + 2 :]


def test_kohyas_documented_dataset_config_reads_as_kohya_reads_it_and_trains(tiny_model, tmp_path):
    config = kohya_example(tmp_path)
    defaults = command_line_defaults(
        train_sdxl.parse_args(dataset_argv(tmp_path, tmp_path, config))
    )
    (db, ft), notes = read_dataset_config(config, defaults)
    assert notes == []
    assert (db.size, db.batch_size, ft.size, ft.batch_size) == ((64, 64), 4, (32, 32), 2)
    assert [s.keep_tokens for s in db.subsets + ft.subsets] == [2, 3, 1, 1]
    assert all(s.shuffle_caption and s.caption_extension == ".txt" for s in db.subsets)
    assert [s.is_reg for s in db.subsets] == [False, False, True]

    spec = DataSpec(tmp_path, datasets=(db, ft), cache_dir=tmp_path / "cache")
    records, data, _, reg = read_data(spec)
    captions = {(r.concept, r.path.name): r.caption for r in records}
    assert captions[("hoge", "000.png")] == "a red circle, one"
    assert captions[("hoge", "001.png")] == "hoge girl"  # no caption file: class_tokens
    assert captions[("fuga", "005.png")] == "fuga boy"
    assert captions[("piyo", "004.png")] == "a picture,red, round"  # kohya joins caption, tags
    assert captions[("piyo", "005.png")] == "another picture"  # named without its extension
    assert captions[("piyo", "006.png")] == "blue, square"
    assert ("piyo", "007.png") not in captions  # the metadata does not name it
    assert sorted({r.caption for r in reg.records}) == ["human"]
    assert len(data) == 8 + 3 and data.batch_sizes == (4, 2)
    assert {(g, t) for g, t in zip(data.groups, data.targets)} == {(0, (64, 64)), (1, (32, 32))}

    # and it trains: an epoch is 2 batches of 4 at 64 px and 1 of 2 at 32 px, each paired with a
    # regularisation batch of 4
    out = tmp_path / "run"
    last = train_sdxl.main(train_sdxl.parse_args(dataset_argv(tiny_model, out, config)))
    assert load_checkpoint(last)["step"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["reg_loss"] > 0 for r in rows)
    assert sorted(r["images_per_s"] > 0 for r in rows) == [True] * 3


def test_keys_this_project_lacks_are_named_once_and_unknown_ones_refused(tmp_path):
    """kohya's last documented example (its keys, its values; the folder here): each key this
    project lacks gets one line, a key set to kohya's default none; a misspelt key is an error."""
    folders(tmp_path, {"images": [(0, "a"), (1, "b")]})
    config = tmp_path / "d.toml"
    config.write_text(f"""
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;"
enable_wildcard = true

  [[datasets.subsets]]
  image_dir = "{tmp_path.as_posix()}/images"
  num_repeats = 1
  caption_prefix = "1girl, hatsune miku, vocaloid |||"
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
""")
    defaults = command_line_defaults(
        train_sdxl.parse_args(dataset_argv(tmp_path, tmp_path, config))
    )
    (dataset,), notes = read_dataset_config(config, defaults)
    named = [note.split(": ")[1].split(" ")[0] for note in notes]
    assert named == [
        "bucket_no_upscale", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
    ]  # fmt: skip
    assert all("datasets[0]" in note and "left out" in note for note in notes)
    (subset,) = dataset.subsets
    assert subset.random_flip and subset.shuffle_caption and subset.caption_tag_dropout_rate == 0.1
    assert (dataset.size, dataset.batch_size, dataset.bucket) == ((1024, 1024), 6, True)
    for text, message in (
        ("[[datasets]]\nresolutoin = 512\n[[datasets.subsets]]\nimage_dir = '.'\n", "unknown key 'resolutoin'"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '.'\nbatch_size = 2\n", "belongs in \\[\\[datasets\\]\\]"),
        ("[[datasets]]\nimage_dir = '.'\n[[datasets.subsets]]\nimage_dir = '.'\n", "belongs in a \\[\\[datasets.subsets\\]\\]"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'nowhere'\n", "image_dir nowhere of datasets\\[0\\].subsets\\[0\\] is not a folder"),
        ("[[datasets]]\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir = '.'\n", "batch_size = 0 in datasets\\[0\\] is not a whole number, 1 or more"),
        ("[general]\nshuffle_caption = true\n", "no \\[\\[datasets\\]\\]"),
    ):  # fmt: skip
        config.write_text(text)
        with pytest.raises(UserError, match=message):
            read_dataset_config(config, defaults)
    argv = train_argv(tmp_path, tmp_path, "--dataset_config", str(config))
    with pytest.raises(UserError, match="drop --data_dir"):
        train_sdxl.check_args(train_sdxl.parse_args(argv))


def test_two_datasets_interleave_as_configured(tmp_path):
    """Every batch holds one dataset's images at its size and batch size; an epoch holds each
    dataset's full batches once, in an order that mixes them."""
    folders(tmp_path, {"big": [(k, f"big {k}") for k in range(4)],
                       "small": [(k, f"small {k}") for k in range(8)]})  # fmt: skip
    config = tmp_path / "d.toml"
    config.write_text(
        f"[[datasets]]\nresolution = 64\nbatch_size = 1\n[[datasets.subsets]]\n"
        f"image_dir = '{tmp_path.as_posix()}/big'\nnum_repeats = 2\n"
        f"[[datasets]]\nresolution = [32, 32]\nbatch_size = 2\n[[datasets.subsets]]\n"
        f"image_dir = '{tmp_path.as_posix()}/small'\n"
    )
    args = train_sdxl.parse_args(dataset_argv(tmp_path, tmp_path, config))
    specs = training_specs(args)
    _, data, _, _ = read_data(specs.data)
    dist = Distributed(0, 1, torch.device("cpu"))
    per_epoch = steps_per_epoch(data, 1, 1, 1)
    assert per_epoch == 4 * 2 + 8 // 2
    steps = list(itertools.islice(optimizer_steps(data, 1, 1, 0, 0, dist), 2 * per_epoch))
    kinds = []
    for micro, _, _ in steps:
        pixels, _, captions, _, _ = micro[0]
        kinds.append((tuple(pixels.shape), captions[0].split()[0]))
        assert {c.split()[0] for c in captions} == {captions[0].split()[0]}
    assert set(kinds) == {((1, 3, 64, 64), "big"), ((2, 3, 32, 32), "small")}
    first = [k[1] for k in kinds[:per_epoch]]
    assert first.count("big") == 8 and first.count("small") == 4
    assert first != sorted(first) and first != sorted(first, reverse=True)  # interleaved
    assert [s[1:] for s in steps[per_epoch - 1 : per_epoch + 1]] == [(1, 0), (1, 1)]


def test_a_run_on_two_datasets_resumes_bitwise(tiny_model, tmp_path):
    """Two datasets of different sizes and batch sizes, a regularisation subset, masks and the
    flags of issue 32, trained 4 steps straight and 2 + 2 from a checkpoint: the same bits."""
    folders(tmp_path, {"a": [(k, f"shape {k}, red") for k in range(4)],
                       "b": [(k, None) for k in range(4, 8)], "reg": [(k, None) for k in range(3)]})  # fmt: skip
    Image.new("L", Image.open(EXAMPLES / "000.png").size, 128).save(tmp_path / "a" / "000.mask.png")
    config = tmp_path / "d.toml"
    config.write_text(
        f"[general]\nflip_aug = true\n[[datasets]]\nresolution = 64\nbatch_size = 1\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path.as_posix()}/a'\nshuffle_caption = true\n"
        f"[[datasets]]\nresolution = 32\nbatch_size = 2\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path.as_posix()}/b'\nclass_tokens = 'sks shape'\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path.as_posix()}/reg'\nis_reg = true\n"
        f"class_tokens = 'shape'\n"
    )
    flags = ["--save_interval", "2", "--masked_loss", "--min_timestep", "100"]
    flags += ["--timestep_sampling", "logit_normal", "--gradient_checkpointing_interval", "2"]

    def run(out, *extra):
        argv = dataset_argv(tiny_model, out, config, *flags, "--max_train_steps", "4", *extra)
        return load_checkpoint(train_sdxl.main(train_sdxl.parse_args(argv)))

    straight = run(tmp_path / "straight")
    step2 = next((tmp_path / "straight").glob("lora_step000002_*.pt"))
    resumed = run(tmp_path / "resumed", "--resume", str(step2))
    assert straight["step"] == resumed["step"] == 4
    for k in straight["lora"]:
        assert torch.equal(straight["lora"][k], resumed["lora"][k]), k
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert all(r["reg_loss"] > 0 for r in rows)
    assert {json.loads(line)["loss"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()} <= {r["loss"] for r in rows}  # fmt: skip


def test_a_dataset_config_with_the_caches_trains_as_without(tiny_model, tmp_path):
    """Cached latents and text embeddings of two datasets (their own sizes, kohya's random_crop
    = false: centre crops) give the losses of the same run without caches."""
    folders(tmp_path, {"a": [(k, f"shape {k}") for k in range(2)],
                       "b": [(k, f"other {k}") for k in range(2, 6)]})  # fmt: skip
    config = tmp_path / "d.toml"
    config.write_text(
        f"[general]\nrandom_crop = false\n[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
        f"image_dir = '{tmp_path.as_posix()}/a'\n[[datasets]]\nresolution = 32\nbatch_size = 2\n"
        f"[[datasets.subsets]]\nimage_dir = '{tmp_path.as_posix()}/b'\n"
    )

    def losses(out, *extra):
        argv = dataset_argv(tiny_model, out, config, "--max_train_steps", "4", *extra)
        train_sdxl.main(train_sdxl.parse_args(argv))
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]  # fmt: skip

    plain = losses(tmp_path / "plain")
    cached = losses(tmp_path / "cached", "--cache_latents", "--cache_text_embeddings")
    # The same moments and embeddings, computed before the step instead of in it: fp32 rounding.
    assert cached == pytest.approx(plain, rel=1e-4)


# -- the preflight ------------------------------------------------------------------------------


def test_the_preflight_predicts_each_checkpointing_interval_and_the_largest_dataset(
    tiny_model, tmp_path
):
    """Checkpointing fewer blocks keeps more activations: the prediction grows with the interval.
    With a dataset config the preflight traces the dataset whose batch has the most pixels."""
    specs = tiny_specs()
    peaks = [
        estimate_training(
            dataclasses.replace(specs, step=dataclasses.replace(specs.step, checkpoint_interval=n)),
            tiny_model,
        ).peak
        for n in (1, 2, 4)
    ]
    assert peaks[0] < peaks[1] < peaks[2]
    folders(tmp_path, {"a": [(0, "a")], "b": [(1, "b")]})
    config = tmp_path / "d.toml"
    for (size_a, batch_a), (size_b, batch_b), expected in (
        ((64, 1), (32, 2), ((64, 64), 1)),
        ((64, 1), (32, 8), ((32, 32), 8)),
    ):
        config.write_text(
            f"[[datasets]]\nresolution = {size_a}\nbatch_size = {batch_a}\n[[datasets.subsets]]\n"
            f"image_dir = '{tmp_path.as_posix()}/a'\n[[datasets]]\nresolution = {size_b}\n"
            f"batch_size = {batch_b}\n[[datasets.subsets]]\nimage_dir = '{tmp_path.as_posix()}/b'\n"
        )
        data = training_specs(train_sdxl.parse_args(dataset_argv(tmp_path, tmp_path, config)))
        largest = at_largest(data).data
        assert (largest.size, largest.batch_size) == expected
