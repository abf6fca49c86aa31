"""Training randomness: counter-based per-example draws on the device, and the dropout RNG states.

Each training example's timestep, flip and noise come from a generator seeded by (seed, the
example's index in the endless data stream) alone, drawn where the network runs. So:
- no rank builds the global batch: each draws only its own examples, on its own GPU, without
  a host-to-device copy of noise or a wait for the CPU;
- an example's randomness does not depend on the batch size, the number of processes, the
  gradient accumulation or the step it falls in, and there is no generator state to save:
  a resumed run redraws exactly what a straight run draws.
The streams differ between the CPU (Mersenne Twister) and CUDA (Philox), as any PyTorch draw.

Dropout uses PyTorch's global generators (the CPU one, and the GPU's own on CUDA); their states
are saved per rank in checkpoints (:func:`rng_state`, :func:`set_rng_state`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit ints that mixes every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def example_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for example ``index`` of run ``seed`` (no linear collisions)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 1


class ExampleDraws:
    """Per-example (uniforms [N, 2], noise [N, *shape]) on ``device``, keyed by stream index.

    Column 0 of the uniforms picks the timestep, column 1 the flip. One generator on the
    device is re-seeded per example and fills that example's row of normals in one call (the
    first two, through the normal CDF, become the uniforms): seeding is host-side
    bookkeeping, and the draw a kernel queued on the device, so nothing waits for the GPU.
    """

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device
        self.gen = torch.Generator(device=device)

    def __call__(self, indices: Sequence[int], shape: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        n, size = len(indices), math.prod(shape)
        rows = torch.empty((n, 2 + size), device=self.device)
        for row, index in zip(rows.unbind(0), indices, strict=True):
            self.gen.manual_seed(example_seed(self.seed, int(index)))
            row.normal_(generator=self.gen)
        u = torch.special.ndtr(rows[:, :2]).clamp_(max=1 - 2**-24)  # U[0, 1) by Phi(z)
        return u, rows[:, 2:].view(n, *shape)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's dropout RNG states: the CPU generator's, and the GPU's on CUDA."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_state(device: torch.device, states: dict[str, torch.Tensor]) -> bool:
    """Restore :func:`rng_state`'s states; False when one this device needs is missing."""
    if "torch" not in states or (device.type == "cuda" and "cuda" not in states):
        return False
    torch.set_rng_state(states["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    return True
