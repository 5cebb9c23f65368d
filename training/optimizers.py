"""The optimizers `--optimizer` chooses, each with the learning-rate schedule it runs under.

One function per optimizer, one entry in OPTIMIZERS. `--optimizer_args key=value ...` (read by
cli/train.py) are passed on as keyword arguments. The packages beyond torch and transformers are optional: `uv sync --extra optimizers`.

- adamw: torch's AdamW (the default), with --adam_epsilon and --adam_weight_decay (an
  --optimizer_args weight_decay= or eps= wins over them, as in kohya).
- adamw8bit: bitsandbytes' 8-bit AdamW (Dettmers et al. 2022): optimizer state in 8 bits, a
  quarter of the memory; CUDA only.
- adafactor: transformers' Adafactor (Shazeer and Stern 2018) in its relative-step form: it sets
  its own step size (pass relative_step=False to use --learning_rate and the LR schedule).
- prodigy: Prodigy (Mishchenko and Defazio 2023), which estimates the step size itself: use
  --learning_rate 1 (its recommended setting, with --optimizer_args d_coef=1 decouple=True
  use_bias_correction=True safeguard_warmup=True; safeguard_warmup with --lr_warmup_steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cli.choices import LR_SCHEDULERS, OPTIMIZER_NAMES
from sdxl.errors import UserError
from training.fused import PerParameter
from training.specs import OptimizerSpec

Schedule = torch.optim.lr_scheduler.LRScheduler
Groups = list[dict]  # parameter groups: {"params": [...], "lr": ...}


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step s: linear warm-up, then constant,
    linear decay to 0, or cosine decay to 0."""
    if kind not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr scheduler {kind!r}")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return f


def _lambda_schedule(optimizer: torch.optim.Optimizer, spec: OptimizerSpec, steps: int) -> Schedule:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(spec.lr_scheduler, spec.warmup_steps, steps)
    )


def adamw(
    groups: Groups, spec: OptimizerSpec, steps: int
) -> tuple[torch.optim.Optimizer, Schedule]:
    kwargs = {"weight_decay": spec.weight_decay, "eps": spec.eps, **spec.extra}
    optimizer = torch.optim.AdamW(groups, lr=spec.learning_rate, **kwargs)
    return optimizer, _lambda_schedule(optimizer, spec, steps)


def adamw8bit(
    groups: Groups, spec: OptimizerSpec, steps: int
) -> tuple[torch.optim.Optimizer, Schedule]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(
            "--optimizer adamw8bit needs bitsandbytes: uv sync --extra optimizers"
        ) from None
    if not all(p.is_cuda for group in groups for p in group["params"]):
        raise UserError(
            "--optimizer adamw8bit (bitsandbytes) runs on CUDA GPUs only; use adamw here"
        )
    kwargs = {"weight_decay": spec.weight_decay, "eps": spec.eps, **spec.extra}
    optimizer = bnb.optim.AdamW8bit(groups, lr=spec.learning_rate, **kwargs)
    return optimizer, _lambda_schedule(optimizer, spec, steps)


def adafactor(
    groups: Groups, spec: OptimizerSpec, steps: int
) -> tuple[torch.optim.Optimizer, Schedule]:
    from transformers.optimization import Adafactor, AdafactorSchedule

    kwargs = {"weight_decay": spec.weight_decay, "scale_parameter": True, "warmup_init": False}
    kwargs |= spec.extra
    relative = kwargs.pop("relative_step", True)
    optimizer = Adafactor(
        groups, lr=None if relative else spec.learning_rate, relative_step=relative, **kwargs
    )
    if relative:  # its own step size: the schedule only reports it
        return optimizer, AdafactorSchedule(optimizer)
    return optimizer, _lambda_schedule(optimizer, spec, steps)


def prodigy(
    groups: Groups, spec: OptimizerSpec, steps: int
) -> tuple[torch.optim.Optimizer, Schedule]:
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError(
            "--optimizer prodigy needs prodigyopt: uv sync --extra optimizers"
        ) from None
    kwargs = {"weight_decay": spec.weight_decay, **spec.extra}
    optimizer = Prodigy(groups, lr=spec.learning_rate, **kwargs)
    return optimizer, _lambda_schedule(optimizer, spec, steps)


OPTIMIZERS: dict[
    str, Callable[[Groups, OptimizerSpec, int], tuple[torch.optim.Optimizer, Schedule]]
] = {
    "adamw": adamw,
    "adamw8bit": adamw8bit,
    "adafactor": adafactor,
    "prodigy": prodigy,
}
assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES


def build_optimizer(
    trained: list[tuple[str, torch.nn.Parameter]],
    components: list[str],
    spec: OptimizerSpec,
    max_steps: int,
    per_parameter: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.optim.Optimizer, Schedule]:
    """The optimizer the spec names over the trained parameters (name, parameter), one group per
    model component ("unet", then the text encoders at their own learning rates), and its
    learning-rate schedule. `per_parameter`: one such optimizer per parameter (training/fused.py:
    bf16 weights rounded stochastically, from a generator seeded with `seed` on `device`; steps
    in the backward pass with spec.fused_backward_pass)."""
    text_lrs = spec.text_encoder_lr or (spec.learning_rate,)
    lrs = dict(
        zip(
            ("unet", "text_encoder", "text_encoder_2"),
            (spec.learning_rate, text_lrs[0], text_lrs[-1]),
        )
    )
    groups = [
        {"params": [p for n, p in trained if n.startswith(f"{c}.")], "lr": lrs[c]}
        for c in components
    ]
    groups = [g for g in groups if g["params"]]
    try:
        if not per_parameter:
            return OPTIMIZERS[spec.name](groups, spec, max_steps)
        # (the memory preflight's meta device has no generator, and needs no random bits)
        meta = torch.device(device).type == "meta"
        generator = None if meta else torch.Generator(device).manual_seed(seed)
        make = lambda one: OPTIMIZERS[spec.name](one, spec, max_steps)[0]  # noqa: E731
        optimizer = PerParameter(groups, make, spec.fused_backward_pass, generator)
    except TypeError as e:  # an --optimizer_args key the optimizer does not take
        raise UserError(f"--optimizer {spec.name}: {e} (check --optimizer_args)") from None
    if spec.name == "adafactor" and spec.extra.get("relative_step", True):
        from transformers.optimization import AdafactorSchedule

        return optimizer, AdafactorSchedule(optimizer)  # (it reports Adafactor's own step size)
    return optimizer, _lambda_schedule(optimizer, spec, max_steps)


def check_optimizer(spec: OptimizerSpec) -> None:
    """Build the optimizer over one small parameter: a bad --optimizer_args key fails here, in
    a second, instead of after the model has loaded."""
    probe = [("unet.probe", torch.nn.Parameter(torch.zeros(1)))]
    build_optimizer(probe, ["unet"], spec, 1)


def tensor_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make torch's AdamW steppable inside a CUDA graph: its learning rates device tensors, which
    the LR schedule fills in place (a float would be frozen into the graph at capture), and on CUDA
    capturable=True, which keeps the step counts and bias corrections on the device. Eager steps
    use the same form, so that they compute what the graphs compute: AdamW orders a tensor
    learning rate's update differently (2e-7 relative per step), which training amplified to 6e-5
    of the tiny model's LoRA weights within four steps. Applied again after a checkpoint's optimizer
    state is loaded."""
    for group in optimizer.param_groups:
        if "capturable" not in group:  # not torch's Adam family: left as it is
            continue
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        group["capturable"] = device.type in ("cuda", "meta")  # meta: the preflight's GPU
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:  # on the device if capturable, else on the CPU
                home = p.device if group["capturable"] else torch.device("cpu")
                state["step"] = state["step"].to(home, torch.float32)
