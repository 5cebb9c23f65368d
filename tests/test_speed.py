"""The training step and the sampling loop as CUDA graphs, and --compile (sdxl/capture.py).

On the CPU the graphs' path runs without capturing (`--cuda_graph` "uncaptured" in the specs): static
input buffers, one entry per input shape, kept gradients, tensor learning rates. It must give the eager
run's numbers bit for bit. The captured graphs themselves are checked on CUDA, skipped elsewhere.
"""

import dataclasses
import functools
import json

import pytest
import torch
from conftest import train_argv
from PIL import Image

import train_sdxl
import training.train_loop
from cli.generate import build_parser as build_generation_parser
from cli.train import build_parser, training_specs
from sampling.inference import Pipeline, generate_unique_batch, graphed_calls
from sdxl.capture import Graphed
from sdxl.checkpoint import load_checkpoint
from sdxl.device import Distributed
from sdxl.pretrained import load_sdxl
from training.optimizers import build_optimizer, tensor_learning_rates
from training.specs import OptimizerSpec
from training.train_loop import cuda_graph_obstacle

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def graph_path_on_cpu(monkeypatch):
    """train_sdxl.main with the graphs' path, run eagerly (what the CPU can do)."""

    def specs_with_graph_path(args):
        specs = training_specs(args)
        return dataclasses.replace(
            specs, step=dataclasses.replace(specs.step, cuda_graph="uncaptured")
        )

    monkeypatch.setattr(train_sdxl, "training_specs", specs_with_graph_path)


def two_shapes(folder):
    """6 images in two aspect-ratio buckets (192x64 and 64x192 at --image_size 128)."""
    folder.mkdir()
    for i in range(6):
        size = [(300, 100), (100, 300)][i % 2]
        Image.new("RGB", size, (40 * i, 100, 200 - 30 * i)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a shape, number {i}")
    return folder


# Everything the step does besides the UNet: accumulation, two input shapes, the LR warm-up,
# EMA, min-SNR, noise offset, caption dropout, validation between steps.
STEP_OPTIONS = [
    "--use_lora",
    "--bucket",
    "--image_size",
    "128",
    "--gradient_accumulation_steps",
    "2",
    "--lr_scheduler",
    "cosine",
    "--lr_warmup_steps",
    "2",
    "--learning_rate",
    "1e-3",
    "--use_ema",
    "--snr_gamma",
    "5",
    "--noise_offset",
    "0.05",
    "--caption_dropout",
    "0.3",
    "--validation_split",
    "0.34",
    "--validation_steps",
    "2",
]


def run(tiny_model, data, out, *extra):
    prompts = data.parent / "prompts.txt"
    prompts.write_text("a red square\n")
    argv = train_argv(tiny_model, out, *STEP_OPTIONS, *extra)
    argv += ["--validation_prompts", str(prompts), "--validation_sampling_steps", "2"]
    argv[argv.index("--data_dir") + 1] = str(data)
    return train_sdxl.main(train_sdxl.parse_args(argv))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, tolerance=0.0):
    """The same adapters and EMA: bitwise, or within `tolerance` of the largest weight."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["step"] == cb["step"]
    pairs = [(ca["lora"][k], cb["lora"][k], k) for k in ca["lora"]]
    pairs += [(ca["ema"]["shadow"][k], cb["ema"]["shadow"][k], k) for k in ca["ema"]["shadow"]]
    for x, y, k in pairs:
        assert (x - y).abs().max() <= tolerance * y.abs().max(), k


def test_graph_path_equals_eager_and_resumes_exactly(tiny_model, tmp_path, capsys, monkeypatch):
    data = two_shapes(tmp_path / "data")
    steps = ("--max_train_steps", "4", "--save_interval", "2")
    eager = run(tiny_model, data, tmp_path / "eager", *steps)
    graph_path_on_cpu(monkeypatch)
    capsys.readouterr()
    graphed = run(tiny_model, data, tmp_path / "graphed", *steps)
    printed = capsys.readouterr().out
    # One entry per input shape: images (B, 3, H, W) of 64x192 and 192x64 (the step encodes them).
    assert "1x3x192x64" in printed and "1x3x64x192" in printed and "shapes: 2" in printed
    assert_same_run(graphed, eager)  # bitwise
    m_graphed, m_eager = metrics(tmp_path / "graphed"), metrics(tmp_path / "eager")
    for key in ("loss", "grad_norm", "val_loss", "lr"):
        assert [r.get(key) for r in m_graphed] == [r.get(key) for r in m_eager], key
    for step in (2, 4):  # validation images between the steps, with the EMA weights swapped in
        name = f"validation_step{step:06d}.png"
        graphed_image = Image.open(tmp_path / "graphed" / name)
        assert graphed_image.tobytes() == Image.open(tmp_path / "eager" / name).tobytes()
    # The learning rate, a tensor in the graphs' path, followed the warm-up and the cosine.
    lrs = [r["lr"] for r in m_graphed]
    assert lrs == [r["lr"] for r in m_eager] and lrs[0] < lrs[1]

    # Resume on the graphs' path: from the step-2 checkpoint to step 4, the same bits.
    step2 = next((tmp_path / "graphed").glob("lora_step000002_*.pt"))
    resumed = run(tiny_model, data, tmp_path / "resumed", *steps, "--resume", str(step2))
    assert_same_run(resumed, graphed)


def test_the_micro_step_reads_nothing_back(tiny_model, tmp_path, monkeypatch):
    """A graph cannot hold a value read back to the host (or a Python decision on one): with every
    option that adds work to the step, the micro-step (forward, loss, backward) makes no such read.
    (The update is not checked here: on the CPU, AdamW's non-capturable path reads its learning
    rate, which the capturable one on CUDA does not.)"""
    micro = training.train_loop.micro_step
    calls = []

    def read_back(*args, name, **kwargs):
        raise AssertionError(f"the micro-step read a value back to the host: Tensor.{name}")

    def guarded(*inputs):
        calls.append(1)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
                m.setattr(torch.Tensor, name, functools.partialmethod(read_back, name=name))
            return micro(*inputs)

    monkeypatch.setattr(training.train_loop, "micro_step", guarded)
    options = ["--use_lora", "--use_dora", "--conv_rank", "4", "--max_train_steps", "2"]
    options += ["--snr_gamma", "5", "--debiased_estimation_loss", "--noise_offset", "0.1"]
    options += [
        "--multires_noise_iterations",
        "3",
        "--ip_noise_gamma",
        "0.1",
        "--lora_dropout",
        "0.1",
    ]
    train_sdxl.main(train_sdxl.parse_args(train_argv(tiny_model, tmp_path, *options)))
    assert len(metrics(tmp_path)) == 2 and len(calls) == 2  # both steps ran through the guard


def test_learning_rate_tensor_is_filled_in_place(tiny_model, tmp_path):
    """A graph reads the learning rate from one tensor: the schedule must change that tensor's
    value, not replace it; and an optimizer state saved with float learning rates (by earlier
    versions) loads into the tensor form."""
    spec = OptimizerSpec(learning_rate=1e-3, lr_scheduler="linear", warmup_steps=3)
    weight, twin = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer, schedule = build_optimizer([("unet.w", weight)], ["unet"], spec, 10)
    plain_optimizer, plain_schedule = build_optimizer([("unet.w", twin)], ["unet"], spec, 10)
    tensor_learning_rates(optimizer, torch.device("cpu"))
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    seen = []
    for _ in range(5):
        for p, opt, sched in (
            (weight, optimizer, schedule),
            (twin, plain_optimizer, plain_schedule),
        ):
            p.grad = torch.ones(3)
            opt.step()
            sched.step()
        assert optimizer.param_groups[0]["lr"] is lr  # the same tensor, filled in place
        seen.append(float(lr))
        assert seen[-1] == pytest.approx(plain_optimizer.param_groups[0]["lr"], rel=1e-6)
    assert seen[0] < seen[1] < seen[2] > seen[3] > seen[4]  # warm-up, then the linear decay

    optimizer.load_state_dict(plain_optimizer.state_dict())
    tensor_learning_rates(optimizer, torch.device("cpu"))
    group = optimizer.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and float(group["lr"]) == pytest.approx(seen[-1])
    assert optimizer.state[weight]["step"].dtype == torch.float32


def test_what_runs_eagerly_says_why(tiny_model, tmp_path):
    def options(*extra):
        argv = train_argv(tiny_model, tmp_path, "--use_lora", *extra)
        return training_specs(train_sdxl.parse_args(argv))

    one, two = Distributed(0, 1, torch.device("cuda")), Distributed(0, 2, torch.device("cuda"))
    assert cuda_graph_obstacle(options(), one) is None
    assert "torchrun" in cuda_graph_obstacle(options(), two)
    assert "fp16" in cuda_graph_obstacle(options("--precision", "fp16"), one)
    assert "--train_text_encoder" in cuda_graph_obstacle(options("--train_text_encoder"), one)
    assert "prodigy" in cuda_graph_obstacle(options("--optimizer", "prodigy"), one)


def test_graphed_call_keeps_one_entry_per_signature():
    calls = []

    def fn(x, y):
        calls.append(x.shape)
        return x * 2 + y, x.sum()

    graphed = Graphed(fn, capture=False)
    a = graphed(torch.ones(2, 3), torch.zeros(2, 3))
    b = graphed(torch.full((2, 3), 3.0), torch.ones(2, 3))
    c = graphed(torch.ones(4, 3), torch.ones(4, 3))
    assert len(graphed.entries) == 2 and graphed.captured == 0
    assert torch.equal(a[0], torch.full((2, 3), 2.0)) and float(a[1]) == 6
    assert torch.equal(b[0], torch.full((2, 3), 7.0)) and float(b[1]) == 18
    assert torch.equal(c[0], torch.full((4, 3), 3.0))
    # The second call ran on the first call's buffers, refilled with its own inputs.
    entry = graphed.entries[next(iter(graphed.entries))]
    assert torch.equal(entry.inputs[0], torch.full((2, 3), 3.0))


def test_graphed_sampling_equals_eager(tiny_model):
    parts = load_sdxl(tiny_model, torch.float32)
    pipe = Pipeline(parts.unet, parts.text_encoder, parts.vae, parts.schedule, "cpu", torch.float32)
    graphed = graphed_calls(pipe, capture=False)
    for size in (64, 32):  # two sizes: two graphs' worth of buffers
        expected = generate_unique_batch(pipe, ["a red cube", "a ball"], [1, 2], size, size, 3)
        got = generate_unique_batch(graphed, ["a red cube", "a ball"], [1, 2], size, size, 3)
        assert torch.equal(got, expected)


def test_compile_gives_the_eager_losses(tiny_model, tmp_path, capsys):
    """--compile traces the blocks (with their adapters and checkpointing) into graphs; the
    aot_eager backend runs those graphs without inductor's C++ compiling, which takes minutes
    on a small CPU. Tolerance: 1e-5 relative (the traced graphs may order a few ops differently)."""
    losses = {}
    for name, extra in (
        ("eager", []),
        ("compiled", ["--compile", "--compile_backend", "aot_eager"]),
    ):
        out = tmp_path / name
        argv = train_argv(tiny_model, out, "--use_lora", "--max_train_steps", "3", *extra)
        train_sdxl.main(train_sdxl.parse_args(argv))
        losses[name] = [r["loss"] for r in metrics(out)]
    assert "--compile: new input shape" in capsys.readouterr().out
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# On CUDA: the captured graphs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def deterministic_kernels():
    """Kernels without atomics (SDPA's math backend, deterministic cuDNN), so that two runs differ
    only by what is under test: training amplifies a last-bit difference in one step (an
    attention backward's atomic adds) to 1e-4 of the weights within a few steps."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cudnn = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = cudnn


@cuda
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-6), ("bf16", 1e-2)])
def test_cuda_graph_equals_eager_after_10_steps(
    tiny_model, tmp_path, precision, tolerance, deterministic_kernels, capsys
):
    """10 steps replayed as CUDA graphs against 10 eager steps (the same kernels, launched one by
    one), with an LR warm-up (so each replay must read that step's learning rate) and two
    accumulated micro-batches. Tolerance, relative to each tensor's largest weight: 1e-6 in fp32;
    1e-2 in bf16, whose 8-bit mantissa turns any difference of operation order into that much."""
    runs = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        argv = train_argv(tiny_model, out, "--use_lora", "--max_train_steps", "10")
        argv += ["--device", "cuda", "--precision", precision, "--cuda_graph", mode]
        argv += ["--lr_warmup_steps", "5", "--learning_rate", "1e-3"]
        argv += ["--gradient_accumulation_steps", "2", "--batch_size", "2"]
        runs[mode] = load_checkpoint(train_sdxl.main(train_sdxl.parse_args(argv)))
    assert "CUDA graphs: 1" in capsys.readouterr().out  # one shape: one graph of the micro-step
    for k, graphed in runs["auto"]["lora"].items():
        eager = runs["off"]["lora"][k]
        assert (graphed - eager).abs().max() <= tolerance * eager.abs().max(), k


@cuda
def test_cuda_graph_sampling_equals_eager(tiny_model, deterministic_kernels):
    parts = load_sdxl(tiny_model, torch.float32, "cuda")
    pipe = Pipeline(
        parts.unet, parts.text_encoder, parts.vae, parts.schedule, "cuda", torch.float32
    )
    graphed = graphed_calls(pipe, capture=True)
    expected = generate_unique_batch(pipe, ["a red cube"], [1], 64, 64, 5)
    got = generate_unique_batch(graphed, ["a red cube"], [1], 64, 64, 5)
    assert (got - expected).abs().max() <= 1e-6


def test_flags_are_documented():
    help_text = build_parser().format_help()
    assert "--cuda_graph {auto,off}" in help_text and "--compile" in help_text
    gen = build_generation_parser().format_help()
    assert "--cuda-graph {auto,off}" in gen and "--compile" in gen
