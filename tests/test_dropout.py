"""ddpmkit.nn.dropout: the CPU mask's statistics, scaling, gradients and reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from ddpmkit.nn.dropout import MASK_LEVELS, Dropout, dropout

P = 0.1
P_EFF = round(P * MASK_LEVELS) / MASK_LEVELS  # the probability actually used: 6554 / 65536
SCALE = 1.0 / (1.0 - P_EFF)


def _ones_out(shape, seed=0, memory_format=torch.contiguous_format):
    torch.manual_seed(seed)
    x = torch.ones(shape).contiguous(memory_format=memory_format)
    return dropout(x, P)


def test_drop_rate_and_mean_match_p_within_five_standard_errors():
    out = _ones_out((16, 64, 32, 32))
    n = out.numel()
    dropped = (out == 0).double().mean().item()
    se = math.sqrt(P_EFF * (1 - P_EFF) / n)
    assert abs(dropped - P_EFF) < 5 * se, (dropped, P_EFF, se)
    # E[output] = input: the kept ones are scaled by exactly 1 / (1 - p_eff).
    assert abs(out.double().mean().item() - 1.0) < 5 * SCALE * se
    # Only two values occur: 0 and the scale.
    kept = out[out != 0]
    assert torch.equal(kept, torch.full_like(kept, SCALE))


def test_neighbours_are_independent():
    # Four mask values come from one 64-bit word: pairs of neighbours (and pairs a word
    # apart) must be dropped together with probability p^2, within 5 standard errors.
    drop = (_ones_out((2, 64, 64, 64), seed=1) == 0).flatten().double()
    for lag in (1, 2, 3, 4, 5):
        both = (drop[:-lag] * drop[lag:]).mean().item()
        se = math.sqrt(P_EFF**2 * (1 - P_EFF**2) / (drop.numel() - lag))
        assert abs(both - P_EFF**2) < 5 * se, (lag, both, P_EFF**2, se)


def test_values_and_gradient():
    torch.manual_seed(2)
    x = torch.randn(4, 8, 5, 7, requires_grad=True)
    torch.manual_seed(3)
    out = dropout(x, P)
    mask = out.detach() != 0
    torch.testing.assert_close(out[mask], x[mask] * SCALE, rtol=0, atol=0)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(grad, g * mask * SCALE, rtol=0, atol=0)


def test_seeded_replay_and_distinct_seeds():
    a, b, c = _ones_out((3, 4, 9, 9), 5), _ones_out((3, 4, 9, 9), 5), _ones_out((3, 4, 9, 9), 6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mask_follows_memory_order_and_keeps_the_layout():
    shape = (2, 6, 5, 4)
    plain = _ones_out(shape, 7)
    cl = _ones_out(shape, 7, torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    # The same draws land on the same memory positions: channels_last memory is (N, H, W, C).
    torch.testing.assert_close(cl.permute(0, 2, 3, 1).flatten(), plain.flatten(), rtol=0, atol=0)


def test_identity_cases_and_bad_p():
    x = torch.randn(3, 4)
    assert dropout(x, P, training=False) is x
    assert dropout(x, 0.0) is x
    assert dropout(x, 1e-7) is x  # rounds to zero levels
    module = Dropout(P).eval()
    assert module(x) is x
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            dropout(x, bad)
        with pytest.raises(ValueError, match="dropout probability"):
            Dropout(bad)


def test_other_dtypes_use_torch_dropout():
    x = torch.randn(64, 64, dtype=torch.float64)
    torch.manual_seed(9)
    ours = dropout(x, P)
    torch.manual_seed(9)
    ref = F.dropout(x, P, training=True)
    assert torch.equal(ours, ref)


def test_under_torch_compile_it_is_torch_dropout_and_traces_without_a_graph_break(monkeypatch):
    # random_ cannot be traced: each ResBlock became its own graph, recompiled per width
    explain = torch._dynamo.explain(lambda x: dropout(x * 2.0, P) + 1.0)(torch.ones(4, 8, 8))
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(64, 64)
    torch.manual_seed(9)
    ours = dropout(x, P)
    torch.manual_seed(9)
    assert torch.equal(ours, F.dropout(x, P, training=True))
