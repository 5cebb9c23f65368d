"""Exponential moving average of the trainable weights (off by default: for full fine-tuning it
costs another fp32 copy of the UNet; for LoRA it is small)."""

from __future__ import annotations

import torch


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weight, in fp32, after every optimizer step."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float = 0.9999):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the averages (call twice to swap back)."""
        for s, p in zip(self.shadow, self.params):
            live = p.detach().float().clone()
            p.copy_(s)
            s.copy_(live)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
