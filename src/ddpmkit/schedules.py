"""Noise schedules: the variances beta_1..beta_T of the forward process, as float64 tensors.

Index convention used throughout ddpmkit: a schedule tensor has T entries and entry ``i``
holds the paper's step ``t = i + 1`` (so ``betas[0]`` is beta_1).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "make_betas",
    "linear_betas",
    "cosine_betas",
    "sigmoid_betas",
    "betas_from_alpha_bar",
    "validate_betas",
    "SCHEDULE_NAMES",
]


def validate_betas(betas: torch.Tensor) -> torch.Tensor:
    """Check a schedule is usable: 1-D, at least one step, every beta in (0, 1).

    Returns it as a contiguous float64 CPU tensor; raises ``ValueError`` naming the bad value.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().contiguous()
    if betas.ndim != 1 or betas.numel() < 1:
        raise ValueError(f"betas must be a 1-D tensor with T >= 1 entries, got shape "
                         f"{tuple(betas.shape)}")
    bad = ~((betas > 0) & (betas < 1))  # also catches NaN
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"beta must lie in (0, 1), but betas[{i}] = {betas[i].item()!r} "
                         f"(step t = {i + 1} of T = {betas.numel()})")
    return betas


def _check_T(T: int) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"the number of diffusion steps T must be an integer >= 1, got {T!r}")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020, sec. 4): beta from 1e-4 to 0.02 at T = 1000.

    For other T both endpoints are scaled by 1000 / T, as Improved DDPM does, so that the
    total noise added (and hence alpha_bar_T) stays about the same. Shape [T], float64.
    """
    _check_T(T)
    scale = 1000.0 / T
    betas = torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)
    if T > 1 and betas[-1] >= 1:
        raise ValueError(f"the linear schedule at T = {T} gives beta_T = {betas[-1].item():g} "
                         ">= 1; use T >= 21 or the cosine schedule")
    return validate_betas(betas)


def betas_from_alpha_bar(alpha_bar: torch.Tensor, max_beta: float | None = None) -> torch.Tensor:
    """Betas whose cumulative product is ``alpha_bar``: beta_i = 1 - alpha_bar_i / alpha_bar_{i-1}.

    ``alpha_bar`` [K] must be decreasing, with alpha_bar_0 = 1 implied before the first entry.
    Used by the cosine/sigmoid schedules (with ``max_beta`` = 0.999, Improved DDPM eq. 17) and
    by respacing (Improved DDPM sec. 4: keep a subset of steps, recompute their betas), where no
    cap is applied so that the kept steps' alpha_bar is reproduced exactly. Shape [K], float64.
    """
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    betas = 1.0 - alpha_bar / prev
    if max_beta is not None:
        betas = betas.clamp(max=max_beta)
    return validate_betas(betas)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    alpha_bar(t) = f(t) / f(0) with f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2, and
    beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1) capped at ``max_beta`` = 0.999 to avoid the
    singularity at t = T. Shape [T], float64.
    """
    _check_T(T)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    # alpha_bar(t) / alpha_bar(t - 1) = f(t) / f(t - 1): the f(0) normalisation cancels.
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
    return validate_betas(betas)


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> torch.Tensor:
    """Sigmoid schedule (Jabri et al. 2022, "Scalable Adaptive Computation", sec. 3.3).

    alpha_bar(t) = (sigmoid(end / tau) - sigmoid((t / T (end - start) + start) / tau))
                   / (sigmoid(end / tau) - sigmoid(start / tau)),
    betas from consecutive ratios capped at ``max_beta``. Shape [T], float64.
    """
    _check_T(T)
    if not start < end or tau <= 0:
        raise ValueError(f"sigmoid schedule needs start < end and tau > 0, got start={start}, "
                         f"end={end}, tau={tau}")
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    f = (v_end - torch.sigmoid((steps * (end - start) + start) / tau)) / (v_end - v_start)
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
    return validate_betas(betas)


_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}
SCHEDULE_NAMES = tuple(_SCHEDULES)


def make_betas(name: str, T: int, **kwargs) -> torch.Tensor:
    """Betas of the named schedule ("linear" | "cosine" | "sigmoid"), float64 [T]."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(_SCHEDULES)}")
    return _SCHEDULES[name](T, **kwargs)
