"""What every peer trainer has: TensorBoard logging, timestep ranges (tests/test_noise.py and
test_kohya_options.py hold their statistics), kohya's dataset config, partial checkpointing."""

import json

import pytest
from conftest import train_argv
from PIL import Image

import train_sdxl
from cli.train import trackers
from sdxl.errors import UserError

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
