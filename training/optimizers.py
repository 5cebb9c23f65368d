"""The optimizers `--optimizer` chooses, each with the learning-rate schedule it runs under.

One function per optimizer, one entry in OPTIMIZERS. `--optimizer_args key=value ...` are passed on
as keyword arguments (values read as Python literals: 0.9, True, (0.9, 0.99); anything else a
string). The packages beyond torch and transformers are optional: `uv sync --extra optimizers`.

- adamw: torch's AdamW (the default), with --adam_epsilon and --adam_weight_decay.
- adamw8bit: bitsandbytes' 8-bit AdamW (Dettmers et al. 2022): optimizer state in 8 bits, a
  quarter of the memory; CUDA only.
- adafactor: transformers' Adafactor (Shazeer and Stern 2018) in its relative-step form: it sets
  its own step size (pass relative_step=False to use --learning_rate and the LR schedule).
- prodigy: Prodigy (Mishchenko and Defazio 2023), which estimates the step size itself: use
  --learning_rate 1 (its recommended setting, with --optimizer_args d_coef=1 decouple=True
  use_bias_correction=True safeguard_warmup=True; safeguard_warmup with --lr_warmup_steps).
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Callable

import torch

from sdxl.errors import UserError
from training.train_util import lr_lambda

Schedule = torch.optim.lr_scheduler.LRScheduler


def optimizer_kwargs(pairs: list[str]) -> dict[str, object]:
    """`--optimizer_args key=value ...` as keyword arguments."""
    kwargs: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--optimizer_args {pair!r} is not key=value (e.g. betas=(0.9,0.99))")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def _lambda_schedule(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, max_steps: int
) -> Schedule:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.lr_scheduler, args.lr_warmup_steps, max_steps)
    )


def adamw(params, args, kwargs, max_steps):
    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **kwargs,
    )
    return optimizer, _lambda_schedule(optimizer, args, max_steps)


def adamw8bit(params, args, kwargs, max_steps):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(
            "--optimizer adamw8bit needs bitsandbytes: uv sync --extra optimizers"
        ) from None
    if not all(p.is_cuda for group in params for p in group["params"]):
        raise UserError(
            "--optimizer adamw8bit (bitsandbytes) runs on CUDA GPUs only; use adamw here"
        )
    optimizer = bnb.optim.AdamW8bit(
        params,
        lr=args.learning_rate,
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **kwargs,
    )
    return optimizer, _lambda_schedule(optimizer, args, max_steps)


def adafactor(params, args, kwargs, max_steps):
    from transformers.optimization import Adafactor, AdafactorSchedule

    relative = kwargs.pop("relative_step", True)
    kwargs = {"scale_parameter": True, "warmup_init": False, **kwargs}
    optimizer = Adafactor(
        params,
        lr=None if relative else args.learning_rate,
        relative_step=relative,
        weight_decay=args.adam_weight_decay,
        **kwargs,
    )
    if relative:  # its own step size: the schedule only reports it
        return optimizer, AdafactorSchedule(optimizer)
    return optimizer, _lambda_schedule(optimizer, args, max_steps)


def prodigy(params, args, kwargs, max_steps):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError(
            "--optimizer prodigy needs prodigyopt: uv sync --extra optimizers"
        ) from None
    optimizer = Prodigy(
        params, lr=args.learning_rate, weight_decay=args.adam_weight_decay, **kwargs
    )
    return optimizer, _lambda_schedule(optimizer, args, max_steps)


OPTIMIZERS: dict[str, Callable] = {
    "adamw": adamw,
    "adamw8bit": adamw8bit,
    "adafactor": adafactor,
    "prodigy": prodigy,
}


def build_optimizer(
    params: list[dict], args: argparse.Namespace, max_steps: int
) -> tuple[torch.optim.Optimizer, Schedule]:
    """The optimizer `args.optimizer` names over the parameter groups `params` (each a dict with
    "params" and its "lr"), and its learning-rate schedule."""
    kwargs = optimizer_kwargs(args.optimizer_args)
    try:
        return OPTIMIZERS[args.optimizer](params, args, kwargs, max_steps)
    except TypeError as e:  # an --optimizer_args key the optimizer does not take
        raise UserError(f"--optimizer {args.optimizer}: {e}") from None


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
        group["capturable"] = device.type == "cuda"
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:  # on the device if capturable, else on the CPU
                home = p.device if group["capturable"] else torch.device("cpu")
                state["step"] = state["step"].to(home, torch.float32)
