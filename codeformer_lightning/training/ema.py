"""Exponential moving average of a network's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds ``module``, an EMA copy of a network: ``ema = decay * ema + (1 - decay) * live``.

    A submodule of the LightningModule, so its weights and ``num_updates`` are saved in and restored
    from checkpoints with everything else (resume continues the same average). Buffers (e.g.
    BatchNorm statistics) are copied, not averaged. Under DDP every rank holds identical live
    weights after each step, so every rank's EMA stays identical without communication.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> EMA:
        # The average is never trained and always evaluated in eval mode.
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (same architecture)."""
        live = dict(model.named_parameters())
        for name, p in self.module.named_parameters():
            p.lerp_(live[name].detach().to(p.dtype), 1.0 - self.decay)
        live_buffers = dict(model.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(live_buffers[name])
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Reset the average to ``model``'s weights (e.g. after loading a pretrained network)."""
        self.module.load_state_dict(model.state_dict())

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
