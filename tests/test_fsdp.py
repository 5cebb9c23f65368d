"""--fsdp (training/sharded.py): full fine-tuning sharded with FSDP2 over two gloo processes on the
CPU, its sharded checkpoints, and resuming them with two processes and with one."""

import dataclasses
import os

import pytest
import torch
from conftest import train_argv
from safetensors.torch import load_file
from test_distributed import torchrun
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import train_sdxl
from sdxl.checkpoint import load_checkpoint
from sdxl.errors import UserError
from training.preflight import estimate_training, state_bytes
from training.sharded import unit_sizes
from training.specs import OptimizerSpec, StepSpec

# The SGM file's UNet keys (what the runs are compared on).
UNET = "model.diffusion_model."


def flags(tiny_model, out, batch_size, *extra):
    return train_argv(
        tiny_model,
        out,
        "--learning_rate",
        "1e-4",
        # (a large eps makes AdamW's update proportional to the gradient, so that the comparison
        # measures the gradients: see test_distributed.py)
        "--adam_epsilon",
        "1.0",
        "--batch_size",
        str(batch_size),
        "--gradient_accumulation_steps",
        "2",
        # 6 training images, 4 a step: an epoch a step, and a checkpoint after each epoch
        "--max_train_steps",
        "2",
        "--save_interval",
        "0",
        "--validation_split",
        "0.25",
        "--use_ema",
        *extra,
    )


def last(out):
    """The UNet of the run's last SGM file (epoch 2), and the path of that checkpoint."""
    path = max(out.glob("full_epoch0002_2*.pt"))
    state = load_file(path.with_suffix(".safetensors"))
    return {k: v for k, v in state.items() if k.startswith(UNET)}, path


def shards(path, tmp_path):
    """Everything a sharded checkpoint holds (weights, AdamW's state, EMA), gathered."""
    whole = tmp_path / f"{path.stem}.whole.pt"
    dcp_to_torch_save(path.with_suffix(".dcp"), whole)
    flat = {}

    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        else:
            flat[key] = value

    walk(torch.load(whole, weights_only=True), "")
    return flat


def test_two_sharded_processes_equal_one_and_resume_exactly(tiny_model, tmp_path):
    straight = tmp_path / "straight"
    res = torchrun(flags(tiny_model, straight, 1, "--fsdp"))
    assert res.returncode == 0, res.stderr[-3000:]
    a, path = last(straight)
    ckpt = load_checkpoint(path)
    assert ckpt["sharded"] == path.with_suffix(".dcp").name and ckpt["optimizer"] is None
    assert (straight / ckpt["sharded"]).is_dir() and ckpt["config"]["processes"] == 2
    held = shards(path, tmp_path)
    assert any(k.startswith("/optimizer/state/") and k.endswith("exp_avg") for k in held)
    assert any(k.startswith("/ema/") for k in held)
    first = max(straight.glob("full_epoch0001_2*.pt"))
    # The lowest-loss checkpoint is an epoch checkpoint's files linked under its name, shards too.
    lowest = next(straight.glob("full_step*_lowest_loss.pt"))
    recorded = load_checkpoint(lowest)  # (its own names are those of the checkpoint it links)
    assert recorded["unet_file"] != lowest.with_suffix(".safetensors").name
    assert os.path.samefile(lowest.with_suffix(".safetensors"), straight / recorded["unet_file"])
    shards_of = [lowest.with_suffix(".dcp"), straight / recorded["sharded"]]
    assert os.path.samefile(*(folder / ".metadata" for folder in shards_of))

    # Two processes again, from the first epoch's shards: the same bits, shards included.
    again = tmp_path / "again"
    res = torchrun(flags(tiny_model, again, 1, "--fsdp", "--resume", str(first)))
    assert res.returncode == 0, res.stderr[-3000:]
    b, path_b = last(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = shards(path_b, tmp_path)
    assert resumed.keys() == held.keys()
    assert all(torch.equal(held[k], resumed[k]) if torch.is_tensor(held[k]) else
               held[k] == resumed[k] for k in held)  # fmt: skip

    # One process without FSDP, twice the batch, from the same shards: the same weights within
    # the order of floating-point sums (the two halves of a batch reduced across processes):
    # stated tolerance 1e-6 absolute (measured 1e-8).
    one = tmp_path / "one"
    train_sdxl.main(train_sdxl.parse_args(flags(tiny_model, one, 2, "--resume", str(first))))
    c, _ = last(one)
    assert a.keys() == c.keys() and len(a) > 100
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=1e-6)


def test_a_whole_checkpoint_is_not_resumed_sharded(tiny_model, tmp_path):
    """A checkpoint saved without --fsdp has its optimizer state whole: one line."""
    out = tmp_path / "whole"
    argv = flags(tiny_model, out, 2, "--max_train_steps", "1", "--validation_split", "0")
    last = train_sdxl.main(train_sdxl.parse_args(argv))
    with pytest.raises(UserError, match="saved without --fsdp; resume it without --fsdp"):
        train_sdxl.main(train_sdxl.parse_args([*argv, "--fsdp", "--resume", str(last)]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--use_lora"], "a LoRA's are few"),
        (["--full_bf16"], "drop --full_bf16 or --fsdp"),
        (["--fused_backward_pass"], "drop --fused_backward_pass or --fsdp"),
        (["--optimizer", "adafactor"], "--optimizer adafactor does not take sharded tensors"),
    ],
)
def test_what_fsdp_does_not_go_with_is_one_line(tiny_model, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train_sdxl.main(train_sdxl.parse_args(train_argv(tiny_model, tmp_path, "--fsdp", *extra)))


def test_the_preflight_models_the_shards(tiny_model):
    """--estimate_memory --fsdp --num_processes N: the one-process trace of fused steps, with the
    weights, gradients and AdamW's state divided by N; more processes, less memory each, and
    the step's resident bytes are (W + G + S) / N."""
    from conftest import tiny_specs

    specs = dataclasses.replace(
        tiny_specs(),
        adapter=None,
        optimizer=OptimizerSpec(),
        step=StepSpec(precision="bf16", fsdp=True),
    )
    two, eight = (estimate_training(specs, tiny_model, processes=n) for n in (2, 8))
    assert eight.peak < two.peak
    from sdxl.pretrained import load_sdxl

    params = list(load_sdxl(tiny_model, torch.float32).unet.parameters())
    w = sum(p.numel() * 4 for p in params)
    resident = (w + w + state_bytes(OptimizerSpec(), params)) // 8
    last = eight.phases[-1]
    assert last.name.startswith("the optimizer step on the shards")
    assert abs(last.live - resident - w // 8) <= 64 * 2**20  # (+ AdamW's temporaries, workspace)
    assert "FSDP over 8 processes" in eight.report()
    # Every parameter is gathered by exactly one unit (or the UNet itself), and units hold some.
    own, root = unit_sizes(load_sdxl(tiny_model, torch.float32).unet)
    assert sum(own) + root == sum(p.numel() for p in params) and min(own) > 0 and root > 0


def test_overfitting_one_batch_lowers_the_loss_sharded(tiny_model):
    """The whole tiny UNet sharded (a group of one process) and trained on one batch: its
    parameters are FSDP's DTensors, and the loss falls."""
    from conftest import EXAMPLES, tiny_specs
    from torch.distributed.tensor import DTensor

    from sdxl.device import init_distributed, resolve_precision
    from sdxl.pretrained import load_sdxl
    from training.data_loader import SampleRules, TrainingData, collate
    from training.scan import scan
    from training.train_loop import build_trainer, train_step

    torch.manual_seed(0)
    dist = init_distributed("cpu", group=True)
    try:
        precision = resolve_precision("fp32", dist.device, True)
        parts = load_sdxl(tiny_model, torch.float32)
        specs = tiny_specs(
            None,
            OptimizerSpec(learning_rate=1e-3),
            StepSpec(precision="fp32", fsdp=True),
        )
        specs = dataclasses.replace(specs, adapter=None)
        encoders = (parts.vae.moments, parts.text_encoder.encode)
        tr = build_trainer(specs, parts, *encoders, precision, dist, max_steps=6)
        assert tr.sharded and all(isinstance(p, DTensor) for p in tr.unet.parameters())
        data = TrainingData(scan(EXAMPLES)[:2], 32, rules=SampleRules(center_crop=True))
        batch = collate([data[(0, 0)], data[(1, 1)]])
        losses = [train_step(tr, [batch], [])[0].item() for _ in range(6)]
    finally:
        dist.close()
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
