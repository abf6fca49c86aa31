"""Timestep and class embeddings shared by the U-Net and the MLP denoiser."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["timestep_embedding", "TimeEmbedding", "ClassEmbedding"]


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


class ClassEmbedding(nn.Module):
    """A learned vector per class, added to the timestep embedding (as improved-diffusion's
    class-conditional U-Net and diffusers' ``class_embedding`` do).

    ``num_classes + 1`` rows: index ``num_classes`` is the null class ("no label"), which
    the trainer gives to a share of the examples so that one network learns both p(x | y) and
    p(x) for classifier-free guidance (Ho & Salimans 2022). ``y`` [B] int64 labels in
    [0, num_classes], or None for the null class -> [B, dim].
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            y = torch.as_tensor(y, device=device)
            if y.ndim == 0:
                y = y.expand(batch)
            if y.shape != (batch,) or y.dtype.is_floating_point or y.dtype == torch.bool:
                raise ValueError(f"expected integer labels y of shape [{batch}], got "
                                 f"{y.dtype} {list(y.shape)}")
            # Checked on the CPU only: on a GPU it would cost a host sync per forward (the
            # samplers and the trainer check labels once, up front).
            if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0
                                                         or int(y.max()) > self.num_classes):
                raise ValueError(f"labels must be in [0, {self.num_classes}] ({self.num_classes}"
                                 f" = the null class), got {int(y.min())}..{int(y.max())}")
        return self.embedding(y.long())
