"""Dropout whose CPU mask costs a third of ``torch.nn.functional.dropout``'s.

On the CPU, ``F.dropout`` draws one Bernoulli variate per element (about 9 ns each on the
2-core machine of docs/speed.md), which made dropout ~5% of a DDPM U-Net training step. The
mask needs only a few random bits per element: here every element gets 16 bits, cut from
64-bit words of the same generator (4 elements per draw), and is dropped when those 16 bits
fall below ``round(p * 65536)``. So p is rounded to a multiple of 1/65536 (0.1 becomes
0.100006); the kept elements are scaled by 1 / (1 - that p), which keeps E[output] = input
exactly.

The mask is drawn in the tensor's memory order (as ``F.dropout``'s is) from the global CPU
generator, so ``torch.manual_seed`` and a saved RNG state replay it. CUDA and non-float32
tensors, and code under ``torch.compile``, use ``F.dropout`` (fused there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["Dropout", "dropout", "MASK_LEVELS"]

MASK_LEVELS = 65536  # 16 random bits per element: p is rounded to a multiple of 1 / 65536


def _check_probability(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Zero each element of ``x`` with probability ~p and scale the rest by 1 / (1 - p).

    Any shape. Gradients are ``grad * mask / (1 - p)``, as for ``F.dropout``.
    """
    _check_probability(p)
    if not training or p == 0.0:
        return x
    # Under torch.compile too: Dynamo cannot trace random_ (a graph break in every ResBlock,
    # which then recompiles per width until the recompile limit), and inductor fuses the mask.
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    drop = round(p * MASK_LEVELS)
    if drop == 0:
        return x
    n = x.numel()
    # 64 random bits per word, the full int64 range (to=None), read as four int16 values.
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    bits = words.view(torch.int16)[:n]  # uniform on [-32768, 32767]
    # The mask takes x's memory layout (empty_like keeps a dense tensor's strides) and is
    # filled in memory order: an elementwise op over mixed layouts is several times slower.
    keep = torch.empty_like(x, dtype=torch.bool)
    torch.ge(bits, drop - MASK_LEVELS // 2, out=keep.as_strided((n,), (1,)))
    scale = MASK_LEVELS / (MASK_LEVELS - drop)  # P(keep) = 1 - drop / 65536
    noise = keep.to(torch.float32).mul_(scale)
    return x * noise


class Dropout(nn.Module):
    """``nn.Dropout`` with :func:`dropout`'s cheaper CPU mask; identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        _check_probability(p)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
