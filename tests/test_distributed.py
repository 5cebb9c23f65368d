"""Data-parallel training under torchrun on the CPU (gloo): same weights as one process."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, train_argv

import train_sdxl
from sdxl.checkpoint import load_checkpoint
from sdxl.device import Distributed


def flags(tiny_model, out, batch_size, *extra):
    return train_argv(
        tiny_model,
        out,
        "--use_lora",
        "--random_flip",
        "--learning_rate",
        "1e-3",
        "--batch_size",
        str(batch_size),
        # AdamW divides by sqrt(v) + eps: with the default eps, gradients that are ~0 (the LoRA
        # down weights early on) turn rounding differences into full-size updates. A large eps
        # makes the update proportional to the gradient, so the comparison measures the gradients.
        "--adam_epsilon",
        "1.0",
        # Every adapter kind: the text encoders' gradients are averaged outside DDP.
        "--train_text_encoder",
        "--use_dora",
        "--conv_rank",
        "2",
        *extra,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "train_sdxl.py",
        *argv,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def newest(out: Path, step: int) -> dict:
    return load_checkpoint(max(out.glob(f"lora_step{step:06d}_2*.pt")))


def test_two_processes_equal_one_with_the_same_global_batch(tiny_model, tmp_path):
    single = tmp_path / "single"
    train_sdxl.main(train_sdxl.parse_args(flags(tiny_model, single, 2, "--max_train_steps", "5")))
    ddp = tmp_path / "ddp"
    res = torchrun(flags(tiny_model, ddp, 1, "--max_train_steps", "5", "--save_interval", "3"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (ddp / "config.json").is_file() and len(
        (ddp / "metrics.jsonl").read_text().splitlines()
    ) == 5
    a, b = newest(single, 5), newest(ddp, 5)
    assert any(k.startswith("text_encoder_2.") for k in a["lora"])
    # 5 steps x 2 samples, 8 an epoch
    assert b["config"]["processes"] == 2 and b["position"] == a["position"] == 2
    for k in a["lora"]:
        # Same samples, noise and timesteps; only the order of floating-point sums differs
        # (all-reduce of two half-batch gradients): stated tolerance 1e-5 absolute (measured below 1e-6).
        torch.testing.assert_close(a["lora"][k], b["lora"][k], rtol=0, atol=1e-5)

    # Resume the two-process run's step-3 checkpoint in one process: same result again.
    step3 = max(ddp.glob("lora_step000003_2*.pt"))
    resumed = tmp_path / "resumed"
    last = train_sdxl.main(
        train_sdxl.parse_args(
            flags(tiny_model, resumed, 2, "--max_train_steps", "5", "--resume", str(step3))
        )
    )
    c = load_checkpoint(last)
    for k in a["lora"]:
        torch.testing.assert_close(a["lora"][k], c["lora"][k], rtol=0, atol=1e-5)


def test_collectives_get_tensors_on_the_training_device(monkeypatch):
    """NCCL, the backend on GPUs, has no CPU tensors: an all_reduce of a CPU tensor fails there with
    "No backend type associated with device type cpu". On a CPU-only machine the training device
    cannot differ from the CPU in a real run, so the process's device here is the meta device, and
    a patched all_reduce records what it is handed (and stops there: a meta tensor has no value)."""
    handed: list[torch.device] = []

    class Reached(Exception):
        pass

    def all_reduce(tensor, op=None, **kwargs):
        handed.append(tensor.device)
        raise Reached

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with pytest.raises(Reached):
        Distributed(rank=1, world=2, device=torch.device("meta")).any(True)
    assert handed == [torch.device("meta")]
    # One process: no collective at all.
    assert Distributed(0, 1, torch.device("meta")).any(True) is True and len(handed) == 1
