"""Exponential moving average of the trainable weights (off by default: for full fine-tuning it
costs another fp32 copy of the UNet; for LoRA it is small)."""

from __future__ import annotations

import torch


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weight, in fp32, after every optimizer step. Keyed
    by parameter name, so the averages can be exported like the weights themselves."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float = 0.9999):
        self.params = dict(named_params)
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the averages (call twice to swap back)."""
        for n, p in self.params.items():
            live = p.detach().float().clone()
            p.copy_(self.shadow[n])
            self.shadow[n].copy_(live)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for n, saved in state["shadow"].items():
            self.shadow[n].copy_(saved)
