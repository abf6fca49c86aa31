"""Evaluation: the full variational bound over a data set, in bits per dimension.

Work is split over torchrun ranks by example (example j goes to rank j mod world); each
example's noise depends only on (seed, j, t), so the figure is the same for any number of
processes and any batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import dist
from .diffusion import GaussianDiffusion


def evaluate_bpd(model: Callable, diffusion: GaussianDiffusion, x: torch.Tensor,
                 levels: int | None, batch_size: int = 512, seed: int = 0,
                 clip_denoised: bool = True, progress: bool = True,
                 device: torch.device | None = None, y: torch.Tensor | None = None) -> dict:
    """Bits/dim of every example of ``x`` [N, ...] under the full bound (DDPM eq. 5).

    ``y`` [N]: class labels for a class-conditional model (the bound on -log p(x | y)); a
    conditional model without ``y`` runs on its null class (the bound on -log p(x)).

    Returns a dict of floats: "bits_per_dim" (mean total) with its standard error "stderr",
    "prior" (L_T), "diffusion" (sum of L_{t-1}, t >= 2), "decoder" (L_0), the example count
    "n", and "per_example" (list of totals), "per_t" (mean of each term, L_0 first).
    """
    device = device or torch.device("cpu")
    rank, world = dist.rank(), dist.world_size()
    ids = torch.arange(x.shape[0])
    mine = ids[rank::world]
    T = diffusion.num_timesteps
    bar = None
    if progress and dist.is_main():
        from tqdm import tqdm
        bar = tqdm(total=len(mine) * T, unit="term", unit_scale=True, dynamic_ncols=True,
                   desc="bits/dim")
    totals = torch.zeros(x.shape[0], dtype=torch.float64)
    priors = torch.zeros(x.shape[0], dtype=torch.float64)
    terms = torch.zeros(x.shape[0], T, dtype=torch.float64)
    per_call = 64  # examples per bits_per_dim call; it batches (example, t) pairs itself
    for start in range(0, len(mine), per_call):
        sel = mine[start:start + per_call]
        out = diffusion.bits_per_dim(model, x[sel].to(device), levels=levels,
                                     clip_denoised=clip_denoised, seed=seed, example_ids=sel,
                                     batch_size=batch_size,
                                     progress=bar.update if bar is not None else None,
                                     y=None if y is None else y[sel].to(device))
        totals[sel], priors[sel], terms[sel] = out["total"], out["prior"], out["terms"]
    if bar is not None:
        bar.close()
    if world > 1:
        # Each example is non-zero on one rank only, so the sum adds zeros: exact, whatever
        # the order. NCCL reduces only GPU tensors.
        comm = dist.comm_device()
        reduced = []
        for tensor in (totals, priors, terms):
            tensor = tensor.to(comm)
            torch.distributed.all_reduce(tensor)
            reduced.append(tensor.cpu())
        totals, priors, terms = reduced
    n = x.shape[0]
    return {
        "bits_per_dim": float(totals.mean()),
        "stderr": float(totals.std() / math.sqrt(n)) if n > 1 else float("nan"),
        "prior": float(priors.mean()),
        "diffusion": float(terms[:, 1:].sum(1).mean()),
        "decoder": float(terms[:, 0].mean()),
        "n": n,
        "timesteps": T,
        "per_example": totals.tolist(),
        "per_t": terms.mean(0).tolist(),
    }
