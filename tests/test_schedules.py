import math

import pytest
import torch

from ddpmkit import betas_from_alpha_bar, make_betas
from ddpmkit.schedules import cosine_betas, linear_betas, validate_betas


def test_linear_endpoints_at_1000():
    b = make_betas("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert b[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.all(b[1:] > b[:-1])


@pytest.mark.parametrize("T", [50, 250, 4000])
def test_linear_endpoints_scale_with_T(T):
    b = linear_betas(T)
    assert b[0].item() == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert b[-1].item() == pytest.approx(0.02 * 1000 / T, rel=1e-12)
    # The scaling keeps alpha_bar_T of the same order as at T = 1000 (about 4e-5).
    alpha_bar_T = torch.prod(1 - b).item()
    assert 1e-6 < alpha_bar_T < 1e-3


def test_cosine_matches_eq17():
    T, s = 1000, 0.008
    b = cosine_betas(T)
    alpha_bar = torch.cumprod(1 - b, 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 500, 900):
        assert alpha_bar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-10)
    assert b.max().item() == pytest.approx(0.999)  # capped at t = T
    assert torch.all(b[1:] >= b[:-1])


def test_sigmoid_is_valid_and_increasing():
    b = make_betas("sigmoid", 1000)
    assert b.dtype == torch.float64
    assert torch.all((b > 0) & (b < 1))
    assert torch.all(b[1:] >= b[:-1])


@pytest.mark.parametrize("T", [0, -3, 1.5, True])
def test_bad_T_is_value_error(T):
    with pytest.raises(ValueError, match="T"):
        make_betas("cosine", T)


def test_linear_too_few_steps_names_the_value():
    with pytest.raises(ValueError, match="beta_T"):
        make_betas("linear", 10)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("quadratic-ish", 100)


@pytest.mark.parametrize("bad", [[0.1, 0.0], [0.5, 1.0], [0.1, float("nan")], [-0.1]])
def test_betas_outside_open_interval_rejected(bad):
    with pytest.raises(ValueError, match=r"betas\[\d+\]"):
        validate_betas(torch.tensor(bad))


def test_betas_from_alpha_bar_roundtrip():
    b = make_betas("linear", 1000)
    alpha_bar = torch.cumprod(1 - b, 0)
    assert torch.allclose(betas_from_alpha_bar(alpha_bar), b, rtol=1e-10, atol=0)
    kept = torch.tensor([0, 9, 99, 500, 999])
    b_kept = betas_from_alpha_bar(alpha_bar[kept])
    assert torch.allclose(torch.cumprod(1 - b_kept, 0), alpha_bar[kept], rtol=1e-12)
