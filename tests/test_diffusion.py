import math

import pytest
import torch

from ddpmkit import GaussianDiffusion, make_betas
from ddpmkit.diffusion import pair_seed

Z = 5.0  # statistical tolerances: Z standard errors of the estimate at its sample size
F64 = torch.float64


def diffusion(T=1000, schedule="linear", **kw):
    return GaussianDiffusion(make_betas(schedule, T), **kw)


def full(B, i):
    return torch.full((B,), i, dtype=torch.long)


@pytest.mark.parametrize("steps", [1, 10, 200])
def test_closed_form_matches_iterated_single_steps(steps):
    d = diffusion(T=200, schedule="linear")
    n = 40_000
    g = torch.Generator().manual_seed(steps)
    x0 = torch.tensor([-0.8, 0.0, 0.6], dtype=F64).repeat(n, 1)  # [n, 3]
    x = x0
    for i in range(steps):
        x = d.q_step_sample(x, full(n, i), torch.randn(x.shape, generator=g, dtype=F64))
    t = full(n, steps - 1)
    mean, var, _ = d.q_mean_variance(x0, t)
    emp_mean, emp_var = x.mean(0), x.var(0)
    true_mean, true_var = mean[0], var[0]
    se_mean = (true_var / n).sqrt()
    se_var = true_var * math.sqrt(2 / (n - 1))
    assert torch.all((emp_mean - true_mean).abs() < Z * se_mean), (emp_mean, true_mean)
    assert torch.all((emp_var - true_var).abs() < Z * se_var), (emp_var, true_var)
    # And the one-shot sampler draws from the same law.
    y = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=F64))
    assert torch.all((y.mean(0) - true_mean).abs() < Z * se_mean)


def test_schedule_stays_float64_and_results_take_input_dtype():
    d = diffusion()
    assert d.alpha_bar.dtype == F64
    x0 = torch.randn(4, 3, dtype=torch.float32)
    t = torch.tensor([0, 5, 500, 999])
    assert d.q_sample(x0, t).dtype == torch.float32
    assert d.q_sample(x0.double(), t).dtype == F64


def test_posterior_is_bayes_product_of_gaussians():
    # q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): precisions add, means weight by them.
    d = diffusion(T=1000)
    b = make_betas("linear", 1000)
    ab = torch.cumprod(1 - b, 0)
    x0 = torch.randn(5, 2, dtype=F64)
    xt = torch.randn(5, 2, dtype=F64)
    for i in (1, 7, 400, 999):
        t = full(5, i)
        mean, var, log_var = d.q_posterior(x0, xt, t)
        a_t, ab_prev = 1 - b[i], ab[i - 1]
        prec = a_t / b[i] + 1 / (1 - ab_prev)
        want_mean = (a_t.sqrt() / b[i] * xt + ab_prev.sqrt() / (1 - ab_prev) * x0) / prec
        assert torch.allclose(mean, want_mean, rtol=1e-10, atol=1e-12)
        assert torch.allclose(var, torch.full_like(var, 1 / prec.item()), rtol=1e-10)
        assert torch.allclose(log_var, var.log(), rtol=1e-10)


def test_posterior_at_t0_has_zero_variance_and_clipped_log():
    d = diffusion()
    x0 = torch.randn(3, 2, dtype=F64)
    mean, var, log_var = d.q_posterior(x0, torch.randn(3, 2, dtype=F64), full(3, 0))
    assert torch.allclose(mean, x0)  # q(x_0 | x_1, x_0) is a point mass at x_0
    assert torch.all(var == 0)
    assert torch.allclose(log_var, torch.full_like(log_var, math.log(d.posterior_variance[1])))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_conversions_roundtrip(prediction):
    d = diffusion(prediction=prediction)
    x0 = torch.randn(6, 3, dtype=F64)
    eps = torch.randn(6, 3, dtype=F64)
    t = torch.tensor([0, 1, 10, 300, 998, 999])
    xt = d.q_sample(x0, t, eps)
    got_x0, got_eps = d.pred_x0_eps(d.target(x0, t, eps), xt, t)
    assert torch.allclose(got_x0, x0, atol=1e-9)
    # eps from x0 is ill-conditioned at t=0 (divides by sqrt(1-alpha_bar_1) = 0.01)
    assert torch.allclose(got_eps, eps, atol=1e-7)
    v = d.v_from_x0_eps(x0, t, eps)
    assert torch.allclose(d.x0_from_v(xt, t, v), x0, atol=1e-9)
    assert torch.allclose(d.eps_from_v(xt, t, v), eps, atol=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_oracle_output_gives_posterior_and_zero_kl(prediction, variance):
    d = diffusion(T=100, prediction=prediction, variance=variance)
    x0 = torch.rand(8, 2, 3, 3, dtype=F64) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([1, 2, 5, 20, 50, 80, 98, 99])
    xt = d.q_sample(x0, t, eps)
    out = d.target(x0, t, eps)
    if variance == "learned_range":
        out = torch.cat([out, -torch.ones_like(out)], 1)  # v = -1: log beta_tilde exactly
    p = d.p_mean_variance(out, xt, t, clip_denoised=False)
    mean, var, log_var = d.q_posterior(x0, xt, t)
    assert torch.allclose(p.mean, mean, atol=1e-10)
    assert torch.allclose(p.log_variance, log_var, atol=1e-10)
    kl = d.vb_terms_bpd(out, x0, xt, t, levels=256)
    assert torch.all(kl.abs() < 1e-8), kl


def test_clipping_keeps_the_predicted_x0_inside_minus_one_to_one():
    # Values inside [-1, 1] (negative ones too) pass unchanged; the mean is the posterior mean
    # at the clipped x0, and eps is recomputed so that (x0, eps) still give x_t.
    d = diffusion(T=100, prediction="x0")
    x_t = torch.tensor([[0.3, -0.2, 0.1, 0.5]], dtype=F64)
    t = torch.tensor([10])
    pred = torch.tensor([[-3.0, -0.5, 0.4, 1.7]], dtype=F64)
    out = d.p_mean_variance(pred, x_t, t, clip_denoised=True)
    assert out.pred_x0.tolist() == [[-1.0, -0.5, 0.4, 1.0]]
    mean, _, _ = d.q_posterior(out.pred_x0, x_t, t)
    assert torch.equal(out.mean, mean)
    assert torch.allclose(d.x0_from_eps(x_t, t, out.pred_eps), out.pred_x0, rtol=0, atol=1e-12)
    raw = d.p_mean_variance(pred, x_t, t, clip_denoised=False)
    assert torch.equal(raw.pred_x0, pred)


def test_learned_range_interpolates_between_beta_tilde_and_beta():
    d = diffusion(variance="learned_range")
    x = torch.zeros(3, 1)
    t = torch.tensor([5, 5, 5])
    v = torch.tensor([[-1.0], [1.0], [0.0]], dtype=F64)
    _, log_var = d.model_variance(v, x.double(), t)
    lo, hi = math.log(d.posterior_variance[5]), math.log(d.betas[5])
    assert log_var[:, 0].tolist() == pytest.approx([lo, hi, (lo + hi) / 2], rel=1e-12)


def test_fixed_large_uses_beta_and_beta_tilde_at_t0():
    d = diffusion(variance="fixed_large")
    x = torch.zeros(2, 1, dtype=F64)
    var, _ = d.model_variance(None, x, torch.tensor([0, 10]))
    assert var[0].item() == pytest.approx(d.posterior_variance[1].item())
    assert var[1].item() == pytest.approx(d.betas[10].item())


def test_prior_term_linear_schedule_is_about_1e5_bits():
    d = diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 3, 32, 32, generator=g) * 2 - 1
    l_t = d.prior_bpd(x0)
    # DDPM reports L_T ~ 1e-5 bits/dim for this schedule on [-1, 1] data.
    assert torch.all((l_t > 3e-6) & (l_t < 3e-5)), l_t


def test_hybrid_bound_does_not_move_the_mean():
    d = diffusion(T=50, schedule="cosine", variance="learned_range", loss="hybrid")
    x0 = torch.rand(4, 1, 2, 2) * 2 - 1
    out = torch.randn(4, 2, 2, 2, requires_grad=True)
    terms = d.training_losses(lambda x, t: out, x0, t=torch.tensor([0, 3, 20, 49]))
    terms["vb"].sum().backward()
    assert torch.all(out.grad[:, :1] == 0)  # mean channels
    assert out.grad[:, 1:].abs().sum() > 0  # variance channels
    assert torch.allclose(terms["loss"], terms["mse"] + 0.001 * 50 * terms["vb"])


def test_simple_loss_is_mse_on_target():
    d = diffusion(T=100, schedule="cosine", prediction="v")
    x0 = torch.randn(3, 4)
    noise = torch.randn(3, 4)
    t = torch.tensor([0, 50, 99])
    terms = d.training_losses(lambda x, tt: torch.zeros_like(x), x0, t=t, noise=noise)
    v = d.v_from_x0_eps(x0, t, noise)
    assert torch.allclose(terms["loss"], (v ** 2).mean(1))


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_vlb_loss_averaged_over_every_t_is_the_bound(variance):
    # The "vlb" loss at a uniform t is an unbiased estimate of sum_t L_t (DDPM eq. 5): with
    # the same noise, its average over all T steps is exactly the bound's sum of terms.
    T = 20
    d = diffusion(T=T, schedule="cosine", variance=variance, loss="vlb")
    x0 = (torch.randint(0, 17, (1, 1, 2, 2), generator=torch.Generator().manual_seed(0))
          / 8.0 - 1.0).double()

    def model(x, t):
        out = 0.3 * x + 0.01 * t.to(x).reshape(-1, 1, 1, 1)
        return torch.cat([out, torch.tanh(x)], 1) if variance == "learned_range" else out

    bpd = d.bits_per_dim(model, x0, levels=17, clip_denoised=False, seed=4)
    t = torch.arange(T)
    noise = torch.stack([torch.randn(x0.shape[1:],
                                     generator=torch.Generator().manual_seed(pair_seed(4, 0, i)))
                         for i in range(T)]).double()
    loss = d.training_losses(model, x0.expand(T, -1, -1, -1), t, noise, levels=17)["loss"]
    terms = bpd["terms"][0]
    # The loss runs in float32 (measured: <= 1.2e-6 relative off the float64 terms), so 2e-5
    # relative per term; every term is >= 0.01 bits here, so none hides under it.
    assert float(terms.min()) > 1e-3
    assert torch.allclose(loss.double() / T, terms, rtol=2e-5, atol=0)
    assert float(loss.double().mean()) == pytest.approx(float(terms.sum()), rel=2e-5)


def test_respace_keeps_alpha_bar_and_maps_timesteps():
    d = diffusion()
    r = d.respace([0, 249, 499, 749, 999])
    assert torch.allclose(r.alpha_bar, d.alpha_bar[[0, 249, 499, 749, 999]], rtol=1e-12)
    seen = []
    r.call_model(lambda x, t: seen.append(t) or x, torch.zeros(2, 1), torch.tensor([1, 4]))
    assert seen[0].tolist() == [249, 999]


# ---- the full bound against an exactly known data distribution ---------------------------

LEVELS = 5
GRID = torch.linspace(-1, 1, LEVELS, dtype=F64)
PROBS = torch.tensor([0.1, 0.2, 0.35, 0.25, 0.1], dtype=F64)


def exact_x0_model(d):
    """E[x0 | x_t] for i.i.d. pixels on GRID with PROBS: the MSE-optimal x0 prediction."""
    def model(x_t, t):
        ab = d.alpha_bar[t].to(x_t).reshape(-1, *[1] * (x_t.ndim - 1))
        # log N(x_t; sqrt(ab) c_k, 1 - ab) + log p_k, for every grid value c_k
        d2 = (x_t.unsqueeze(-1) - ab.sqrt().unsqueeze(-1) * GRID) ** 2
        logits = PROBS.log() - 0.5 * d2 / (1 - ab).unsqueeze(-1)
        return (torch.softmax(logits, -1) * GRID).sum(-1)
    return model


def independent_term(alpha_bar, betas, x0, xt, pred_x0, i):
    """One bound term in bits/dim, recomputed from scratch in float64 from the paper."""
    ab = alpha_bar[i]
    ab_prev = alpha_bar[i - 1] if i > 0 else torch.tensor(1.0, dtype=F64)
    beta = betas[i]
    c0 = ab_prev.sqrt() * beta / (1 - ab)
    ct = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
    model_mean = c0 * pred_x0 + ct * xt
    var_tilde = lambda j: betas[j] * (1 - alpha_bar[j - 1]) / (1 - alpha_bar[j])  # noqa: E731
    model_var = var_tilde(max(i, 1))
    if i == 0:
        std = model_var.sqrt()
        half = 1 / (LEVELS - 1)
        cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
        upper = torch.where(x0 > 1 - half, torch.ones_like(x0), cdf((x0 + half - model_mean) / std))
        lower = torch.where(x0 < -1 + half, torch.zeros_like(x0), cdf((x0 - half - model_mean) / std))
        nats = -torch.log(upper - lower)
    else:
        true_mean = c0 * x0 + ct * xt
        nats = 0.5 * (true_mean - model_mean) ** 2 / model_var  # equal variances: KL is this
    return nats.mean(-1) / math.log(2)


def test_bound_on_known_distribution_respects_entropy_and_terms_recompute():
    T = 100
    d = diffusion(T=T, prediction="x0")
    g = torch.Generator().manual_seed(1)
    B, D = 48, 6
    x0 = GRID[torch.multinomial(PROBS, B * D, replacement=True, generator=g)].reshape(B, D)
    model = exact_x0_model(d)
    bpd = d.bits_per_dim(model, x0, levels=LEVELS, clip_denoised=False, seed=3, batch_size=512)
    entropy = -(PROBS * PROBS.log2()).sum().item()
    total = bpd["total"]
    se = total.std().item() / math.sqrt(B)
    assert total.mean().item() >= entropy - Z * se, (total.mean(), entropy, se)
    assert total.mean().item() < entropy + 1.0  # the optimal model is not far off
    # Independent recomputation of a few terms with the same noise.
    for i in (0, 1, 2, 37, 99):
        gens = [torch.Generator().manual_seed(pair_seed(3, j, i)) for j in range(B)]
        noise = torch.stack([torch.randn(D, generator=g, dtype=torch.float32)
                             for g in gens]).double()
        xt = d.alpha_bar[i].sqrt() * x0 + (1 - d.alpha_bar[i]).sqrt() * noise
        pred = model(xt, full(B, i))
        want = independent_term(d.alpha_bar, d.betas, x0, xt, pred, i)
        # float64 on both sides: 1e-9 relative. The absolute floor is the reference's own
        # resolution: its naive -log(upper - lower) cannot resolve the ~1e-19-bit L_0 of this
        # exact decoder (1 - 1e-19 == 1 in float64); the smallest other term is ~1e-7 bits.
        assert torch.allclose(bpd["terms"][:, i], want, rtol=1e-9, atol=1e-15), i
    prior = (0.5 * (-1 - torch.log(1 - d.alpha_bar[-1]) + (1 - d.alpha_bar[-1])
                    + d.alpha_bar[-1] * x0 ** 2)).mean(1) / math.log(2)
    assert torch.allclose(bpd["prior"], prior, rtol=1e-9, atol=0)
    # The total must include every part: a tolerance from the smallest part it guards (L_T,
    # here 6e-7 .. 1e-5 bits/dim), not allclose's default rtol of 1e-5 of a ~5-bit total.
    smallest = float(bpd["prior"].min())
    assert smallest > 1e-7
    parts = bpd["prior"] + bpd["terms"].sum(1)
    assert float((total - parts).abs().max()) <= 1e-3 * smallest


@pytest.mark.parametrize("variance", ["fixed_large", "learned_range"])
def test_bound_terms_with_unequal_variances_are_the_closed_form_kl(variance):
    # KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) with the model's variance != beta_tilde:
    # recomputed from DDPM eq. 6-7 and Improved DDPM eq. 15 in float64. With equal variances
    # (fixed_small) the Gaussian KL is symmetric, so only this case pins its argument order.
    T, B, D = 50, 6, 4
    d = diffusion(T=T, prediction="eps", variance=variance)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(B, D, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(B, D, generator=g, dtype=F64)
    t = torch.tensor([1, 2, 5, 20, 40, 49])
    xt = d.q_sample(x0, t, eps)
    pred = eps + 0.3 * torch.randn(B, D, generator=g, dtype=F64)  # an imperfect network
    v = torch.rand(B, D, generator=g, dtype=F64) * 2 - 1
    out = torch.cat([pred, v], 1) if variance == "learned_range" else pred
    got = d.vb_terms_bpd(out, x0, xt, t, levels=256)

    b = make_betas("linear", T)[t][:, None]
    ab_all = torch.cumprod(1 - make_betas("linear", T), 0)
    ab, ab_prev = ab_all[t][:, None], ab_all[t - 1][:, None]
    tilde = b * (1 - ab_prev) / (1 - ab)
    coef_x0, coef_xt = ab_prev.sqrt() * b / (1 - ab), (1 - b).sqrt() * (1 - ab_prev) / (1 - ab)
    x0_hat = (xt - (1 - ab).sqrt() * pred) / ab.sqrt()
    mean_q, mean_p = coef_x0 * x0 + coef_xt * xt, coef_x0 * x0_hat + coef_xt * xt
    if variance == "fixed_large":
        var_p = b.expand(B, D)
    else:
        frac = (v + 1) / 2
        var_p = torch.exp(frac * b.log() + (1 - frac) * tilde.log())
    kl = 0.5 * (var_p.log() - tilde.log() + tilde / var_p + (mean_q - mean_p) ** 2 / var_p - 1)
    want = kl.mean(1) / math.log(2)
    assert float(want.min()) > 1e-4  # every term far above the tolerance below
    assert torch.allclose(got, want, rtol=1e-9, atol=0)


def test_bits_per_dim_does_not_depend_on_batching():
    d = diffusion(T=30, schedule="cosine")
    x0 = torch.rand(5, 1, 2, 2) * 2 - 1
    model = lambda x, t: 0.1 * x  # noqa: E731
    a = d.bits_per_dim(model, x0, levels=17, batch_size=7)
    b = d.bits_per_dim(model, x0, levels=17, batch_size=64)
    c = d.bits_per_dim(model, x0[3:], levels=17, example_ids=torch.tensor([3, 4]))
    assert torch.equal(a["total"], b["total"])
    assert torch.allclose(a["total"][3:], c["total"], rtol=1e-6)
