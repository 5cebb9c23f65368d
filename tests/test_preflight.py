"""The memory preflight (sdxl/memory.py, training/preflight.py, sampling/preflight.py): its bytes are
the real tensors', the meta device predicts a real step's memory, an ordering fault shows, the
calibration against an H200 holds, and every target of the GPU memory table is met on the
full-size configs (the figures README.md lists as predicted)."""

import contextlib
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, ROOT, tiny_specs

import training.train_loop
from sampling.preflight import estimate_generation
from sdxl.device import Distributed, resolve_precision
from sdxl.lora import apply_lora_to_unet, get_lora_state_dict
from sdxl.memory import BLOCK, WORKSPACE, GiB, MemoryTrace, MiB, simulated_cuda_graphs
from sdxl.pretrained import SDXL_CONFIGS, config_parts, load_sdxl, model_configs
from sdxl.unet import load_unet
from training.preflight import Validation, estimate_training, synthetic_batch
from training.specs import (
    AdapterSpec,
    DataSpec,
    LossSpec,
    ModelSpec,
    OptimizerSpec,
    StepSpec,
    TrainSpecs,
)
from training.train_loop import build_trainer, prepare


def rounded_bytes(tensors) -> int:
    """What the allocator holds for these tensors: each storage once, in 512-byte blocks."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum((n + BLOCK - 1) // BLOCK * BLOCK for n in storages.values())


def test_weights_and_adapters_arrive_with_their_real_bytes(tiny_model):
    real = load_unet(tiny_model / "unet", torch.bfloat16)
    parts = config_parts(tiny_model, torch.bfloat16)
    with MemoryTrace() as trace:
        parts.unet.to("meta")
        assert trace.live == rounded_bytes([*real.parameters(), *real.buffers()])
        parts.unet.to("cpu")
        assert trace.live == 0  # left for the host
    apply_lora_to_unet(real, 4, 8)
    apply_lora_to_unet(parts.unet, 4, 8)
    with MemoryTrace() as trace:
        parts.unet.to("meta")
        adapters = rounded_bytes(get_lora_state_dict(real).values())
        assert trace.live == rounded_bytes([*real.parameters(), *real.buffers()])
        assert adapters > 0 and trace.live - adapters == rounded_bytes(
            [t for k, t in real.state_dict().items() if ".lora." not in k]
        )


def test_training_brings_the_vae_encoder_and_never_its_decoder(tiny_model):
    """`SDXLVAE.encode_on`: the encoder and quant_conv arrive with their real bytes; the decoder
    and post_quant_conv stay on the host, and what they compute is the host's (decoding adds
    nothing on the device; on a GPU the latents go to the host first)."""
    real = load_sdxl(tiny_model, torch.float32).vae.vae
    parts = config_parts(tiny_model, torch.float32)
    with MemoryTrace() as trace:
        parts.vae.encode_on("meta")
        encoding = [*real.encoder.parameters(), *real.quant_conv.parameters()]
        assert trace.live == rounded_bytes(encoding)
        assert trace.reserved_default == trace.live
        latents = torch.zeros(1, 4, 8, 8, device="meta")
        before = trace.reserved_default
        assert parts.vae.decode(latents).shape == (1, 3, 64, 64)
        # on the device only latents / scaling_factor, the step before the host's decoder
        assert trace.reserved_default - before <= rounded_bytes([latents])


def traced_step(tiny_model, device: str) -> int:
    """The peak of one real micro-step and update of the tiny model, traced on `device`: on the
    CPU with real tensors, or on the meta device as the preflight runs it."""
    specs = tiny_specs(step=StepSpec(precision="fp32", cuda_graph="off"))
    if device == "cpu":
        parts = load_sdxl(tiny_model, torch.float32)
    else:
        parts = config_parts(tiny_model, torch.float32, torch.float32)
    dist = Distributed(0, 1, torch.device(device))
    precision = resolve_precision("fp32", torch.device("cpu"))
    torch.manual_seed(0)
    with MemoryTrace(torch.device(device)) as trace:
        parts.unet.to(device)
        parts.vae.to(device)
        encoders = (parts.vae.moments, parts.text_encoder.encode)
        tr = build_trainer(specs, parts, *encoders, precision, dist, 10)
        inputs = prepare(tr, synthetic_batch(specs.data, 32, 32, "a red circle"))
        start, trace.reserved_default = trace.live, trace.live
        tr.micro_step(*inputs, torch.tensor([1.0, 1.0], device=device))
        tr.optimizer_update()
        return trace.reserved_default - start


def test_the_meta_device_predicts_a_real_cpu_step_within_5_percent(tiny_model, monkeypatch):
    """The same step: AdamW capturable on both sides, as on a GPU (on the CPU a run's is not).
    Measured equal to the byte."""
    as_on_a_gpu = training.train_loop.tensor_learning_rates

    def capturable(optimizer, device):
        as_on_a_gpu(optimizer, device)
        for group in optimizer.param_groups:
            group["capturable"] = True

    monkeypatch.setattr(training.train_loop, "tensor_learning_rates", capturable)
    real, predicted = traced_step(tiny_model, "cpu"), traced_step(tiny_model, "meta")
    assert real > 0 and abs(predicted - real) <= 0.05 * real, (real, predicted)


FULL = Path(SDXL_CONFIGS)


def sdxl_specs(size=1024, cached=False, fp8=False, graphs=True) -> TrainSpecs:
    """LoRA rank 4 on attention, bf16, checkpointing, batch 1: the GPU memory table's runs."""
    data = DataSpec(
        Path("."), size=(size, size), cache_latents=cached, cache_text_embeddings=cached
    )
    step = StepSpec(precision="bf16", fp8_base=fp8, cuda_graph="auto" if graphs else "off")
    adapter = AdapterSpec(rank=4, alpha=4)
    return TrainSpecs(data, ModelSpec(str(FULL)), adapter, LossSpec(), OptimizerSpec(), step)


def test_fp8_target_and_an_fp8_conversion_on_the_device_raises_the_prediction(monkeypatch):
    fixed = estimate_training(sdxl_specs(cached=True, fp8=True), FULL).peak
    assert fixed <= 4.5 * GiB  # the target of a cached 1024 px run with --fp8_base
    store = training.train_loop.store_in_fp8

    def converted_on_the_device(unet):  # the order before this version: move, then convert
        unet.to("meta")
        return store(unet)

    monkeypatch.setattr(training.train_loop, "store_in_fp8", converted_on_the_device)
    wrong = estimate_training(sdxl_specs(cached=True, fp8=True), FULL).peak
    assert wrong > fixed + 2 * GiB, (fixed / GiB, wrong / GiB)  # 5.53 against 3.15: the bf16 UNet


@pytest.mark.parametrize("checkpointing, measured_mib", [(True, 568), (False, 4988)])
def test_calibration_against_the_h200_step(checkpointing, measured_mib):
    """The 1024 px LoRA step (rank 4, attention, bf16, AdamW) measured on an H200 (ADVANCED.md,
    section 11): its memory above the weights, traced plus WORKSPACE, within 10%."""
    parts = config_parts(FULL, torch.bfloat16, torch.float16)
    specs = sdxl_specs(cached=True, graphs=False)
    specs = dataclasses.replace(specs, step=StepSpec("bf16", checkpointing, cuda_graph="off"))
    dist = Distributed(0, 1, torch.device("meta"))
    precision = resolve_precision("bf16", torch.device("cuda"))
    with MemoryTrace() as trace, simulated_cuda_graphs(trace):
        tr = build_trainer(specs, parts, lambda m: m, None, precision, dist, 10)
        b = torch.zeros(1, 8, 128, 128, device="meta")
        ctx = torch.zeros(1, 77, 2048, device="meta", dtype=torch.float16)
        pooled = torch.zeros(1, 1280, device="meta", dtype=torch.float16)
        rest = (torch.zeros(1, 6, device="meta"), torch.zeros(1, dtype=torch.int64, device="meta"))
        mask, scale = torch.ones(1, 1, 128, 128, device="meta"), torch.ones(2, device="meta")
        before = trace.live
        trace.reserved_default = trace.live
        tr.micro_step(b, ctx, pooled, *rest, mask, scale)
        tr.optimizer_update()
        traced = (trace.reserved_default - before + WORKSPACE) / MiB
    assert abs(traced - measured_mib) <= 0.10 * measured_mib, traced


# The GPU memory table's targets (GiB of max_memory_reserved), each predicted on the full-size
# configs.
def test_training_targets():
    cached = estimate_training(sdxl_specs(cached=True), FULL, validation=Validation(prompts=1))
    step_rows = [p.reserved for p in cached.phases if p.name.startswith("step 2")]
    assert step_rows[0] <= 6.0 * GiB  # cached, without validation images
    assert cached.peak <= 6.0 * GiB  # and with them
    assert estimate_training(sdxl_specs(1024), FULL).peak <= 9.0 * GiB
    assert estimate_training(sdxl_specs(512), FULL).peak <= 7.0 * GiB


def test_generation_targets():
    for batch, target in ((1, 8.0), (4, 9.0)):
        trace = estimate_generation(FULL, size=(1024, 1024), batch=batch, precision="bf16")
        assert trace.peak <= target * GiB, (batch, trace.peak / GiB)


def test_the_scripts_estimate_without_data_or_a_gpu(tmp_path, capsys):
    """--estimate_memory / --estimate-memory: the table, exit code 0, nothing written; without the
    model, the shipped configs are read and said to be."""
    import generate_images
    import train_sdxl

    assert "shipped SDXL base configs" in model_configs(str(tmp_path / "absent"))[1]
    assert model_configs("tiny")[1] == ""
    train = ["--estimate_memory", "--use_lora", "--bucket", "--pretrained_model", "tiny"]
    train += ["--image_size", "64", "--data_dir", str(EXAMPLES), "--validation_split", "0.2"]
    assert (
        train_sdxl.main(train_sdxl.parse_args(train + ["--output_dir", str(tmp_path / "o")])) == 0
    )
    printed = capsys.readouterr().out
    assert "predicted max_memory_reserved:" in printed and "the UNet arrives" in printed
    assert "validation loss" in printed
    gen = ["--estimate-memory", "--prompt", "a cat", "--pretrained-model", "tiny"]
    gen += ["--image-size", "64", "--batch-size", "2", "--output-dir", str(tmp_path / "g")]
    assert generate_images.main(generate_images.parse_args(gen)) == 0
    assert "batch 2: (replays)" in capsys.readouterr().out
    assert not (tmp_path / "o").exists() and not (tmp_path / "g").exists()


def test_the_gpu_report_runs_on_the_cpu(tmp_path):
    """bench/gpu_report.py on the CPU: every part on the tiny model, a report with its rows."""
    argv = [sys.executable, "bench/gpu_report.py", "--output", str(tmp_path)]
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["train"]) == 2 and all("images_per_s" in r for r in report["train"])
    assert [(r["fp8"], r["interval"]) for r in report["train"]] == [(True, 1), (False, 2)]
    assert all(r["predicted_GiB"] for r in report["train"])
    assert len(report["generate"]) == 2 and all("s_per_image" in r for r in report["generate"])
    assert all("skipped" in r["result"] for r in report["checks"])
    assert "| 64 px, batch 4, eager |" in (tmp_path / "report.md").read_text()


# -- the run's check at the start, and the risks the GPU review found, settled ----------------------


def test_a_run_that_would_not_fit_stops_naming_flags_that_would(tiny_model):
    from sdxl.errors import UserError
    from training.preflight import ALTERNATIVES, check_fits

    specs = dataclasses.replace(tiny_specs(), step=StepSpec(precision="bf16"))
    uncached = estimate_training(specs, tiny_model).peak
    cached = estimate_training(
        dataclasses.replace(specs, data=dataclasses.replace(specs.data, cache_latents=True, cache_text_embeddings=True)),  # fmt: skip
        tiny_model,
    ).peak
    assert cached < uncached
    check_fits(specs, tiny_model, Validation(), uncached, uncached)  # fits: nothing said
    with pytest.raises(UserError, match="flags that would fit: --cache_latents --cache_text_emb"):
        check_fits(specs, tiny_model, Validation(), cached, uncached)
    with pytest.raises(UserError, match="none of the usual flag changes does"):
        check_fits(specs, tiny_model, Validation(), 1, uncached, ALTERNATIVES[:1])


def test_a_capture_that_fails_runs_eagerly_with_one_line(capsys, monkeypatch):
    """torch before 2.10 cannot capture the checkpointing's RNG state: the function then runs
    eagerly, its results unchanged, and one line says so."""
    from sdxl.capture import Graphed

    trace = MemoryTrace()
    with trace, simulated_cuda_graphs(trace):

        @contextlib.contextmanager
        def failing(*args, **kwargs):
            raise RuntimeError("Cannot call CUDAGeneratorImpl::current_seed during capture")
            yield

        monkeypatch.setattr(torch.cuda, "graph", failing)
        graphed = Graphed(lambda x: x * 2, capture=True, label="step")
        x = torch.ones(3)
        assert torch.equal(graphed(x), x * 2) and torch.equal(graphed(x + 1), (x + 1) * 2)
    printed = capsys.readouterr().out
    assert "step: capture failed (Cannot call CUDAGeneratorImpl" in printed
    assert "running eagerly" in printed and not graphed.capture


def test_autocast_keeps_no_weight_cache():
    """A cache of cast weights would outlive a CUDA graph's capture."""
    precision = resolve_precision("bf16", torch.device("cpu"), full_finetune=True)
    with precision.autocast():
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()


def test_ddp_leaves_frozen_fp8_weights_and_buffers_out_of_its_sync(tiny_model, monkeypatch):
    """Under torchrun a LoRA UNet stored in fp8 is wrapped with its frozen weights and buffers
    ignored by DDP (which cannot broadcast fp8 weights): gloo, one process."""
    import torch.distributed as dist

    from sdxl.frozen import store_in_fp8

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        unet = load_unet(tiny_model / "unet")
        apply_lora_to_unet(unet, 4, 8)
        store_in_fp8(unet)
        model = Distributed(0, 2, torch.device("cpu")).wrap(unet)  # (2: to wrap at all)
        ignored = set(model.parameters_to_ignore)
        frozen = {n for n, p in unet.named_parameters() if not p.requires_grad}
        assert frozen and frozen | {n for n, _ in unet.named_buffers()} == ignored
        x, t, ctx, cond = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 96), {})
        cond = {"text_embeds": torch.randn(1, 64), "time_ids": torch.ones(1, 6)}
        model(x, t, ctx, cond).square().mean().backward()
        assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


def test_torchrun_waits_for_single_process_phases(monkeypatch):
    """The process group's timeout is --ddp_timeout, not NCCL's 10 minutes."""
    import datetime

    import torch.distributed as dist

    from sdxl.device import init_distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.update(t=timeout))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert init_distributed("cpu", 300).world == 2
    assert seen["t"] == datetime.timedelta(minutes=300)
