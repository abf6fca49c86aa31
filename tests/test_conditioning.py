"""Class-conditional sampling, classifier-free guidance and editing against closed forms.

Oracle: class y's data is N(mu_y, Sigma) (full covariance). With x_t = a x0 + s eps
(a^2 = alpha_bar, s^2 = 1 - alpha_bar), x_t | y ~ N(a mu_y, C), C = a^2 Sigma + s^2 I, and the
MSE-optimal eps prediction is linear: E[eps | x_t, y] = s C^-1 (x_t - a mu_y). The null class
is another Gaussian N(mu_null, Sigma); then guided eps = eps_null + S (eps_y - eps_null) is
exactly the optimal eps of N(mu_null + S (mu_y - mu_null), Sigma): guidance moves the mean of
the samples along the line through mu_null and mu_y, and leaves the covariance alone.
Inpainting with this oracle has a closed-form target: the conditional Gaussian of the
generated pixels given the kept ones.
"""

import dataclasses
import math

import pytest
import torch

from ddpmkit import ConfigError, GaussianDiffusion, build_model, make_betas
from ddpmkit.editing import (
    check_mask,
    inpaint,
    interpolate,
    repaint_schedule,
    sdedit,
    slerp,
)
from ddpmkit.nn import PRESETS, MLPDenoiser, UNet
from ddpmkit.sampling import (
    METHODS,
    ddim_reconstruct,
    guidance_window,
    guided_model,
    sample,
    space_timesteps,
)

F64 = torch.float64
Z = 5.0  # tolerances: Z standard errors at the sample size used
MEANS = torch.tensor([[1.0, -1.0], [-1.5, 0.5], [0.0, 2.0]], dtype=F64)  # classes 0, 1, 2
MU_NULL = torch.tensor([0.2, 0.3], dtype=F64)
SIGMA = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64)


def alpha_bar_at(d, t):
    """alpha_bar at integer or fractional indices (lambda = log(a / s) linear in between, the
    samplers' "interpolate" time mapping)."""
    table = 0.5 * (torch.log(d.alpha_bar) - torch.log1p(-d.alpha_bar))
    t = t.cpu().double()
    i0 = t.floor().long().clamp(0, table.numel() - 2)
    return torch.sigmoid(2 * (table[i0] + (t - i0) * (table[i0 + 1] - table[i0])))


class GaussianClasses:
    """``model(x_t, t, y)``: exact eps for class y ~ N(means[y], sigma); y = K is the null class
    N(mu_null, sigma). x_t [B, ...] is flattened to [B, D]. ``calls`` counts forward calls and
    their batch sizes."""

    def __init__(self, d, means=MEANS, mu_null=MU_NULL, sigma=SIGMA, variance_channels=False):
        self.d, self.sigma = d, sigma
        self.table = torch.cat([means, mu_null[None]])
        self.num_classes = means.shape[0]
        self.variance_channels = variance_channels
        self.batches: list[int] = []

    def __call__(self, x, t, y=None):
        self.batches.append(x.shape[0])
        B = x.shape[0]
        y = torch.full((B,), self.num_classes) if y is None else y
        t_unique, which = torch.unique(t.cpu(), return_inverse=True)
        ab = alpha_bar_at(self.d, t_unique).reshape(-1, 1, 1)
        D = self.sigma.shape[0]
        C_inv = torch.linalg.inv(ab * self.sigma + (1 - ab) * torch.eye(D, dtype=F64))
        a, s = ab[which, 0].sqrt(), (1 - ab[which, 0]).sqrt()  # [B, 1]
        r = x.reshape(B, D).double() - a * self.table[y.cpu()]
        eps = s * torch.einsum("bij,bj->bi", C_inv[which], r)
        eps = eps.reshape(x.shape).to(x.dtype)
        if self.variance_channels:
            eps = torch.cat([eps, torch.full_like(eps, 0.25)], dim=1)
        return eps


def random_net(preset, **overrides):
    """A network whose output depends on its inputs at init (no zero-initialised last layers)."""
    cfg = dataclasses.replace(PRESETS[preset], **overrides)
    return (UNet if cfg.arch == "unet" else MLPDenoiser)(cfg, zero_init=False)


def diffusion(T=200, **kw):
    return GaussianDiffusion(make_betas("linear", T) if T >= 200 else make_betas("cosine", T),
                             **kw)


def law_ok(x, mean, cov, n_label=""):
    """Sample mean and covariance [n, D] within Z standard errors of the Gaussian (mean, cov).
    SE of a covariance entry: sqrt((S_ij^2 + S_ii S_jj) / n)."""
    n = x.shape[0]
    m, c = x.mean(0), torch.cov(x.T)
    se_m = (torch.diagonal(cov) / n).sqrt()
    se_c = ((cov ** 2 + torch.outer(torch.diagonal(cov), torch.diagonal(cov))) / n).sqrt()
    assert torch.all((m - mean).abs() < Z * se_m), (n_label, m, mean)
    assert torch.all((c - cov).abs() < Z * se_c), (n_label, c, cov)


# ---- conditional sampling and guidance ---------------------------------------------------------

@pytest.mark.parametrize("method", [pytest.param("ancestral", marks=pytest.mark.slow), "dpm++2m"])
def test_conditional_samples_follow_each_class_law(method):
    d = diffusion(T=1000, variance="fixed_large")
    oracle = GaussianClasses(d)
    n = 3000
    y = torch.arange(3).repeat_interleave(n)
    x = sample(oracle, d, (3 * n, 2), method, 0 if method == "ancestral" else 50,
               clip_denoised=False, generator=torch.Generator().manual_seed(1), y=y,
               noise=torch.randn(3 * n, 2, generator=torch.Generator().manual_seed(2),
                                 dtype=F64))
    for k in range(3):
        law_ok(x[y == k], MEANS[k], SIGMA, f"class {k}")


@pytest.mark.parametrize("S", [0.0, 0.5, 2.0, 3.0])
def test_guidance_moves_the_mean_along_the_class_direction(S):
    d = diffusion(T=1000, variance="fixed_large")
    oracle = GaussianClasses(d)
    n = 4000
    y = torch.tensor([0, 2]).repeat_interleave(n)
    x = sample(oracle, d, (2 * n, 2), "dpm++2m", 50, clip_denoised=False, y=y, guidance=S,
               noise=torch.randn(2 * n, 2, generator=torch.Generator().manual_seed(3),
                                 dtype=F64))
    for k, part in ((0, x[:n]), (2, x[n:])):
        law_ok(part, MU_NULL + S * (MEANS[k] - MU_NULL), SIGMA, f"S={S} class {k}")


@pytest.mark.parametrize("method", METHODS)
def test_guidance_one_is_the_conditional_path_and_zero_the_null_class(method):
    d = diffusion(T=50)
    torch.manual_seed(0)
    net = random_net("tiny", num_classes=4).eval()
    y = torch.tensor([0, 3, 1])
    kw = dict(seeds=[5, 6, 7], eta=0.5)
    null = torch.full_like(y, 4)
    cond = sample(lambda x, t: net(x, t, y), d, (3, 1, 8, 8), method, 6, **kw)
    uncond = sample(lambda x, t: net(x, t, null), d, (3, 1, 8, 8), method, 6, **kw)
    assert torch.equal(sample(net, d, (3, 1, 8, 8), method, 6, y=y, guidance=1.0, **kw), cond)
    assert torch.equal(sample(net, d, (3, 1, 8, 8), method, 6, y=y, guidance=0.0, **kw), uncond)
    assert torch.equal(sample(net, d, (3, 1, 8, 8), method, 6, **kw), uncond)  # y=None: null
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the label does reach the network


def test_guided_model_is_one_batched_call_mixing_cond_and_uncond():
    torch.manual_seed(0)
    net = random_net("tiny", num_classes=4, out_channels=2).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 40, 999]), torch.tensor([0, 3, 1])
    calls = []

    def counted(x, t, y):
        calls.append(x.shape[0])
        return net(x, t, y)
    counted.num_classes = 4
    with torch.no_grad():
        out = guided_model(counted, y, 2.5)(x, t)
        cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 4))
    assert calls == [6]
    # learned variance (2C outputs): the mean part is guided, the variance part conditional
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + 2.5 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(out[:, 1:], cond[:, 1:])


def test_learned_variance_outputs_guide_the_mean_only_in_sampling():
    d = diffusion(T=1000, variance="learned_range")
    oracle = GaussianClasses(d, variance_channels=True)
    x = sample(oracle, d, (4, 2), "ddim", 20, clip_denoised=False, y=[1, 1, 2, 2], guidance=2,
               noise=torch.zeros(4, 2, dtype=F64))
    plain = GaussianClasses(d, mu_null=MU_NULL, means=MU_NULL + 2 * (MEANS - MU_NULL))
    d_fixed = diffusion(T=1000)
    ref = sample(plain, d_fixed, (4, 2), "ddim", 20, clip_denoised=False, y=[1, 1, 2, 2],
                 noise=torch.zeros(4, 2, dtype=F64))
    torch.testing.assert_close(x, ref)


# ---- guidance interval (Kynkaanniemi et al. 2024) --------------------------------------------

def sigma_at(d, t):
    """EDM noise level sqrt((1 - ab) / ab) at the network's (possibly fractional) t."""
    ab = alpha_bar_at(d, t)
    return ((1 - ab) / ab).sqrt()


class Recorder:
    """Wraps the oracle: records (t of the call, whether it was a guided 2B-row call)."""

    def __init__(self, oracle, batch):
        self.oracle, self.batch, self.calls = oracle, batch, []
        self.num_classes = oracle.num_classes

    def __call__(self, x, t, y=None):
        self.calls.append((float(t[0]), x.shape[0] == 2 * self.batch))
        assert x.shape[0] == self.batch or torch.equal(t[:self.batch], t[self.batch:])
        return self.oracle(x, t, y)


@pytest.mark.parametrize("method", METHODS)
def test_guidance_interval_guides_exactly_inside_and_is_conditional_outside(method):
    d = diffusion(T=1000, variance="fixed_large")
    y = torch.tensor([0, 2, 1, 2])
    kw = dict(clip_denoised=False, y=y, seeds=[3, 4, 5, 6], eta=0.7)
    shape, steps = (4, 2), 12
    run = lambda model, **more: sample(model, d, shape, method, steps, **kw, **more)  # noqa: E731
    oracle = GaussianClasses(d)
    guided, cond = run(oracle, guidance=3.0), run(oracle, guidance=1.0)
    # every sigma inside -> the guided path; none inside -> the plain conditional path, exactly
    assert torch.equal(run(oracle, guidance=3.0, guidance_interval=(0.0, math.inf)), guided)
    assert torch.equal(run(oracle, guidance=3.0, guidance_interval=(1e4, 1e5)), cond)
    assert not torch.allclose(guided, cond, atol=1e-2)
    # a partial interval: a guided (2B-row) call exactly at the steps whose sigma is inside,
    # with sigma computed here from alpha_bar (fractional t for dpm++ and heun)
    lo, hi = 0.5, 5.0
    rec = Recorder(oracle, 4)
    part = run(rec, guidance=3.0, guidance_interval=(lo, hi))
    sig = sigma_at(d, torch.tensor([t for t, _ in rec.calls], dtype=F64))
    inside = ((sig > lo) & (sig <= hi)).tolist()
    assert [g for _, g in rec.calls] == inside
    assert any(inside) and not all(inside)
    assert not torch.allclose(part, guided) and not torch.allclose(part, cond)


def test_guidance_interval_with_a_different_t_per_row_guides_row_by_row():
    # a batch whose rows sit at different noise levels (as in a bound evaluation): the rows
    # inside the interval get the guided output, the others the plain conditional one
    d = diffusion(T=1000, variance="fixed_large")
    oracle = GaussianClasses(d)
    y = torch.tensor([0, 2, 1, 2])
    t = torch.tensor([10, 500, 999, 300])
    lo, hi = 0.5, 5.0
    inside = ((sigma_at(d, t.double()) > lo) & (sigma_at(d, t.double()) <= hi)).tolist()
    assert any(inside) and not all(inside)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    out = guided_model(oracle, y, 3.0, window=guidance_window(d, (lo, hi)))(x, t)
    cond, uncond = oracle(x, t, y), oracle(x, t, torch.full((4,), oracle.num_classes))
    for i, guide in enumerate(inside):
        want = uncond[i] + 3.0 * (cond[i] - uncond[i]) if guide else cond[i]
        assert torch.allclose(out[i], want, atol=1e-6)


def test_guidance_interval_path_equals_the_closed_form_ddim_recursion():
    """DDIM (eta = 0) with the exact Gaussian eps is an affine map; with the interval, each
    step uses class y's law where sigma is outside and the guided law N(mu_null + S (mu_y -
    mu_null), Sigma) inside. That recursion, written out here, gives the sample to 1e-10."""
    d = diffusion(T=1000)
    oracle = GaussianClasses(d)
    S, lo, hi = 2.5, 0.3, 3.0
    y = torch.tensor([0, 1, 2, 0])
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    x = sample(oracle, d, (4, 2), "ddim", 25, clip_denoised=False, y=y, guidance=S,
               guidance_interval=(lo, hi), noise=noise)
    kept = space_timesteps(1000, 25)
    ab = d.alpha_bar.double()
    z = noise.clone()
    for j in reversed(range(len(kept))):
        a_t = ab[kept[j]]
        a_prev = ab[kept[j - 1]] if j > 0 else torch.tensor(1.0, dtype=F64)
        sigma = ((1 - a_t) / a_t).sqrt()
        mean = MEANS[y]
        if lo < sigma <= hi:
            mean = MU_NULL + S * (MEANS[y] - MU_NULL)
        C = a_t * SIGMA + (1 - a_t) * torch.eye(2, dtype=F64)
        eps = (1 - a_t).sqrt() * (z - a_t.sqrt() * mean) @ torch.linalg.inv(C).T
        x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(x, z, rtol=0, atol=1e-10)
    full = sample(oracle, d, (4, 2), "ddim", 25, clip_denoised=False, y=y, guidance=S,
                  noise=noise)
    assert (x - full).abs().max() > 1e-3  # the interval changed the path


def test_guidance_interval_bad_values_give_one_line_errors():
    d = diffusion(T=20)
    oracle = GaussianClasses(d)
    for bad in ((1.0, 0.5), (-1.0, 2.0), (math.nan, 1.0), (0.0, math.nan), (math.inf, math.inf)):
        with pytest.raises(ConfigError, match="guidance interval") as e:
            sample(oracle, d, (2, 2), "ddim", 4, y=[0, 1], guidance=2.0,
                   guidance_interval=bad, clip_denoised=False)
        assert "\n" not in str(e.value)


def test_bad_labels_and_guidance_give_one_line_errors():
    d = diffusion(T=20)
    oracle = GaussianClasses(d)
    for y, words in ((torch.tensor([0, 3]), "out of range"), (torch.tensor([-1, 0]), "range"),
                     (torch.tensor([0.5, 1.0]), "integers"), (torch.tensor([0, 1, 2]), "3 class")):
        with pytest.raises(ConfigError, match=words) as e:
            sample(oracle, d, (2, 2), "ddim", 4, y=y, clip_denoised=False)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="needs class labels"):
        sample(oracle, d, (2, 2), "ddim", 4, guidance=2.0, clip_denoised=False)
    uncond = build_model("tiny")
    with pytest.raises(ConfigError, match="class-conditional model"):
        sample(uncond, d, (2, 1, 8, 8), "ddim", 4, y=[0, 1])
    net = build_model("tiny", num_classes=3)
    with pytest.raises(ValueError, match="labels must be in"):
        net(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 4]))


# ---- networks --------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "toy2d"])
def test_unconditional_networks_are_unchanged_and_ignore_labels(preset):
    torch.manual_seed(0)
    base = random_net(preset)
    torch.manual_seed(0)
    cond = random_net(preset, num_classes=5)
    extra = set(cond.state_dict()) - set(base.state_dict())
    assert extra == {"class_embed.embedding.weight"}
    assert cond.state_dict()["class_embed.embedding.weight"].shape[0] == 6  # + the null class
    shape = (3, 1, 8, 8) if preset == "tiny" else (3, 2)
    x, t = torch.randn(shape), torch.tensor([1, 10, 100])
    with torch.no_grad():
        assert torch.equal(base(x, t, torch.tensor([0, 1, 2])), base(x, t))
        outs = [cond(x, t, torch.full((3,), k)) for k in range(6)]
        assert torch.equal(cond(x, t), outs[5])  # y=None is the null class
    for k in range(5):  # every label changes the output
        assert not torch.allclose(outs[k], outs[5], atol=1e-4)


def test_class_embedding_trains_through_the_loss():
    """The labels reach the loss: their rows of the embedding (and only theirs) get gradient.
    (Perturbed first: at the zero init only the last layer has a gradient.)"""
    torch.manual_seed(0)
    net = build_model("toy2d", num_classes=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    d = diffusion(T=100)
    y = torch.tensor([0, 0, 2, 2])  # class 0 and the null class (2)
    d.training_losses(net, torch.randn(4, 2), y=y)["loss"].mean().backward()
    g = net.class_embed.embedding.weight.grad
    assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0 and g[1].abs().sum() == 0


def test_num_classes_config_validation():
    from ddpmkit.config import ModelConfig, TrainConfig
    with pytest.raises(ConfigError, match="num_classes"):
        ModelConfig(num_classes=-1)
    with pytest.raises(ConfigError, match="class_dropout"):
        TrainConfig(class_dropout=1.0)


# ---- inpainting ------------------------------------------------------------------------------

RHO = torch.tensor([[1.0, 0.8, 0.6, 0.5],
                    [0.8, 1.0, 0.8, 0.6],
                    [0.6, 0.8, 1.0, 0.8],
                    [0.5, 0.6, 0.8, 1.0]], dtype=F64) * 0.4  # 4 correlated "pixels"
MU4 = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=F64)
KEEP = torch.tensor([1.0, 0.4], dtype=F64)  # pixels 0, 1 kept at these values


def conditional_gaussian():
    """Law of pixels 2, 3 given pixels 0, 1 = KEEP: mean and covariance (Schur complement)."""
    k, u = [0, 1], [2, 3]
    Skk, Suk, Suu = RHO[k][:, k], RHO[u][:, k], RHO[u][:, u]
    gain = Suk @ torch.linalg.inv(Skk)
    return MU4[u] + gain @ (KEEP - MU4[k]), Suu - gain @ Suk.T


def run_inpaint(method, n, **kw):
    d = diffusion(T=1000, variance="fixed_large")
    oracle = GaussianClasses(d, means=MU4[None], mu_null=MU4, sigma=RHO)
    x0 = torch.zeros(n, 1, 2, 2, dtype=F64)
    x0.view(n, 4)[:, :2] = KEEP
    mask = torch.tensor([[0, 0], [1, 1]])
    out = inpaint(oracle, d, x0, mask, method=method, steps=50, clip_denoised=False,
                  generator=torch.Generator().manual_seed(4), y=0, **kw)
    return out.reshape(n, 4), x0.reshape(n, 4)


def mean_error_in_se(x, mean, cov):
    return ((x.mean(0) - mean).abs() / (torch.diagonal(cov) / x.shape[0]).sqrt()).max()


def gaussian_kl(m1, c1, m0, c0):
    """KL(N(m1, c1) || N(m0, c0))."""
    c0i = torch.linalg.inv(c0)
    d = m0 - m1
    return 0.5 * (torch.trace(c0i @ c1) + d @ c0i @ d - len(m0) + torch.logdet(c0)
                  - torch.logdet(c1))


def kl_of_generated(samples, mean, cov):
    """KL from the Gaussian with the generated pixels' sample moments to N(mean, cov)."""
    return gaussian_kl(samples[:, 2:].mean(0), torch.cov(samples[:, 2:].T), mean, cov)


INPAINT_N = 4000  # draws per closed-form inpainting test


def inpainted_against_replace(method, **kw):
    """``method`` and plain replacement on the same task, INPAINT_N draws each: both keep the
    kept pixels bit for bit, and ``method``'s generated pixels pass :func:`law_ok` against the
    true conditional. Returns (method's draws, replace's draws, their KLs to it)."""
    mean, cov = conditional_gaussian()
    got, x0 = run_inpaint(method, INPAINT_N, **kw)
    plain, _ = run_inpaint("replace", INPAINT_N)
    for out in (got, plain):
        assert torch.equal(out[:, :2], x0[:, :2])  # bit-identical kept pixels
    law_ok(got[:, 2:], mean, cov, method)
    return got, plain, kl_of_generated(got, mean, cov), kl_of_generated(plain, mean, cov)


def test_inpainting_keeps_pixels_and_repaint_hits_the_conditional_gaussian():
    """Measured (n = 4000, 50 kept steps of T = 1000, exact denoiser; KL of the fitted
    Gaussian of the generated pixels to the true conditional, and the worst mean error in
    standard errors): replace 0.098 / 20 SE (the generated pixels are drawn nearly from their
    marginal: at high noise x_t says little about the kept pixels, and nothing corrects the
    early steps); RePaint jump 1 resample 5: 0.026 / 5 SE; jump 1 resample 10: 0.059 / 0.9 SE
    (under-dispersed); jump 2 resample 10: 0.003 / 0.4 SE; jump 5 resample 10: 2.5 SE, variances
    0.176 / 0.272 against 0.142 / 0.256 (over-dispersed); jump 10 resample 10: 6.3 SE. The test pins jump 2 (the default) within 5
    SE in mean and covariance, and replace's gap."""
    _, plain, kl_repaint, kl_replace = inpainted_against_replace("repaint", jump=2,
                                                                  resample=10)
    mean, cov = conditional_gaussian()
    assert mean_error_in_se(plain[:, 2:], mean, cov) > 2 * Z  # replacement alone is biased
    assert kl_repaint < kl_replace / 5, (kl_repaint, kl_replace)


def test_reconstruction_guidance_moves_generated_pixels_to_the_conditional_gaussian():
    """Reconstruction guidance (Ho et al. 2022, eq. 7) on one pass (resample 1), same oracle
    and n as above. Measured KL / worst mean error: w_r 0 (= replace) 0.098 / 20 SE; w_r 0.5
    0.053 / 15 SE; 1: 0.024 / 11 SE; 2: 0.003 / 2.0 SE; 4: 0.042 / 14 SE (now too narrow:
    the approximation's variance (1 - alpha_bar) / alpha_bar is too small at low noise); 8:
    0.197 / 33 SE. The test pins w_r = 2 within 5 SE in mean and covariance at 50 network
    calls (RePaint needs 500 for the same KL), and w_r = 0 equal to replace bit for bit."""
    _, plain, kl_rec, kl_replace = inpainted_against_replace("reconstruction",
                                                              recon_weight=2.0, resample=1)
    assert kl_rec < kl_replace / 5, (kl_rec, kl_replace)
    off, _ = run_inpaint("reconstruction", INPAINT_N, recon_weight=0.0, resample=1)
    assert torch.equal(off, plain)


def test_reconstruction_weight_must_be_finite_and_non_negative():
    x = torch.zeros(1, 1, 2, 2)
    for w in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="weight") as e:
            inpaint(lambda x, t: torch.zeros_like(x), diffusion(T=10), x, torch.ones(2, 2),
                    method="reconstruction", recon_weight=w, steps=2)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["replace", "repaint"])
def test_kept_pixels_are_noised_to_each_state_level_on_the_way(method):
    """Between steps, the kept pixels of x at state s are a draw of q(x_s | x_0) (DDPM eq. 4):
    mean sqrt(alpha_bar_s) x_0, variance 1 - alpha_bar_s. With 4 kept steps of T = 1000 the
    levels of neighbouring states differ by far more than the sampling error, so joining them
    at the previous state's level is caught. n = 4000 draws; mean within Z standard errors,
    variance within Z standard errors of a Gaussian variance (var * sqrt(2 / n))."""
    n, T, steps = 4000, 1000, 4
    diff = GaussianDiffusion(make_betas("linear", T))
    x0 = torch.full((n, 1, 1, 2), 0.5, dtype=torch.float64)
    mask = torch.tensor([[[[True, False]]]])  # generate pixel 0, keep pixel 1
    kd = diff.respace(space_timesteps(T, steps))
    ab = kd.alpha_bar.tolist()
    states = repaint_schedule(kd.num_timesteps, 2, 3 if method == "repaint" else 1)
    seen = []

    def record(i, total, x):
        s = states[i + 1]
        if s >= 0 and s < states[i]:  # after a reverse step (kept pixels re-joined)
            seen.append((s, x[:, 0, 0, 1].clone()))

    inpaint(lambda x, t: torch.zeros_like(x), diff, x0, mask, method=method, steps=steps,
            jump=2, resample=3, generator=torch.Generator().manual_seed(0), callback=record)
    assert {s for s, _ in seen} == set(range(kd.num_timesteps - 1))
    for s, kept in seen:
        mean, var = math.sqrt(ab[s]) * 0.5, 1.0 - ab[s]
        assert abs(kept.mean().item() - mean) < Z * math.sqrt(var / n), (s, kept.mean(), mean)
        assert abs(kept.var().item() - var) < Z * var * math.sqrt(2 / n), (s, kept.var(), var)

def test_repaint_schedule_structure():
    assert repaint_schedule(4, jump=10, resample=1) == [3, 2, 1, 0, -1]
    s = repaint_schedule(6, jump=2, resample=3)
    assert s[:8] == [5, 4, 3, 5, 4, 3, 5, 4]
    downs = sum(1 for a, b in zip(s, s[1:], strict=False) if b == a - 1)
    assert downs == 6 * 3 and s[-1] == -1
    ups = [(a, b) for a, b in zip(s, s[1:], strict=False) if b > a]
    assert all(b - a == 2 for a, b in ups) and len(ups) == 3 * 2


def test_bad_masks_give_one_line_errors():
    x = torch.zeros(2, 1, 4, 4)
    cases = ((torch.ones(3, 3), "does not fit"), (torch.ones(3, 1, 4, 4), "does not fit"),
             (torch.full((4, 4), 0.5), "black and white"), (torch.zeros(4, 4), "all black"),
             (torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)]), "mask 1 is all black"))
    for mask, words in cases:
        with pytest.raises(ConfigError, match=words) as e:
            check_mask(mask, x)
        assert "\n" not in str(e.value)
    assert check_mask(torch.ones(4, 4), x).shape == (1, 1, 4, 4)


def test_inpaint_is_seeded_per_sample():
    d = diffusion(T=50)
    net = random_net("tiny").eval()
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    mask = torch.zeros(8, 8)
    mask[4:] = 1
    a = inpaint(net, d, x0, mask, steps=5, jump=2, resample=2, seeds=[1, 2, 3])
    b = inpaint(net, d, x0[1:], mask, steps=5, jump=2, resample=2, seeds=[2, 3])
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)
    assert torch.equal(a[:, :, :4], x0[:, :, :4])


# ---- SDEdit and interpolation ------------------------------------------------------------------

def test_sdedit_noises_to_t0_then_denoises_to_the_data_law():
    """From a guide far from the data, SDEdit at strength 1 forgets it (samples the data law);
    at small strength it stays near the guide: the exact ODE from q(x_t0 | guide) keeps the mean
    a_t0 guide + (1 - a_t0 ...) in between; checked by ordering and by the law at strength 1."""
    d = diffusion(T=1000, variance="fixed_large")
    oracle = GaussianClasses(d)
    n = 3000
    guide = torch.full((n, 2), 4.0, dtype=F64)
    full = sdedit(oracle, d, guide, 1.0, method="ancestral", clip_denoised=False, y=0,
                  generator=torch.Generator().manual_seed(7))
    law_ok(full, MEANS[0], SIGMA, "strength 1")
    dist = []
    for s in (0.1, 0.3, 0.6):
        out = sdedit(oracle, d, guide, s, method="ddim", steps=20, clip_denoised=False, y=0,
                     generator=torch.Generator().manual_seed(8))
        dist.append(float((out.mean(0) - guide[0]).norm()))
    assert dist[0] < dist[1] < dist[2]


def test_sdedit_seeds_and_bad_strength():
    d = diffusion(T=50)
    net = random_net("tiny").eval()
    g = torch.rand(3, 1, 8, 8) * 2 - 1
    a = sdedit(net, d, g, 0.5, method="ancestral", steps=10, seeds=[4, 5, 6])
    b = sdedit(net, d, g[2:], 0.5, method="ancestral", steps=10, seeds=[6])
    torch.testing.assert_close(a[2:], b, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="strength"):
        sdedit(net, d, g, 1.5)


def test_slerp_ends_and_norm():
    a, b = torch.randn(1, 64, dtype=F64), torch.randn(1, 64, dtype=F64)
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    mid = slerp(a, b / b.norm() * a.norm(), 0.5)
    assert math.isclose(float(mid.norm()), float(a.norm()), rel_tol=1e-9)


def test_interpolation_ends_reconstruct_the_inputs():
    d = diffusion(T=1000)
    oracle = GaussianClasses(d, means=MU4[None], mu_null=MU4, sigma=RHO)
    xa = torch.tensor([[[[0.5, -0.2], [0.1, 0.4]]]], dtype=F64)
    xb = torch.tensor([[[[-0.6, 0.0], [0.3, -0.5]]]], dtype=F64)
    frames = interpolate(oracle, d, xa, xb, num=5, steps=50, clip_denoised=False, y=0)
    assert frames.shape == (5, 1, 2, 2)
    # The ends are DDIM's reconstructions of the inputs (their error is DDIM's, O(1 / steps),
    # tested in test_sampling): equal to ddim_reconstruct's to rounding.
    _, rec = ddim_reconstruct(oracle, d, torch.cat([xa, xb]), 50, clip_denoised=False, y=0)
    torch.testing.assert_close(frames[[0, -1]], rec, atol=1e-10, rtol=0)
    assert (rec - torch.cat([xa, xb])).abs().max() < 0.1
    # The middle frames lie between: each frame's distance to A grows, to B shrinks.
    to_a = (frames - xa).flatten(1).norm(dim=1)
    to_b = (frames - xb).flatten(1).norm(dim=1)
    assert (to_a.diff() > 0).all() and (to_b.diff() < 0).all()
