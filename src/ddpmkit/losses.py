"""Closed-form divergences and decoder likelihoods used by the variational bound. Pure functions.

All results are elementwise, in nats; callers average over dimensions and divide by ln 2
to report bits per dimension.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "normal_kl",
    "gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "min_snr_weight",
]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 8 and its v form), [B] from SNR [B].

    The squared error of each target is a fixed multiple of the x0 error: ||eps - eps'||^2 =
    SNR ||x0 - x0'||^2 and ||v - v'||^2 = (SNR + 1) ||x0 - x0'||^2, SNR_t = alpha_bar_t /
    (1 - alpha_bar_t). Weighting the x0 error by min(SNR, gamma) gives, per prediction type:
    eps: min(SNR, gamma) / SNR; v: min(SNR, gamma) / (SNR + 1); x0: min(SNR, gamma).
    """
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1.0)
    if prediction == "x0":
        return clipped
    raise ValueError(f"prediction={prediction!r}; choose eps, v or x0")


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    The closed form for two diagonal Gaussians (what makes every L_{t-1} of DDPM eq. 5
    tractable): 0.5 (logvar2 - logvar1 + exp(logvar1 - logvar2)
    + (mean1 - mean2)^2 exp(-logvar2) - 1). Arguments broadcast against each other.
    """
    logvar1 = torch.as_tensor(logvar1, dtype=mean1.dtype, device=mean1.device)
    logvar2 = torch.as_tensor(logvar2, dtype=mean1.dtype, device=mean1.device)
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                            log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_var)), elementwise, in nats: the decoder density for continuous
    data (e.g. 2-D points), where there are no bins to integrate over."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def _log_normal_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails.

    Phi(hi) - Phi(lo) is computed on the side of the origin where the CDF values are small
    (reflecting with Phi(-z) = 1 - Phi(z)), then as
    log Phi(b) + log1p(-exp(log Phi(a) - log Phi(b))), which never subtracts two numbers near 1.
    """
    flip = lo > 0  # both ends in the upper tail: use 1 - Phi, i.e. the reflected interval
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp(log_a - log_b))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_var: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """log p(x) for data on ``levels`` evenly spaced values in [-1, 1] under N(mean, exp(log_var))
    integrated over each value's bin (DDPM eq. 13, the L_0 decoder).

    Bins have half-width 1 / (levels - 1) around each value; the lowest bin extends to -inf and
    the highest to +inf, so the masses of all ``levels`` bins sum to 1. ``levels=256`` for 8-bit
    images, 17 for the digits data. Computed in float64 (cheap here, and the tails need it);
    returned in the input dtype, elementwise, in nats.
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    dtype = x.dtype
    x, mean, log_var = (torch.as_tensor(v, device=x.device).to(torch.float64)
                        for v in (x, mean, log_var))
    half = 1.0 / (levels - 1)
    inv_std = torch.exp(-0.5 * log_var)
    lo = (x - half - mean) * inv_std
    hi = (x + half - mean) * inv_std
    is_lowest = x < -1.0 + half
    is_highest = x > 1.0 - half
    # Edge bins are open: P(z < hi) and P(z > lo) = Phi(-lo). Middle bins need the stable
    # difference; the placeholders keep it free of NaN where it is not used.
    lo_mid = torch.where(is_lowest | is_highest, torch.full_like(lo, -1.0), lo)
    hi_mid = torch.where(is_lowest | is_highest, torch.full_like(hi, 1.0), hi)
    log_mid = _log_normal_mass(lo_mid, hi_mid)
    log_probs = torch.where(
        is_lowest, torch.special.log_ndtr(hi),
        torch.where(is_highest, torch.special.log_ndtr(-lo), log_mid))
    return log_probs.to(dtype)
