"""Which diffusion steps a training batch sees.

Uniform sampling, and Improved DDPM's loss-aware importance sampling for the bound
(Nichol & Dhariwal 2021, eq. 18): p_t proportional to sqrt(E[L_t^2]) over the last 10 losses of
each step, once every step has 10, with the loss reweighted by 1 / (T p_t) so that its
expectation is unchanged.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError


def stratify(u: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
    """Stratified uniforms (VDM, Kingma et al. 2021, appendix: low-discrepancy t).

    Example at ``positions[i]`` of a global batch of ``n`` maps its uniform ``u[i]`` in
    [0, 1) into its own stratum [p/n, (p+1)/n), so one batch holds one draw from each of n
    equal slices of [0, 1): the same marginal distribution, less variance in the batch's loss.
    Fed to :meth:`TimestepSampler.from_uniform` (an inverse CDF), each slice of t's
    distribution gets one example, for uniform and for loss-aware sampling alike.
    """
    # float64: in float32, 127 + (1 - 2**-24) rounds up to 128, into the next stratum
    positions = positions.to(device=u.device, dtype=torch.float64)
    return (positions + u.double()) / n


HISTORY = 10
UNIFORM_MIX = 0.001  # keeps every p_t > 0, so the estimator stays unbiased


class TimestepSampler:
    """Draws (t, weight) for a batch; ``update`` feeds back per-example losses.

    The loss history lives on the training device and is updated there, without a host sync:
    each step's last ``HISTORY`` losses form a ring, written at ``counts % HISTORY``.
    """

    def __init__(self, num_timesteps: int, kind: str = "uniform",
                 device: torch.device | str = "cpu"):
        if kind not in ("uniform", "loss_aware"):
            raise ValueError(f"timestep sampler {kind!r}; choose uniform or loss_aware")
        self.T = num_timesteps
        self.kind = kind
        # one extra scratch row: writes that must not land anywhere go there
        self._ring = torch.zeros(num_timesteps + 1, HISTORY, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64, device=device)

    @property
    def history(self) -> torch.Tensor:
        """Loss history [T, HISTORY] (ring order: slot ``counts % HISTORY`` is the oldest)."""
        return self._ring[:self.T]

    def probabilities(self) -> torch.Tensor:
        """p_t [T], float64; uniform until every step has a full loss history."""
        uniform = torch.full((self.T,), 1.0 / self.T, dtype=torch.float64,
                             device=self.counts.device)
        if self.kind == "uniform":
            return uniform
        w = self.history.pow(2).mean(dim=1).sqrt()
        p = w / w.sum().clamp_min(1e-300)
        p = p * (1 - UNIFORM_MIX) + UNIFORM_MIX / self.T
        return torch.where((self.counts >= HISTORY).all(), p, uniform)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """t int64 [n] and importance weights 1 / (T p_t) float32 [n], from ``generator``."""
        u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
        return self.from_uniform(u)

    def from_uniform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t int64 [n] and weights float32 [n] from uniforms u in [0, 1) (inverse CDF)."""
        u = u.to(device=self.counts.device, dtype=torch.float64)
        if self.kind == "uniform":
            t = (u * self.T).long().clamp_(0, self.T - 1)
            return t, torch.ones(u.shape, device=u.device)
        p = self.probabilities()
        cdf = p.cumsum(0)
        t = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=self.T - 1)
        return t, (1.0 / (self.T * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor,
               ok: torch.Tensor | None = None) -> None:
        """Record per-example losses (unweighted) at their steps; the oldest drop out.

        ``ok`` (a bool tensor) false: record nothing (a skipped step). Within one batch, equal
        steps are recorded in batch order, so only the last HISTORY of them stay.
        """
        if self.kind == "uniform":
            return
        device = self.counts.device
        t = t.to(device).long()
        losses = losses.detach().to(device, torch.float64)
        ts, order = torch.sort(t, stable=True)
        occurrence = torch.arange(len(ts), device=device) - torch.searchsorted(ts, ts)
        per_t = torch.bincount(ts, minlength=self.T)
        keep = occurrence >= per_t[ts] - HISTORY
        if ok is not None:
            keep = keep & ok.to(device)
            per_t = per_t * ok.to(device).long()
        slot = (self.counts[ts] + occurrence) % HISTORY
        row = torch.where(keep, ts, self.T)  # dropped ones go to the scratch row
        self._ring.index_put_((row, slot), losses[order])
        self.counts += per_t

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"timesteps.history": self.history.cpu().clone(),
                "timesteps.counts": self.counts.cpu().clone()}

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
            # Older checkpoints kept counts at most HISTORY with the newest loss last: there
            # counts % HISTORY is slot 0, their oldest, so the ring continues correctly.
            self.history.copy_(history)
            self.counts.copy_(counts)
