"""Every GPU figure README marks pending, in one command, with the memory preflight's prediction
beside each, and the checks only a GPU can make.

    uv run python bench/gpu_report.py                    # on one H100 / H200: about 6 minutes
    uv run python bench/gpu_report.py --update-readme    # and put its tables into README.md
    uv run python bench/gpu_report.py                    # on a CPU: the tiny model, about a minute

Without weights on the machine (--model, default ./weights/sdxl-base-1.0) it builds a full-size SDXL
with random weights on the GPU: no download, and speed and memory do not depend on the values. Each
part runs in its own process under its own time limit (a part that fails or runs out of time is
reported so, and the others go on), each row in a clean memory window. The predictions are computed
at the same time, on the CPU, in processes of their own. Writes report.json and report.md into
--output (default outputs/gpu_report).

- train: the training run's phases as train_sdxl.py runs them (training/preflight.py: run_phases,
  LoRA rank 4 on attention, bf16, checkpointing, batch 1) at 512 and 1024 px: uncached, cached, and
  cached with --fp8_base, each with CUDA graphs and eagerly: images/s, the first step's seconds
  (warm-up and capture), max_memory_reserved.
- generate: generate_images.py's phases (sampling/preflight.py: generation_phases) at 1024 px, Euler
  30 steps, guidance 5, batch 1 and 4, with and without CUDA graphs, and diffusers'
  StableDiffusionXLPipeline with the same random weights: s/image and max_memory_reserved.
- checks: tests/test_speed.py's CUDA tests (graph equals eager over 10 steps, graphed sampling
  equals eager), an eager step with no hidden sync (set_sync_debug_mode("error")), gradient
  checkpointing with dropout under capture, and fp8 weights through DDP over NCCL.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GiB = 2**30
PART_LIMITS = {"train": 270, "generate": 120, "checks": 90}  # seconds on a GPU: 8 minutes
MARK = ("<!-- gpu_report -->", "<!-- /gpu_report -->")


def plan(cuda: bool) -> dict[str, list[dict]]:
    """The rows of each part: full size on a GPU, the tiny model at small sizes on a CPU."""
    sizes = (512, 1024) if cuda else (32,)
    # (on a CPU, where nothing is measured, one row of each kind: that the code paths run)
    data = ((False, False), (True, False), (True, True)) if cuda else ((True, True),)
    train = [
        {"size": s, "cached": c, "fp8": f, "graphs": g, "interval": 1}
        for s in sizes
        for c, f in data
        for g in ((True, False) if cuda else (False,))
    ]
    # --gradient_checkpointing_interval: its speed and memory, last (the first rows to go when the
    # part runs out of time)
    train += [
        {"size": sizes[-1], "cached": False, "fp8": False, "graphs": cuda, "interval": n}
        for n in ((2, 4) if cuda else (2,))
    ]
    size = 1024 if cuda else 64
    generate = [
        {"side": side, "batch": b, "size": size}
        for b in ((1, 4) if cuda else (4,))
        for side in (("graphs", "eager", "diffusers") if cuda else ("eager",))
    ]
    if not cuda:  # the reference's code path too, once
        generate.append({"side": "diffusers", "batch": 1, "size": size})
    return {"train": train, "generate": generate, "checks": [{}]}


# ---------------------------------------------------------------------------------------------
# Measuring, in the child processes
# ---------------------------------------------------------------------------------------------


class Measured:
    """The phases' seconds and the device memory reserved by the end of each (run_phases and
    generation_phases call `phase` and `row`, as they do a MemoryTrace's)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.cuda = torch.cuda.is_available()

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.row(name, time.perf_counter() - start)

    def row(self, name: str | None, seconds: float = 0.0) -> None:
        reserved = torch.cuda.max_memory_reserved() / GiB if self.cuda else None
        self.rows.append({"phase": name, "s": seconds, "max_reserved_GiB": reserved})

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, prefix: str) -> float:
        return sum(r["s"] for r in self.rows if (r["phase"] or "").startswith(prefix))


def clean_window() -> None:
    """Start a row with nothing of the last one left and the peak counters reset."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def host_parts(model: Path, cuda: bool, unet_dtype: torch.dtype, text_dtype: torch.dtype):
    """The model's parts on the host: loaded from its folder, or built randomly (on the GPU, which
    is quick, then moved to the host, as a loaded model starts)."""
    from sdxl.pretrained import config_parts, load_sdxl

    if (model / "unet").is_dir() and any((model / "unet").glob("*.safetensors")):
        return load_sdxl(model, unet_dtype, "cpu", text_dtype, vae_tile_size=512)
    parts = config_parts(
        model, unet_dtype, text_dtype, vae_tile_size=512, device="cuda" if cuda else "cpu"
    )
    for part in (parts.unet, parts.text_encoder, parts.vae):
        part.to("cpu")
    clean_window()
    return parts


def train_part(model: Path, rows: list[dict], steps: int) -> None:
    """Each training row on a copy of the host parts: run_phases with `steps` steps."""
    from sdxl.device import Distributed, resolve_precision
    from training.preflight import Validation, run_phases
    from training.specs import (
        AdapterSpec,
        DataSpec,
        LossSpec,
        ModelSpec,
        OptimizerSpec,
        StepSpec,
        TrainSpecs,
    )
    from training.train_loop import text_encoder_dtype

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = resolve_precision("auto", device)
    adapter = AdapterSpec(rank=4, alpha=4)
    base = host_parts(model, cuda, precision.unet_dtype, text_encoder_dtype(adapter, precision))
    for row in rows:
        clean_window()
        data = DataSpec(
            Path("."),
            size=(row["size"], row["size"]),
            cache_latents=row["cached"],
            cache_text_embeddings=row["cached"],
        )
        step = StepSpec(
            fp8_base=row["fp8"],
            cuda_graph="auto" if row["graphs"] else "off",
            checkpoint_interval=row["interval"],
        )
        specs = TrainSpecs(data, ModelSpec(str(model)), adapter, LossSpec(), OptimizerSpec(), step)
        measured = Measured()
        parts = copy.deepcopy(base)
        size = (row["size"], row["size"])
        dist = Distributed(0, 1, device)
        run_phases(specs, parts, precision, dist, size, Validation(), measured, steps)
        del parts
        result = {
            **row,
            "images_per_s": (steps - 1) / max(measured.seconds("steps 2") or 1e-9, 1e-9),
            "first_step_s": measured.seconds("step 1"),
            "max_reserved_GiB": measured.rows[-1]["max_reserved_GiB"],
            "phases": measured.rows,
        }
        print("RESULT " + json.dumps(result), flush=True)


def generate_part(model: Path, rows: list[dict], steps: int) -> None:
    """Each generation row: ours (generation_phases, with or without graphs) or diffusers'."""
    from sampling.preflight import generation_phases
    from sdxl.device import resolve_precision

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = resolve_precision("auto", device)
    parts = host_parts(model, cuda, precision.unet_dtype, precision.text_dtype)
    for row in rows:
        clean_window()
        measured = Measured()
        size, batch = (row["size"], row["size"]), row["batch"]
        if row["side"] == "diffusers":
            diffusers_batches(parts, model, size, batch, steps, precision, measured)
        else:

            def load(where, parts=parts):
                for part in (parts.unet, parts.text_encoder, parts.vae):
                    part.to(where)
                return parts

            generation_phases(
                load,
                lambda unet: [],
                device=device,
                dtype=precision.compute_dtype,
                fp8_base=False,
                cuda_graph=row["side"] == "graphs",
                size=size,
                batch=batch,
                guidance_scale=5.0,
                phases=measured,
                steps=steps,
            )
        for part in (parts.unet, parts.text_encoder, parts.vae):
            part.to("cpu")
        seconds = measured.seconds("batch 2")
        result = {
            **row,
            "s_per_image": seconds / batch,
            "first_batch_s": measured.seconds("batch 1"),
            "max_reserved_GiB": measured.rows[-1]["max_reserved_GiB"],
        }
        print("RESULT " + json.dumps(result), flush=True)


def diffusers_batches(parts, model, size, batch, steps, precision, measured) -> None:
    """diffusers' pipeline with the same text encoders and VAE and a diffusers UNet of the same
    config (random): two batches, the second timed."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from sdxl.pretrained import config_folder

    configs = config_folder(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = DiffusersUNet.from_config(DiffusersUNet.load_config(configs / "unet"))
    # diffusers' own VAE forwards (ours walks them leaner: sdxl/vae.py), tiled and sliced as ours
    ours = parts.vae.vae
    vae = AutoencoderKL.from_config(ours.config)
    vae.load_state_dict(ours.state_dict())
    vae.use_slicing, vae.use_tiling = ours.use_slicing, ours.use_tiling
    vae.tile_sample_min_size = ours.tile_sample_min_size
    vae.tile_latent_min_size = ours.tile_latent_min_size
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=parts.text_encoder.text_encoder,
        text_encoder_2=parts.text_encoder.text_encoder_2,
        tokenizer=parts.text_encoder.tokenizer,
        tokenizer_2=parts.text_encoder.tokenizer_2,
        unet=unet.to(precision.unet_dtype),
        scheduler=EulerDiscreteScheduler.from_pretrained(configs / "scheduler"),
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    measured.row("the pipeline on the device")
    for k in range(2):
        with measured.phase(f"batch {k + 1}"):
            generators = [torch.Generator(device).manual_seed(s) for s in range(batch)]
            pipe(
                ["a photograph"] * batch,
                height=size[1],
                width=size[0],
                num_inference_steps=steps,
                guidance_scale=5.0,
                generator=generators,
                output_type="pt",
            )
    del pipe, unet, vae


CHECKS = (
    "graph equals eager (tests/test_speed.py)",
    "no hidden sync in the step",
    "checkpointing with dropout under capture",
    "fp8 weights through DDP over NCCL",
)


def checks_part() -> None:
    """The checks only a GPU can make; one RESULT line each."""
    for name, check in zip(CHECKS, (check_tests, check_no_sync, check_dropout, check_fp8_ddp)):
        try:
            result = check()
        except Exception as e:  # a check's failure is its result
            result = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print("RESULT " + json.dumps({"check": name, "result": result}), flush=True)


def check_tests() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "tests/test_speed.py", "-k", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    last = (done.stdout.strip().splitlines() or ["?"])[-1]
    return ("passed: " if done.returncode == 0 else "FAILED: ") + last


def check_no_sync() -> str:
    """An eager micro-step and update of the tiny model under set_sync_debug_mode("error")."""
    tr, inputs = tiny_trainer()
    tr.micro_step(*inputs)  # the first step makes what is made lazily
    tr.optimizer_update()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tr.micro_step(*inputs)
        tr.optimizer_update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "passed"


def tiny_trainer():
    """The tiny model's trainer on CUDA (eager steps, LoRA, bf16) and one micro-step's inputs."""
    from sdxl.device import Distributed, resolve_precision
    from sdxl.pretrained import load_sdxl, tiny_sdxl
    from training.preflight import synthetic_batch
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

    device = torch.device("cuda")
    precision = resolve_precision("bf16", device)
    parts = load_sdxl(tiny_sdxl(), precision.unet_dtype, device)
    data = DataSpec(Path("."), size=(64, 64))
    specs = TrainSpecs(data, ModelSpec("tiny"), AdapterSpec(), LossSpec(), OptimizerSpec(),
                       StepSpec(cuda_graph="off"))  # fmt: skip
    dist = Distributed(0, 1, device)
    encoders = (parts.vae.moments, parts.text_encoder.encode)
    tr = build_trainer(specs, parts, *encoders, precision, dist, 10)
    inputs = prepare(tr, synthetic_batch(data, 64, 64, "a photograph"))
    return tr, (*inputs, torch.tensor([1.0, 1.0], device=device))


def check_dropout() -> str:
    """Dropout under non-reentrant checkpointing, captured and replayed: the backward's recompute
    uses the forward's mask (x = ones, so x.grad is 2 where the output kept a value, else 0)."""
    from torch.utils.checkpoint import checkpoint

    drop = torch.nn.Dropout(0.5)
    x = torch.ones(4096, device="cuda", requires_grad=True)

    def step() -> torch.Tensor:
        x.grad = None
        y = checkpoint(drop, x, use_reentrant=False)
        y.sum().backward()
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = torch.zeros_like(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = checkpoint(drop, x, use_reentrant=False)
        y.sum().backward()
    masks = []
    for _ in range(3):
        x.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        if not torch.equal(x.grad, (y != 0).float() * 2):
            return "FAILED: the recompute's mask differs from the forward's"
        masks.append((y != 0).clone())
    fresh = not torch.equal(masks[0], masks[1])
    return "passed" if fresh else "FAILED: the mask did not change between replays"


def check_fp8_ddp() -> str:
    """A LoRA UNet on an fp8 base wrapped by DDP over NCCL (one process): the construction that
    fails when DDP broadcasts fp8 weights, then a forward and backward."""
    import torch.distributed as dist

    from sdxl.device import Distributed
    from sdxl.frozen import store_in_fp8
    from sdxl.lora import apply_lora_to_unet
    from sdxl.pretrained import tiny_sdxl
    from sdxl.unet import load_unet

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        unet = load_unet(tiny_sdxl() / "unet", torch.bfloat16, "cuda")
        apply_lora_to_unet(unet, 4, 4)
        store_in_fp8(unet)
        model = Distributed(0, 2, torch.device("cuda")).wrap(unet)  # (2: to wrap at all)
        x = torch.randn(1, 4, 8, 8, device="cuda", dtype=torch.bfloat16)
        ctx = torch.randn(1, 77, 96, device="cuda", dtype=torch.bfloat16)
        cond = {"text_embeds": torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)}
        cond["time_ids"] = torch.ones(1, 6, device="cuda", dtype=torch.bfloat16)
        model(x, torch.tensor([10], device="cuda"), ctx, cond).float().square().mean().backward()
        grads = [p.grad for p in unet.parameters() if p.requires_grad]
        return "passed" if grads and all(g is not None for g in grads) else "FAILED: no gradients"
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The predictions (on the CPU, beside the GPU work)
# ---------------------------------------------------------------------------------------------


def predict(part: str, row: dict, model: Path) -> float:
    """The memory preflight's max_memory_reserved (GiB) for one row."""
    from sdxl.memory import GiB as BYTES_PER_GIB

    if part == "train":
        from training.preflight import estimate_training
        from training.specs import (
            AdapterSpec,
            DataSpec,
            LossSpec,
            ModelSpec,
            OptimizerSpec,
            StepSpec,
            TrainSpecs,
        )

        size = (row["size"], row["size"])
        data = DataSpec(
            Path("."), size=size, cache_latents=row["cached"], cache_text_embeddings=row["cached"]
        )
        step = StepSpec(
            precision="bf16",
            fp8_base=row["fp8"],
            cuda_graph="auto" if row["graphs"] else "off",
            checkpoint_interval=row["interval"],
        )
        adapter = AdapterSpec(rank=4, alpha=4)
        specs = TrainSpecs(data, ModelSpec(str(model)), adapter, LossSpec(), OptimizerSpec(), step)
        return estimate_training(specs, model).peak / BYTES_PER_GIB
    from sampling.preflight import estimate_generation

    trace = estimate_generation(
        model,
        size=(row["size"], row["size"]),
        batch=row["batch"],
        precision="bf16",
        cuda_graph=row["side"] == "graphs",
    )
    return trace.peak / BYTES_PER_GIB


# ---------------------------------------------------------------------------------------------
# The parent: parts in processes, the report
# ---------------------------------------------------------------------------------------------


def child_argv(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def run_part(part: str, rows: list[dict], model: Path, limit: int, steps: int) -> list[dict]:
    """One part in its own process; its RESULT lines, and a line for what did not come."""
    argv = child_argv("--part", part, "--model", str(model), "--rows", json.dumps(rows))
    argv += ["--steps", str(steps)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, cwd=ROOT)
        out, err, failed = done.stdout, done.stderr, done.returncode != 0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        err, failed = f"ran past its {limit} s", True
    results = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if failed:
        tail = (err or "").strip().splitlines()[-1:] or ["?"]
        results.append({"part": part, "error": tail[0][:400]})
    return results


def predict_rows(part: str, rows: list[dict], model: Path) -> list[float | None]:
    """The preflight's predictions for a part's rows, computed in one process of their own."""
    argv = child_argv("--predict", part, "--model", str(model), "--rows", json.dumps(rows))
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return [None] * len(rows)
    found = dict(
        line.split()[1:] for line in done.stdout.splitlines() if line.startswith("PREDICTED ")
    )
    return [float(found[str(k)]) if str(k) in found else None for k in range(len(rows))]


def markdown(report: dict) -> str:
    """The report's tables, as README.md shows them."""
    lines = [
        f"Measured by `uv run python bench/gpu_report.py` on {report['device']} "
        f"({report['date']}, torch {report['torch']}); model: {report['model']}.",
        "",
        "| training run (LoRA r4 attention, bf16, checkpointing, batch 1) | images/s | first step s "
        "| max_memory_reserved measured | predicted |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["train"]:
        if "error" in r:
            lines.append(f"| (failed: {r['error']}) | | | | |")
            continue
        data = "cached + fp8" if r["fp8"] else "cached" if r["cached"] else "uncached"
        mode = "graphs" if r["graphs"] else "eager"
        mode += f", checkpointing interval {r['interval']}" if r.get("interval", 1) > 1 else ""
        measured = r["max_reserved_GiB"]
        lines.append(
            f"| {r['size']} px, {data}, {mode} | {r['images_per_s']:.2f} | {r['first_step_s']:.1f} "
            f"| {_gib(measured)} | {_gib(r.get('predicted_GiB'))} |"
        )
    lines += [
        "",
        "| generation (Euler, guidance 5) | s/image | first batch s "
        "| max_memory_reserved measured | predicted |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["generate"]:
        if "error" in r:
            lines.append(f"| (failed: {r['error']}) | | | | |")
            continue
        lines.append(
            f"| {r['size']} px, batch {r['batch']}, {r['side']} | {r['s_per_image']:.2f} "
            f"| {r['first_batch_s']:.1f} | {_gib(r['max_reserved_GiB'])} "
            f"| {_gib(r.get('predicted_GiB'))} |"
        )
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {r.get('check', r.get('part'))} | {r.get('result', r.get('error'))} |" for r in report["checks"]]  # fmt: skip
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} GiB"


def update_readme(md: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(MARK[0]) + len(MARK[0]), text.index(MARK[1])
    readme.write_text(text[:start] + "\n" + md + "\n" + text[end:])


def main(args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available()
    model = Path(args.model)
    if not (model / "unet").is_dir():
        from sdxl.pretrained import SDXL_CONFIGS, tiny_sdxl

        model = SDXL_CONFIGS if cuda else tiny_sdxl()  # full size with random weights, or tiny
    rows = plan(cuda)
    steps = args.steps or (30 if cuda else 3)
    scale = 1 if cuda else 0.5  # the tiny model's parts are quick
    report: dict = {"device": torch.cuda.get_device_name() if cuda else "CPU"}
    report |= {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    random = not (model / "unet" / "diffusion_pytorch_model.safetensors").exists()
    report["model"] = ("random full-size SDXL" if cuda else "tiny SDXL") if random else str(model)
    with ThreadPoolExecutor(max_workers=2) as pool:  # the predictions, beside the measuring
        predictions = {part: pool.submit(predict_rows, part, rows[part], model) for part in ("train", "generate")}  # fmt: skip
        for part in ("train", "generate", "checks"):
            limit = int(PART_LIMITS[part] * scale) + (0 if cuda else 60)
            part_steps = (6 if cuda else 3) if part == "train" else steps
            if part == "checks" and not cuda:  # (no process needed to say so)
                report[part] = [{"check": name, "result": "skipped: no GPU"} for name in CHECKS]
            else:
                report[part] = run_part(part, rows[part], model, limit, part_steps)
            print(f"{part}: {len(report[part])} rows", flush=True)
        for part, future in predictions.items():
            for row, predicted in zip(rows[part], future.result()):
                for r in report[part]:
                    if all(r.get(k) == v for k, v in row.items()):
                        r["predicted_GiB"] = predicted
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "report.md").write_text(md + "\n")
    print(md)
    if args.update_readme:
        update_readme(md)


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="./weights/sdxl-base-1.0", help="an SDXL folder, if any")
    p.add_argument("--output", default=str(ROOT / "outputs" / "gpu_report"), help="report folder")
    p.add_argument("--steps", type=int, default=0, help="sampling steps (default 30; 3 on a CPU)")
    p.add_argument("--update-readme", action="store_true", help="put the tables into README.md")
    p.add_argument("--part", choices=["train", "generate", "checks"], help=argparse.SUPPRESS)
    p.add_argument("--predict", choices=["train", "generate"], help=argparse.SUPPRESS)
    p.add_argument("--rows", default="[]", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.predict:
        for k, row in enumerate(json.loads(a.rows)):
            with contextlib.redirect_stdout(sys.stderr):
                value = predict(a.predict, row, Path(a.model))
            print(f"PREDICTED {k} {value:.4f}", flush=True)
    elif a.part:
        part = {"train": train_part, "generate": generate_part}.get(a.part)
        if part is None:
            checks_part()
        else:
            part(Path(a.model), json.loads(a.rows), a.steps)
    else:
        main(a)
