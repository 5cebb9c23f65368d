"""The training options kohya users reach for: each changes what it should and nothing else."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, tiny_specs, train_argv
from PIL import Image

import train_sdxl
from sdxl.checkpoint import load_checkpoint
from sdxl.device import resolve_precision
from sdxl.diffusion import NoiseSchedule
from sdxl.errors import UserError
from training import noise
from training.data_loader import (
    CaptionRules,
    SampleRules,
    TrainingData,
    prepare,
    shaped,
    steps_per_epoch,
)
from training.loss import debiased_weight, elementwise_loss, min_snr_weight, training_loss
from training.scan import DataError, scan
from training.specs import AdapterSpec, DataSpec, LossSpec, OptimizerSpec, StepSpec


def run(tiny_model, out, *extra, data=None):
    argv = train_argv(tiny_model, out, "--use_lora", "--max_train_steps", "2", *extra)
    if data is not None:
        argv[argv.index("--data_dir") + 1] = str(data)
    last = train_sdxl.main(train_sdxl.parse_args(argv))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return last, rows


def lora_of(path):
    return load_checkpoint(path)["lora"]


# -- 1: captions -------------------------------------------------------------------------------


def test_shuffling_keeps_the_first_tags_and_is_reproducible_per_sample():
    caption = "sks dog, on a beach, sunset, red collar, smiling, wide shot"
    rules = CaptionRules(shuffle=True, keep_tokens=2)
    results = [rules.apply(caption, torch.Generator().manual_seed(s)) for s in range(20)]
    for r in results:
        tags = r.split(", ")
        assert tags[:2] == ["sks dog", "on a beach"] and sorted(tags) == sorted(caption.split(", "))
    assert len(set(results)) > 5  # shuffled
    again = [rules.apply(caption, torch.Generator().manual_seed(s)) for s in range(20)]
    assert again == results  # the same sample seed, the same caption
    # Tag dropout drops only tags after the kept ones, at about its rate.
    drop = CaptionRules(keep_tokens=1, tag_dropout=0.5)
    kept = [drop.apply(caption, torch.Generator().manual_seed(s)).split(", ") for s in range(400)]
    assert all(k[0] == "sks dog" for k in kept)
    assert abs(np.mean([len(k) - 1 for k in kept]) - 2.5) < 0.3  # 5 droppable tags, half kept
    # Off: the caption as it is, and no random draw (the sample's crops and noise are unchanged).
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert CaptionRules().apply(caption, g) == caption and torch.equal(g.get_state(), state)
    pipe = CaptionRules(shuffle=True, separator="|").apply(
        "a|b|c", torch.Generator().manual_seed(1)
    )
    assert sorted(pipe.split("|")) == ["a", "b", "c"]


def test_caption_extension_and_the_cache_combination(tiny_model, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    for txt in data.glob("*.txt"):
        txt.rename(txt.with_suffix(".caption"))
    records = scan(data, caption_extension=".caption")
    assert len(records) == 8 and records[0].caption.startswith("a ")
    with pytest.raises(UserError, match="cached text embeddings would freeze"):
        run(tiny_model, tmp_path / "o", "--shuffle_caption", "--cache_text_embeddings", data=data)


# -- 2: regularisation images ---------------------------------------------------------------------


def test_prior_loss_weight_0_equals_no_regularisation_data(tiny_model, tmp_path):
    reg = tmp_path / "reg"
    reg.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (30 * i, 200, 10)).save(reg / f"{i}.png")
        (reg / f"{i}.txt").write_text("a dog")
    plain, plain_rows = run(tiny_model, tmp_path / "a")
    zero, zero_rows = run(
        tiny_model, tmp_path / "b", "--reg_data_dir", str(reg), "--prior_loss_weight", "0"
    )
    assert [r["loss"] for r in plain_rows] == [r["loss"] for r in zero_rows]
    assert all(torch.equal(a, b) for a, b in zip(lora_of(plain).values(), lora_of(zero).values()))
    assert all(
        r["reg_loss"] > 0 and r["train_loss"] == r["loss"] for r in zero_rows
    )  # logged apart
    one, one_rows = run(tiny_model, tmp_path / "c", "--reg_data_dir", str(reg))
    assert one_rows[0]["loss"] == pytest.approx(one_rows[0]["train_loss"] + one_rows[0]["reg_loss"])
    assert any(
        not torch.equal(a, b) for a, b in zip(lora_of(plain).values(), lora_of(one).values())
    )
    # Resumed mid-run, the regularisation images follow on exactly.
    argv = ("--reg_data_dir", str(reg), "--save_interval", "1", "--max_train_steps", "4")
    straight, _ = run(tiny_model, tmp_path / "d", *argv)
    step2 = next((tmp_path / "d").glob("lora_step000002_2*.pt"))
    resumed, _ = run(tiny_model, tmp_path / "e", *argv, "--resume", str(step2))
    assert all(
        torch.equal(a, b) for a, b in zip(lora_of(straight).values(), lora_of(resumed).values())
    )


# -- 3: masked loss -----------------------------------------------------------------------------


def rgba_copy(folder: Path, alpha: int) -> Path:
    folder.mkdir()
    for png in sorted(EXAMPLES.glob("*.png")):
        image = Image.open(png).convert("RGB")
        image.putalpha(alpha)
        image.save(folder / png.name)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


def test_a_zero_mask_gives_zero_loss_and_a_full_mask_todays_loss(tiny_model, tmp_path):
    _, today = run(tiny_model, tmp_path / "a")
    _, full = run(
        tiny_model, tmp_path / "b", "--masked_loss", data=rgba_copy(tmp_path / "full", 255)
    )
    assert [r["loss"] for r in full] == [r["loss"] for r in today]
    # All masks empty trains nothing: the run stops before loading the model (round 2, item 7);
    # the loss of a zero mask itself is 0.
    with pytest.raises(DataError, match="every loss mask .* is empty"):
        run(tiny_model, tmp_path / "c", "--masked_loss", data=rgba_copy(tmp_path / "zero", 0))
    spec = LossSpec()
    _, loss = input_noise(spec)
    assert (loss > 0).all()
    assert torch.equal(input_noise(spec, mask_value=0.0)[1], torch.zeros(len(SEEDS)))


def test_the_mask_is_cropped_flipped_and_pooled_with_the_image():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 100, 100))  # the left half red
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (0, 0, 100, 100))  # and the mask white there
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        pixels, _, weights = prepare(image, 48, False, True, g, mask)
        red = (pixels[0] > 0.5).float()[None, None]
        expected = torch.nn.functional.avg_pool2d(red, 8)[0]  # the red share of each 8 x 8 block
        assert weights.shape == (1, 6, 6) and (weights - expected).abs().max() < 0.1


def test_a_mask_file_beside_the_image(tmp_path):
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square")
    Image.new("L", (32, 32), 0).save(tmp_path / "a.mask.png")
    (record,) = scan(tmp_path)  # the mask is not taken for an image
    assert record.mask == tmp_path / "a.mask.png"
    *_, weights = TrainingData([record], 32, masked=True)[(0, 0)]
    assert weights.shape == (1, 4, 4) and weights.max() == 0


# -- 4: optimizers ------------------------------------------------------------------------------


def test_adamw8bit_without_cuda_is_one_line(tiny_model, tmp_path):
    with pytest.raises(UserError, match="bitsandbytes"):
        run(tiny_model, tmp_path / "o", "--optimizer", "adamw8bit")


@pytest.mark.parametrize("optimizer", ["adafactor", "prodigy"])
def test_resume_is_exact_with_other_optimizers(tiny_model, tmp_path, optimizer):
    lr = "1.0" if optimizer == "prodigy" else "1e-4"
    argv = (
        "--optimizer",
        optimizer,
        "--learning_rate",
        lr,
        "--save_interval",
        "2",
        "--max_train_steps",
        "4",
    )
    straight, rows = run(tiny_model, tmp_path / "a", *argv)
    step2 = next((tmp_path / "a").glob("lora_step000002_2*.pt"))
    resumed, _ = run(tiny_model, tmp_path / "b", *argv, "--resume", str(step2))
    assert all(
        torch.equal(a, b) for a, b in zip(lora_of(straight).values(), lora_of(resumed).values())
    )
    assert any(v.abs().sum() > 0 for k, v in lora_of(straight).items() if ".up." in k)  # it trained


def test_optimizer_args_are_passed_and_bad_ones_are_one_line(tiny_model, tmp_path):
    last, _ = run(tiny_model, tmp_path / "a", "--optimizer_args", "betas=(0.8,0.9)", "amsgrad=True")
    group = load_checkpoint(last)["optimizer"]["param_groups"][0]
    assert group["betas"] == (0.8, 0.9) and group["amsgrad"] is True
    with pytest.raises(UserError, match="--optimizer adamw: .*no_such_option"):
        run(tiny_model, tmp_path / "b", "--optimizer_args", "no_such_option=1")


def test_prodigy_lowers_the_loss_of_one_batch(tiny_model, tmp_path):
    """The overfit-one-batch test (tests/test_training.py) with Prodigy at its recommended lr 1."""
    from sdxl.device import Distributed, resolve_precision
    from sdxl.pretrained import load_sdxl
    from training.data_loader import collate
    from training.train_loop import build_trainer, train_step

    torch.manual_seed(0)
    parts = load_sdxl(tiny_model, torch.float32)
    specs = tiny_specs(
        AdapterSpec(target_mode="all"),
        OptimizerSpec(name="prodigy", learning_rate=1.0),
        StepSpec(precision="fp32", gradient_checkpointing=False),
    )
    cpu = Distributed(0, 1, torch.device("cpu"))
    precision = resolve_precision("fp32", cpu.device)
    encoders = (parts.vae.moments, parts.text_encoder.encode)
    tr = build_trainer(specs, parts, *encoders, precision, cpu, max_steps=40)
    data = TrainingData(scan(EXAMPLES)[:2], 32, rules=SampleRules(center_crop=True))
    batch = collate([data[(0, 0)], data[(1, 1)]])  # the same samples: the same noise and t
    losses = [train_step(tr, [batch], [])[0].item() for _ in range(40)]
    assert losses[-1] < losses[0] / 3, losses  # the same stated factor as with AdamW


# -- 5: noise and loss options ------------------------------------------------------------------


SEEDS = torch.arange(8, dtype=torch.int64)


class ZeroLatents:
    """A VAE whose posterior sample is 0: the UNet's input is then sqrt(1 - abar_t) * its noise."""

    def sample(self, moments, eps):
        return torch.zeros_like(eps)


def input_noise(spec, shape=(4, 32, 32), mask_value=1.0):
    """(the noise of the UNet's input, the loss) of training_loss under `spec`, from a model that
    records its input and predicts 0 (so the loss is the mean squared target)."""
    seen = {}

    def model(x, t, context, cond):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    schedule = NoiseSchedule.scaled_linear()
    n = len(SEEDS)
    moments = torch.zeros(n, 2 * shape[0], *shape[1:])
    mask = torch.full((n, 1, *shape[1:]), mask_value)
    fp32 = resolve_precision("fp32", torch.device("cpu"))
    text = (torch.zeros(n, 77, 8), torch.zeros(n, 8), torch.zeros(n, 6))
    loss = training_loss(model, ZeroLatents(), schedule, spec, fp32, moments, *text, SEEDS, mask)
    sigma = (1 - schedule.alphas_cumprod[seen["t"]]).sqrt().reshape(-1, 1, 1, 1)
    return seen["x"] / sigma, loss


def test_multires_noise_is_unit_variance_and_smoother():
    plain, _ = input_noise(LossSpec())
    pyramid, _ = input_noise(LossSpec(multires_iterations=6, multires_discount=0.8))
    assert pyramid.std(dim=(1, 2, 3)).sub(1).abs().max() < 1e-4

    def neighbour(x):  # the correlation of horizontal neighbours
        return (x[..., 1:] * x[..., :-1]).mean()

    assert neighbour(pyramid) > neighbour(plain) + 0.1


def test_offset_noise_adds_one_value_per_sample_and_channel():
    plain, _ = input_noise(LossSpec())
    offset, _ = input_noise(LossSpec(noise_offset=0.1))
    diff = offset - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand(diff.shape), atol=1e-5)
    assert diff.abs().amax(dim=(2, 3)).min() > 0


def test_input_perturbation_moves_only_the_input():
    n, plain_loss = input_noise(LossSpec())
    perturbed, loss = input_noise(LossSpec(ip_noise_gamma=0.1))
    assert torch.equal(loss, plain_loss)  # the target (eps) is not perturbed
    extra = (perturbed - n) / 0.1
    assert (
        abs(extra.std() - 1) < 0.05
        and abs(torch.corrcoef(torch.stack([extra.flatten(), n.flatten()]))[0, 1]) < 0.05
    )


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_min_snr_and_debiased_weights_follow_the_drawn_timesteps(sampling):
    """The loss of a model predicting 0 is mean(eps^2) * w(t): w must be that of the t drawn."""
    schedule = NoiseSchedule.scaled_linear()
    spec = LossSpec(
        snr_gamma=5.0, debiased=True, min_timestep=900, max_timestep=1000,
        timestep_sampling=sampling, logit_mean=1.0,
    )  # fmt: skip
    eps, loss = input_noise(spec)
    t = noise.timesteps(SEEDS, 900, 1000, sampling, 1.0, 1.0)
    assert t.min() >= 900
    weight = min_snr_weight(schedule, 5.0, t) * debiased_weight(schedule, t)
    torch.testing.assert_close(loss, eps.pow(2).mean(dim=(1, 2, 3)) * weight, rtol=1e-5, atol=0)


def test_a_timestep_range_without_timesteps_is_one_line(tiny_model, tmp_path):
    for flags in (["--min_timestep", "500", "--max_timestep", "500"], ["--max_timestep", "1001"]):
        with pytest.raises(UserError, match="leave no timestep"):
            train_sdxl.check_args(train_sdxl.parse_args(train_argv(tiny_model, tmp_path, *flags)))


def test_debiased_weights_and_huber_losses():
    schedule = NoiseSchedule.scaled_linear()
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(
        debiased_weight(schedule, t), 1 / schedule.snr(t).clamp(max=1000).sqrt()
    )
    d = torch.tensor([1e-3, 5.0])
    target = torch.zeros(2)
    huber = elementwise_loss("huber", 0.1, d, target)
    assert huber[0] == pytest.approx(1e-6, rel=1e-3)  # |d| << c: the squared error
    assert huber[1] == pytest.approx(2 * 0.1 * 5.0, rel=0.03)  # |d| >> c: linear, 2c|d|
    smooth = elementwise_loss("smooth_l1", 0.1, d, target)
    torch.testing.assert_close(smooth, huber / 0.1)
    assert torch.equal(elementwise_loss("l2", 0.1, d, target), d**2)
    with pytest.raises(ValueError, match="unknown loss type"):
        elementwise_loss("l3", 0.1, d, target)


# -- 6: repeats and nested folders --------------------------------------------------------------


def test_repeat_folders_multiply_the_epoch(tmp_path):
    for folder, n in (("10_dog", 2), ("3_cat", 1), ("misc", 2)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / folder / f"{i}.png")
            (tmp_path / folder / f"{i}.txt").write_text(f"{folder} {i}")
    records = scan(tmp_path)
    assert sorted(r.key for r in records) == [
        "10_dog/0.png",
        "10_dog/1.png",
        "3_cat/0.png",
        "misc/0.png",
        "misc/1.png",
    ]
    assert {r.key: r.repeats for r in records}["10_dog/0.png"] == 10 and records[2].concept in (
        "3_cat",
        "misc",
    )
    data = shaped([(r, SampleRules()) for r in records], (32, 32), False, DataSpec(tmp_path))
    assert len(data) == 2 * 10 + 1 * 3 + 2 and steps_per_epoch(data, 5, 1, 1) == 5


# -- 7: a config file ---------------------------------------------------------------------------


def test_a_toml_config_under_the_command_line(tiny_model, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'lora_rank = 4\nlearning_rate = 3e-4\nrandom_flip = true\nlora_target_mode = "all"\n'
    )
    argv = train_argv(
        tiny_model, tmp_path / "out", "--use_lora", "--config", str(config), "--lora_rank", "2"
    )
    args = train_sdxl.parse_args(argv)
    assert (args.lora_rank, args.learning_rate, args.random_flip, args.lora_target_mode) == (
        2,
        3e-4,
        True,
        "all",
    )
    assert (
        args.sources["lora_rank"] == "command line"
        and args.sources["learning_rate"] == "config file"
    )
    assert args.sources["adam_epsilon"] == "default"
    train_sdxl.main(args)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["learning_rate"] == 3e-4 and saved["sources"]["random_flip"] == "config file"
    config.write_text("lora_rnak = 4\n")
    with pytest.raises(UserError, match="unknown option 'lora_rnak'"):
        train_sdxl.parse_args(argv)


def test_neutral_values_of_every_new_option_give_todays_losses(tiny_model, tmp_path):
    """Each new option at its neutral value, through a config file: exactly the default run."""
    _, today = run(tiny_model, tmp_path / "a")
    config = tmp_path / "neutral.toml"
    config.write_text(
        'multires_noise_iterations = 0\nip_noise_gamma = 0.0\nloss_type = "l2"\n'
        "keep_tokens = 0\ncaption_tag_dropout_rate = 0.0\nshuffle_caption = false\n"
        'optimizer = "adamw"\nmasked_loss = false\ndebiased_estimation_loss = false\n'
        'min_timestep = 0\nmax_timestep = 1000\ntimestep_sampling = "uniform"\nlogit_std = 2.0\n'
    )
    _, neutral = run(tiny_model, tmp_path / "b", "--config", str(config))
    assert [r["loss"] for r in neutral] == [r["loss"] for r in today]
