import math

import pytest
import torch

from ddpmkit.losses import (
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    normal_kl,
)

Z = 5.0  # tolerances below are Z standard errors of the Monte-Carlo estimate


def test_normal_kl_zero_for_equal():
    m = torch.randn(100, dtype=torch.float64)
    lv = torch.randn(100, dtype=torch.float64)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(100, dtype=torch.float64),
                          atol=1e-15)


@pytest.mark.parametrize("m1,lv1,m2,lv2", [(0.3, -1.0, -0.2, 0.5), (1.0, 0.0, 0.0, 0.0),
                                           (0.0, -3.0, 0.1, -2.5)])
def test_normal_kl_matches_monte_carlo(m1, lv1, m2, lv2):
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x = m1 + math.exp(0.5 * lv1) * torch.randn(n, generator=g, dtype=torch.float64)
    t = torch.tensor
    log_ratio = (gaussian_log_likelihood(x, t(m1), t(lv1, dtype=torch.float64))
                 - gaussian_log_likelihood(x, t(m2), t(lv2, dtype=torch.float64)))
    mc, se = log_ratio.mean().item(), log_ratio.std().item() / math.sqrt(n)
    exact = normal_kl(t(m1, dtype=torch.float64), t(lv1), t(m2), t(lv2)).item()
    assert exact >= 0
    assert abs(mc - exact) < Z * se, (mc, exact, se)


def _grid(levels):
    return torch.linspace(-1, 1, levels, dtype=torch.float64)


@pytest.mark.parametrize("levels", [256, 17, 2])
@pytest.mark.parametrize("mean,log_var", [(0.0, math.log(0.1)), (0.93, -9.0), (-3.0, 0.5),
                                          (0.5, -14.0), (40.0, -2.0)])
def test_discretized_sums_to_one(levels, mean, log_var):
    x = _grid(levels)
    lp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean),
                                             torch.full_like(x, log_var), levels)
    assert torch.isfinite(lp).all()
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_middle_bin_is_cdf_difference():
    levels = 17
    x = _grid(levels)[5]
    mean, log_var = torch.tensor(0.1, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    std = math.exp(0.5 * log_var.item())
    half = 1 / (levels - 1)
    hi = torch.special.ndtr((x + half - mean) / std)
    lo = torch.special.ndtr((x - half - mean) / std)
    lp = discretized_gaussian_log_likelihood(x.reshape(1), mean.reshape(1), log_var.reshape(1),
                                             levels)
    assert lp.item() == pytest.approx(math.log((hi - lo).item()), rel=1e-12)


def test_discretized_edge_bins_are_open():
    levels = 256
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    mean = torch.zeros(2, dtype=torch.float64)
    log_var = torch.zeros(2, dtype=torch.float64)
    half = 1 / 255
    lp = discretized_gaussian_log_likelihood(x, mean, log_var, levels)
    assert lp[0].item() == pytest.approx(math.log(torch.special.ndtr(torch.tensor(-1 + half, dtype=torch.float64))),
                                         rel=1e-12)
    assert lp[1].item() == pytest.approx(lp[0].item(), rel=1e-12)  # symmetric


def test_discretized_far_tail_is_finite_and_accurate():
    # A bin 30 standard deviations out: a naive cdf difference gives log(0) = -inf.
    x = torch.tensor([0.5], dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(x, torch.tensor([-0.4]), torch.tensor([2 * math.log(0.03)]),
                                             256)
    assert torch.isfinite(lp).all() and lp.item() < -400


def test_discretized_keeps_input_dtype():
    x = _grid(17).float()
    lp = discretized_gaussian_log_likelihood(x, torch.zeros_like(x), torch.zeros_like(x), 17)
    assert lp.dtype == torch.float32
