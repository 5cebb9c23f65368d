"""Full fine-tuning in little memory: bf16 weights updated with stochastic rounding
(--full_bf16), and each parameter's optimizer step inside the backward pass
(--fused_backward_pass).

A bf16 weight has 8 bits of mantissa: an update smaller than half the weight's last bit is lost
when rounded to the nearest bf16 value, and with learning rates of 1e-6 to 1e-5 most updates are.
Stochastic rounding keeps them on average: the fp32 result x lies between two bf16 values lo < hi
and becomes hi with probability (x - lo) / (hi - lo), so E[round(x)] = x. On the bits: add 16
random bits to the low half of x's fp32 pattern and drop that half.

`PerParameter` steps each parameter with an optimizer of its own, built by the same function
--optimizer chooses (AdamW, adamw8bit, Adafactor, ...), so that a step can run as soon as one
gradient is complete (the pattern of PyTorch's "optimizer step in backward" tutorial): a hook
(`register_post_accumulate_grad_hook`) steps the parameter and frees its gradient, and no full set
of gradients ever exists. A bf16 parameter is stepped in fp32 (its data swapped for an fp32 copy for
the step; the optimizer's state is then fp32, or 8-bit for adamw8bit) and written back with
stochastic rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the distance to the lower neighbour
    (unbiased). Exact for values that bf16 holds."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, x.shape, device=x.device, dtype=torch.int32, generator=generator
    )
    # (int32 addition: the carry moves the value up one bf16 step when noise + low bits >= 2^16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class PerParameter(torch.optim.Optimizer):
    """Each parameter stepped by an optimizer of its own (built by `make` from a one-parameter
    group), so that a step can run inside the backward pass: with `fused`, a hook steps a parameter
    as soon as its gradient is complete and frees the gradient. A bf16 parameter is stepped in fp32
    and written back with stochastic rounding (`generator`: its random bits). To the learning-rate
    schedule, the checkpoints and the loop it is one optimizer: its param_groups are the inner
    optimizers' own (a schedule that sets a group's lr sets the inner one's)."""

    def __init__(
        self,
        groups: list[dict],
        make: Callable[[list[dict]], torch.optim.Optimizer],
        fused: bool = False,
        generator: torch.Generator | None = None,
    ):
        params = [p for group in groups for p in group["params"]]
        super().__init__(params, {})
        self.inner = {
            p: make([{**group, "params": [p]}]) for group in groups for p in group["params"]
        }
        self.param_groups = [opt.param_groups[0] for opt in self.inner.values()]
        self.generator = generator
        # Adafactor's schedule reports the step size Adafactor computes (AdafactorSchedule asks
        # the optimizer for it)
        first = next(iter(self.inner.values()))
        if hasattr(first, "_get_lr"):
            self._get_lr = first._get_lr
        self.hooks = (
            [p.register_post_accumulate_grad_hook(self.step_param) for p in params] if fused else []
        )

    @property  # type: ignore[override]
    def state(self) -> dict:
        return {p: opt.state[p] for p, opt in self.inner.items() if p in opt.state}

    @state.setter
    def state(self, value: dict) -> None:  # (Optimizer.__init__ sets it; the inner ones hold it)
        pass

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """One parameter's step (in fp32 for a bf16 parameter, rounded back stochastically); its
        gradient is freed."""
        if p.grad is None:
            return
        if p.dtype == torch.bfloat16:
            low, grad, p.grad = p.data, p.grad, None
            p.data = low.float()
            p.grad = grad.float()
            self.inner[p].step()
            # back into the bf16 tensor itself: its layout (channels_last) stays what it was
            p.data = low.copy_(stochastic_round(p.data, self.generator))
        else:
            self.inner[p].step()
        p.grad = None

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """The step of every parameter that has a gradient (none is left after fused steps)."""
        for p in self.inner:
            self.step_param(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.inner:
            p.grad = None

    def state_dict(self) -> dict:
        """Every inner optimizer's state, and the rounding's random state (a resumed run rounds
        as the run straight through would)."""
        rounding = self.generator.get_state() if self.generator is not None else None
        return {"per_parameter": [opt.state_dict() for opt in self.inner.values()],
                "rounding": rounding}  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        for (p, opt), state in zip(self.inner.items(), state_dict["per_parameter"], strict=True):
            low = p.data
            if p.dtype == torch.bfloat16:  # its state is fp32, as in the steps, not cast to bf16
                p.data = low.float()
            opt.load_state_dict(state)
            p.data = low
        if self.generator is not None and state_dict["rounding"] is not None:
            self.generator.set_state(state_dict["rounding"])
