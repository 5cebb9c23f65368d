"""Exact resume, resume_training.py and extract_lora_weights.py."""

import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, train_argv
from diffusers import StableDiffusionXLPipeline

import extract_lora_weights
import resume_training
import train_sdxl
import training.train_loop
from sdxl.checkpoint import load_checkpoint
from sdxl.errors import StoppedBySignal, UserError
from sdxl.lora_formats import attach_lora, read_lora_file
from sdxl.unet import load_unet

# 8 images, batch 2: 4 steps an epoch; 6 steps cross an epoch boundary.
COMMON = [
    "--use_lora",
    "--batch_size",
    "2",
    "--random_flip",
    "--lr_scheduler",
    "cosine",
    "--lr_warmup_steps",
    "2",
    "--learning_rate",
    "1e-3",
    "--use_ema",
]


def args_for(tiny_model, out, *extra):
    return train_sdxl.parse_args(train_argv(tiny_model, out, *COMMON, *extra))


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    last = train_sdxl.main(
        args_for(tiny_model, out, "--max_train_steps", "6", "--save_interval", "3")
    )
    return out, load_checkpoint(last)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == 6
    for k in a["lora"]:
        assert torch.equal(a["lora"][k], b["lora"][k]), k  # bitwise
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k


def test_resume_mid_epoch_equals_straight_run(tiny_model, tmp_path, straight):
    out, final = straight
    step3 = next(out.glob("lora_step000003_2*.pt"))
    assert load_checkpoint(step3)["position"] == 6  # samples: mid-epoch (8 a epoch)
    resumed = train_sdxl.main(
        args_for(tiny_model, tmp_path, "--max_train_steps", "6", "--resume", str(step3))
    )
    assert_same_weights(final, load_checkpoint(resumed))


def test_signal_saves_and_resume_finishes(tiny_model, tmp_path, straight, monkeypatch):
    _, final = straight
    real_step = training.train_loop.train_step
    calls = {"n": 0}

    def step_then_sigterm(tr, micro, reg):
        out = real_step(tr, micro, reg)
        calls["n"] += 1
        if calls["n"] == 5:  # after the epoch boundary
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(training.train_loop, "train_step", step_then_sigterm)
    with pytest.raises(StoppedBySignal) as info:  # exit code 143 from the command line
        train_sdxl.main(args_for(tiny_model, tmp_path, "--max_train_steps", "6"))
    assert info.value.signum == signal.SIGTERM
    stopped = info.value.checkpoint
    ckpt = load_checkpoint(stopped)
    assert ckpt["step"] == 5 and ckpt["epoch"] == 1 and ckpt["position"] == 2
    monkeypatch.setattr(training.train_loop, "train_step", real_step)
    resumed = train_sdxl.main(
        args_for(tiny_model, tmp_path, "--max_train_steps", "6", "--resume", str(stopped))
    )
    assert_same_weights(final, load_checkpoint(resumed))


def test_auto_skips_truncated_newest_and_execute_finishes(tiny_model, tmp_path, straight, capsys):
    out, final = straight
    folder = tmp_path / "ckpts"
    folder.mkdir()
    step3 = next(out.glob("lora_step000003_2*.pt"))
    (folder / step3.name).write_bytes(step3.read_bytes())
    (folder / "lora_step000006_broken.pt").write_bytes(
        final_bytes := (next(out.glob("lora_step000006_2*.pt")).read_bytes()[:1000])
    )
    assert len(final_bytes) == 1000
    assert resume_training.main(resume_training.parse_args(["--auto", str(folder)])) == 0
    printed = capsys.readouterr()
    assert "skipping" in printed.err and "lora_step000006_broken.pt" in printed.err
    assert f"--resume {folder / step3.name}" in printed.out and "step       3" in printed.out
    # --execute runs the printed command (with an override after --) and returns its exit code.
    new_out = tmp_path / "resumed"
    rc = resume_training.main(
        resume_training.parse_args(
            ["--auto", str(folder), "--execute", "--", "--output_dir", str(new_out)]
        )
    )
    assert rc == 0
    resumed = max(new_out.glob("lora_step000006_2*.pt"))
    assert_same_weights(final, load_checkpoint(resumed))


def test_list_shows_every_checkpoint(straight, capsys):
    out, _ = straight
    resume_training.main(resume_training.parse_args(["--list", str(out)]))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(list(out.glob("*.pt")))
    assert all("step" in line and "MiB" in line for line in lines)


def test_auto_on_empty_folder_is_one_line_error(tmp_path):
    res = subprocess.run(
        [sys.executable, "resume_training.py", "--auto", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: no loadable training checkpoint")


def test_extract_native_round_trip(tiny_model, tmp_path, straight):
    out, final = straight
    ckpt_path = max(out.glob("lora_step000006_2*.pt"))
    path = extract_lora_weights.main(
        extract_lora_weights.build_parser().parse_args(
            [str(ckpt_path), "--dtype", "fp32", "--output", str(tmp_path / "n.safetensors")]
        )
    )
    unet = load_unet(tiny_model / "unet")
    modules = read_lora_file(path, unet)
    for name, adapter in modules.items():
        assert torch.equal(adapter.down, final["lora"][f"{name}.lora.down.weight"])
        assert torch.equal(adapter.up, final["lora"][f"{name}.lora.up.weight"])
        assert adapter.alpha == 32.0
    ema_path = extract_lora_weights.main(
        extract_lora_weights.build_parser().parse_args([str(ckpt_path), "--ema", "--dtype", "fp32"])
    )
    assert ema_path.name.endswith("_native_ema.safetensors")
    ema = read_lora_file(ema_path, unet)
    name = next(iter(ema))
    assert torch.equal(ema[name].down, final["ema"]["shadow"][f"{name}.lora.down.weight"])


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_extracted_files_load_in_diffusers(tiny_model, tmp_path, straight, fmt):
    out, final = straight
    ckpt_path = max(out.glob("lora_step000006_2*.pt"))
    path = extract_lora_weights.main(
        extract_lora_weights.build_parser().parse_args(
            [
                str(ckpt_path),
                "--format",
                fmt,
                "--dtype",
                "fp32",
                "--output",
                str(tmp_path / f"{fmt}.safetensors"),
            ]
        )
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    pipe.load_lora_weights(path)
    ours = load_unet(tiny_model / "unet")
    attach_lora({"unet": ours}, read_lora_file(path, ours))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 96, generator=g)
    cond = {
        "text_embeds": torch.randn(1, 64, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }
    with torch.no_grad():
        ref = pipe.unet(x, 500, ctx, added_cond_kwargs=cond).sample
        got = ours(x, 500, ctx, cond)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_extract_bad_input(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"garbage")
    for path in (bad, tmp_path / "missing.pt"):
        with pytest.raises(UserError):
            extract_lora_weights.main(extract_lora_weights.build_parser().parse_args([str(path)]))
