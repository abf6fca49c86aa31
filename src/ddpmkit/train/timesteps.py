"""Which diffusion steps a training batch sees.

Uniform sampling, and Improved DDPM's loss-aware importance sampling for the bound
(Nichol & Dhariwal 2021, eq. 18): p_t proportional to sqrt(E[L_t^2]) over the last 10 losses of
each step, once every step has 10, with the loss reweighted by 1 / (T p_t) so that its
expectation is unchanged.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError

HISTORY = 10
UNIFORM_MIX = 0.001  # keeps every p_t > 0, so the estimator stays unbiased


class TimestepSampler:
    """Draws (t, weight) for a batch; ``update`` feeds back per-example losses."""

    def __init__(self, num_timesteps: int, kind: str = "uniform"):
        if kind not in ("uniform", "loss_aware"):
            raise ValueError(f"timestep sampler {kind!r}; choose uniform or loss_aware")
        self.T = num_timesteps
        self.kind = kind
        self.history = torch.zeros(num_timesteps, HISTORY, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64)

    def probabilities(self) -> torch.Tensor:
        """p_t [T], float64; uniform until every step has a full loss history."""
        if self.kind == "uniform" or bool((self.counts < HISTORY).any()):
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        w = self.history.pow(2).mean(dim=1).sqrt()
        p = w / w.sum()
        return p * (1 - UNIFORM_MIX) + UNIFORM_MIX / self.T

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """t int64 [n] and importance weights 1 / (T p_t) float32 [n]."""
        if self.kind == "uniform":
            t = torch.randint(0, self.T, (n,), generator=generator)
            return t, torch.ones(n)
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, (1.0 / (self.T * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses (unweighted) at their steps; the oldest drop out."""
        if self.kind == "uniform":
            return
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist(), strict=True):
            if self.counts[ti] < HISTORY:
                self.history[ti, self.counts[ti]] = li
                self.counts[ti] += 1
            else:
                self.history[ti] = torch.roll(self.history[ti], -1)
                self.history[ti, -1] = li

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"timesteps.history": self.history.clone(), "timesteps.counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "timesteps.history" in state:
            history, counts = state["timesteps.history"], state.get("timesteps.counts")
            if history.shape != self.history.shape or counts is None or \
                    counts.shape != self.counts.shape:
                # The usual cause: resuming with another --timesteps than the run had.
                raise CheckpointError(
                    f"the checkpoint's timestep-sampler state is for T = {history.shape[0]} "
                    f"diffusion steps, this run has T = {self.T}: resume with the run's "
                    "--timesteps, or train into a new --out")
            self.history.copy_(history)
            self.counts.copy_(counts)
