"""Exponential moving average of the network's weights, with a half-life counted in images.

A half-life in images (as in EDM) keeps the averaging horizon the same when the batch size or
the number of processes changes; the ramp-up limits it early in training, when an average
over a long horizon would mostly remember the random initialisation.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(images_per_step: int, images_seen: int, half_life: float, rampup: float) -> float:
    """Per-step decay beta = 0.5 ** (images_per_step / h), h = min(half_life, rampup * seen)."""
    h = half_life
    if rampup > 0:
        h = min(h, rampup * images_seen)
    if h <= 0:
        return 0.0
    return 0.5 ** (images_per_step / h)


class EMA:
    """Float32 shadow copies of a model's floating-point parameters and buffers."""

    def __init__(self, model: nn.Module):
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().float().clone() for k, v in model.state_dict().items()
            if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float, where: torch.Tensor | None = None) -> None:
        """shadow <- decay * shadow + (1 - decay) * current; unchanged where ``where`` (a bool
        tensor) is false, decided on the device (no host sync)."""
        current = model.state_dict()
        names = list(self.shadow)
        targets = [self.shadow[k] for k in names]
        sources = [current[k].detach().float() for k in names]
        if where is None:
            torch._foreach_lerp_(targets, sources, 1.0 - decay)
            return
        weight = torch.where(where, 1.0 - decay, 0.0).to(targets[0].device, torch.float32)
        torch._foreach_lerp_(targets, sources, [weight] * len(targets))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (non-float buffers are left as they are)."""
        own = model.state_dict()
        for k, v in self.shadow.items():
            own[k].copy_(v)
