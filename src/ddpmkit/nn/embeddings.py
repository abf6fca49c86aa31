"""Timestep embeddings shared by the U-Net and the MLP denoiser."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["timestep_embedding", "TimeEmbedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps, as in the published DDPM network.

    ``t``: [B] timestep indices (int or float; floats are a continuous index), or a scalar.
    Returns [B, dim] float32: ``[sin(t * f_i), cos(t * f_i)]`` (sin half first) with
    ``f_i = exp(-ln(max_period) * i / (half - 1))`` for ``i < half = dim // 2``; an odd ``dim``
    gets a zero last column. Always float32, also under autocast, because ``t * f`` reaches
    ~1e3 and bf16/fp16 would lose the phase entirely.
    """
    half = dim // 2
    if half < 2:
        raise ValueError(f"timestep embedding dim={dim} must be at least 4")
    t = t.reshape(-1).to(torch.float32)
    # Same operation order as the reference implementations (scale, then divide, then exp),
    # so embeddings agree with theirs to the last bit.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - 1))
    args = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoid(dim) -> Linear(dim, out_dim) -> SiLU -> Linear(out_dim, out_dim).

    ``t`` [B] -> [B, out_dim]. The names ``linear_1``/``linear_2`` are diffusers'
    (``time_embedding.linear_1/2``). No activation after ``linear_2``: each consumer applies
    SiLU itself (the U-Net does it once per forward, not once per block).
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.linear_1 = nn.Linear(dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, t: Tensor) -> Tensor:
        # Cast the float32 sinusoid to the weights' dtype so a model converted with
        # .to(torch.bfloat16) works without autocast; under autocast Linear recasts anyway.
        emb = timestep_embedding(t, self.dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))
