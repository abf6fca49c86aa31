"""From the notes to the code: DDPM (Ho, Jain & Abbeel 2020) step by step, checked in numbers.

The project's study notes derive the forward process, its closed form, the posterior and the
variational bound, and stop where L_{t-1} becomes a KL between two Gaussians. This script
follows them section by section on the 8x8 digits (17 grey levels), prints every claim next to
a measurement, draws a figure per section into --out, and carries on where the notes stop: the
eps-parameterisation, the weighted noise-prediction loss, the "simple" loss and ancestral
sampling. docs/walkthrough.md (English) and docs/walkthrough.zh.md (Chinese) are the prose.

Every check prints PASS or FAIL. A statistical check compares an estimate with its closed form
in units of its standard error; the limit is the two-sided normal quantile at a false-alarm
rate of 1e-4 for the whole check, Bonferroni-split over the m comparisons it makes (3.9 SE for
one comparison, 5.3 SE for a thousand). An identity that holds exactly in arithmetic is checked
in float64 to a relative 1e-9. The script exits with status 1 if any check fails.

Index convention: ddpmkit stores the paper's step t at tensor index t - 1; everything printed
uses the paper's t = 1..T.

    python examples/walkthrough.py --out walkthrough/            # ~8 min of CPU time
    python examples/walkthrough.py --quick --out /tmp/wt          # a tiny setting (the tests)
    python examples/walkthrough.py --checkpoint runs/digits --out walkthrough/  # ddpmkit.load
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import ddpmkit  # noqa: E402
from ddpmkit.runtime import tune_allocator  # noqa: E402

LN2 = math.log(2.0)
ALPHA = 1e-4      # false-alarm rate of one statistical check (all its comparisons together)
EXACT_RTOL = 1e-9  # identities that hold exactly, evaluated in float64
LEVELS = 17       # grey levels of the digits: 0..16 -> -1 + 2k/16


@dataclass(frozen=True)
class Settings:
    out: Path
    seed: int = 0
    checkpoint: str | None = None
    net: str = "digits"            # ddpmkit.build_unet preset for the model trained here
    channels: int = 0              # override the preset's base channels (0: keep)
    timesteps: int = 1000          # T of the model trained here (linear schedule, as the notes)
    train_steps: int = 800
    batch_size: int = 128
    lr: float = 1e-3
    num_eval: int = 32             # held-out digits in the bound and the eps-loss identity
    forward_draws: int = 2000      # draws of x_t per digit in section 2
    posterior_draws: int = 20000   # importance-sampling draws per pixel in section 3
    num_samples: int = 8           # digits in the sampling strip
    threads: int = 0               # torch CPU threads (0: torch's default)
    figures: list[str] = field(default_factory=list)


QUICK = dict(net="tiny", channels=16, timesteps=40, train_steps=30, batch_size=32,
             num_eval=4, forward_draws=300, posterior_draws=3000, num_samples=4)


# ---- checks ------------------------------------------------------------------------------

class Checks:
    """Collects PASS/FAIL lines; ``failed`` decides the exit status."""

    def __init__(self) -> None:
        self.lines: list[tuple[bool, str]] = []

    @staticmethod
    def z_limit(m: int) -> float:
        """Two-sided normal quantile at false-alarm rate ALPHA split over m comparisons."""
        return NormalDist().inv_cdf(1.0 - ALPHA / (2 * max(1, m)))

    def record(self, name: str, value: float, limit: float, what: str) -> bool:
        ok = bool(math.isfinite(value) and value <= limit)
        line = f"{'PASS' if ok else 'FAIL'}  {name}: {what} = {value:.3g} (limit {limit:.3g})"
        print("  " + line)
        self.lines.append((ok, line))
        return ok

    def z(self, name: str, z: torch.Tensor | np.ndarray) -> bool:
        """All |z| scores of one check within the Bonferroni limit for their number."""
        z = np.abs(np.asarray(z, dtype=np.float64)).ravel()
        return self.record(name, float(z.max()), self.z_limit(z.size),
                           f"max |estimate - closed form| / SE over {z.size} comparisons")

    @staticmethod
    def rel_err(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None):
        """max |got - want| / scale (default |want|), in float64."""
        got, want = got.double(), want.double()
        scale = want.abs() if scale is None else scale.double()
        return ((got - want).abs() / scale.clamp_min(1e-300)).max().item()

    def exact(self, name: str, got: torch.Tensor, want: torch.Tensor,
              scale: torch.Tensor | None = None) -> bool:
        """An identity: |got - want| <= EXACT_RTOL * scale everywhere, in float64."""
        return self.record(name, self.rel_err(got, want, scale), EXACT_RTOL,
                           f"max relative error over {want.numel()}")

    @property
    def failed(self) -> list[str]:
        return [line for ok, line in self.lines if not ok]


_START = time.perf_counter()


def heading(text: str) -> None:
    elapsed = f"[{time.perf_counter() - _START:.0f} s]"
    print(f"\n{'=' * 4} {text} {'=' * max(4, 84 - len(text))} {elapsed}")


def save(fig, s: Settings, name: str) -> None:
    path = s.out / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    s.figures.append(name)
    print(f"  figure: {path}")


def show_tiles(ax, grid: torch.Tensor, col_labels: list[str], row_labels: list[str]) -> None:
    """One image of 8x8 tiles: grid [R, C, 1, 8, 8] in [-1, 1] (NaN tiles stay blank), one
    pixel of padding; one imshow instead of R x C axes keeps the figures quick to draw."""
    R, C = grid.shape[:2]
    canvas = np.full((R * 9 + 1, C * 9 + 1), np.nan)
    for r in range(R):
        for c in range(C):
            canvas[1 + 9 * r:9 * (r + 1), 1 + 9 * c:9 * (c + 1)] = grid[r, c].reshape(8, 8)
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
    ax.imshow(canvas, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks(4.5 + 9 * np.arange(C), col_labels, fontsize=7)
    ax.set_yticks(4.5 + 9 * np.arange(R), row_labels, fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits on ddpmkit's grid and split: values 0..16 -> v/8 - 1 in
    [-1, 1]; the first 1500 train, the last 297 held out. float32 [N, 1, 8, 8]."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    x = torch.from_numpy(load_digits().images / 8.0 - 1.0).float()[:, None]
    return x[:1500], x[1500:]


def gaussian_logpdf(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


# ---- 1. the linear schedule ----------------------------------------------------------------

def section_schedule(s: Settings, checks: Checks) -> ddpmkit.GaussianDiffusion:
    heading("1. Forward diffusion: the linear schedule (notes sec. 1; DDPM eq. 2, sec. 4)")
    T = 1000
    betas = ddpmkit.make_betas("linear", T)
    diff = ddpmkit.GaussianDiffusion(betas)
    ab = diff.alpha_bar
    print(f"  T = {T}, beta_1 = {betas[0].item():.1e}, beta_T = {betas[-1].item():.3g}; "
          f"alpha_t = 1 - beta_t, alpha_bar_t = prod_(i=1..t) alpha_i")
    for t in (1, 10, 100, 250, 500, 750, 1000):
        print(f"    t = {t:4d}  beta_t = {betas[t - 1].item():.5f}  alpha_bar_t = "
              f"{ab[t - 1].item():.6g}  sqrt(alpha_bar_t) = {ab[t - 1].sqrt().item():.4f}")
    # The notes' product written out in numpy, independently of ddpmkit.
    by_hand = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
    checks.exact("alpha_bar_t = prod_(i=1..t) (1 - beta_i), all t", ab,
                 torch.from_numpy(by_hand))

    # KL(q(x_T | x_0) || N(0, I)) per dimension, in closed form (both Gaussian, per pixel):
    # 0.5 (alpha_bar_T x0^2 + (1 - alpha_bar_T) - 1 - log(1 - alpha_bar_T)).
    abT = ab[-1]
    x0 = torch.linspace(-1, 1, LEVELS, dtype=torch.float64)
    kl = 0.5 * (abT * x0**2 - abT - torch.log1p(-abT))
    print(f"  alpha_bar_T = {abT.item():.4g}: q(x_T | x_0) = N({abT.sqrt().item():.4f} x_0, "
          f"{1 - abT.item():.6f} I)")
    print(f"  KL(q(x_T | x_0) || N(0, I)) per dimension: {kl.min().item():.3g} nats at x_0 = 0, "
          f"{kl.max().item():.3g} nats = {kl.max().item() / LN2:.3g} bits at x_0 = +-1")
    library = diff.prior_bpd(x0.reshape(LEVELS, 1, 1, 1)) * LN2
    # The KL is a sum of O(1) terms that nearly cancel, so its rounding error is absolute:
    # compare on the scale of those terms (1), not of the tiny result.
    checks.exact("ddpmkit's L_T (prior_bpd) = the closed-form KL, each of the 17 levels",
                 library, kl, scale=torch.ones_like(kl))

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    t = np.arange(1, T + 1)
    axes[0].plot(t, betas.numpy())
    axes[0].set(xlabel="t", ylabel=r"$\beta_t$", title=r"linear $\beta_t$: $10^{-4}$ to 0.02")
    axes[1].plot(t, ab.numpy(), label=r"$\bar\alpha_t$")
    axes[1].plot(t, ab.sqrt().numpy(), "--", label=r"$\sqrt{\bar\alpha_t}$ (mean factor)")
    axes[1].plot(t, (1 - ab).numpy(), ":", label=r"$1-\bar\alpha_t$ (variance)")
    axes[1].set(xlabel="t", title=rf"$\bar\alpha_T$ = {abT.item():.2g}")
    axes[1].legend(fontsize=8)
    save(fig, s, "01_schedule.png")
    return diff


# ---- 2. reparameterised steps vs the closed form ------------------------------------------

def moments_z(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
    """z-scores of the sample mean and variance over dim 0 (M Gaussian draws) against the
    closed form: SE(mean) = sqrt(var / M), SE(variance) = var sqrt(2 / (M - 1))."""
    M = x.shape[0]
    m, v = x.mean(0), x.var(0)
    return m, v, (m - mean) / (var / M).sqrt(), (v - var) / (var * math.sqrt(2 / (M - 1)))


def section_forward(s: Settings, checks: Checks, diff, x_test: torch.Tensor) -> None:
    heading("2. Reparameterisation: t single steps vs the closed form q(x_t | x_0) "
            "(notes sec. 1; DDPM eq. 2, 4)")
    K, M = 4, s.forward_draws
    x0 = x_test[:K].double()                                   # [K, 1, 8, 8]
    ts = (1, 10, 50, 100, 250, 500, 1000)
    g = torch.Generator().manual_seed(s.seed)
    x = x0.repeat(M, 1, 1, 1)                                  # [M*K, 1, 8, 8], draw-major
    pix = (0, 0, 2, 4)                                         # digit 0, row 2, column 4
    print(f"  {K} held-out digits x {M} draws each; pixel (row 2, col 4) of digit 0 has "
          f"x_0 = {x0[pix].item():+.3f}")
    print("     t | mean: iterated   closed-form draws  formula | variance: iterated  "
          "closed-form draws  formula")
    z_iter, z_once, rows = [], [], []
    for i in range(ts[-1]):
        t = torch.full((M * K,), i)
        x = diff.q_step_sample(x, t, torch.randn(x.shape, generator=g, dtype=x.dtype))
        if i + 1 not in ts:
            continue
        once = diff.q_sample(x0.repeat(M, 1, 1, 1), t,
                             torch.randn(x.shape, generator=g, dtype=x.dtype))
        ab = diff.alpha_bar[i]                                 # the notes' closed form:
        mean, var = ab.sqrt() * x0, (1 - ab).expand_as(x0)     # N(sqrt(ab) x_0, (1 - ab) I)
        mi, vi, zm, zv = moments_z(x.view(M, K, 1, 8, 8), mean, var)
        mo, vo, zm2, zv2 = moments_z(once.view(M, K, 1, 8, 8), mean, var)
        z_iter += [zm, zv]
        z_once += [zm2, zv2]
        se_m, se_v = (var[pix] / M).sqrt().item(), var[pix].item() * math.sqrt(2 / (M - 1))
        print(f"  {i + 1:4d} | {mi[pix]:+.4f}+-{se_m:.4f}  {mo[pix]:+.4f}+-{se_m:.4f}  "
              f"{mean[pix]:+.4f} | {vi[pix]:.3e}+-{se_v:.0e}  {vo[pix]:.3e}+-{se_v:.0e}  "
              f"{var[pix]:.3e}")
        rows.append((i + 1, x.view(M, K, 1, 8, 8)[0, 0], once.view(M, K, 1, 8, 8)[0, 0]))
    checks.z("t single steps (eq. 2) have the moments of q(x_t | x_0) (eq. 4)",
             torch.stack(z_iter))
    checks.z("one-shot draws sqrt(ab) x_0 + sqrt(1 - ab) eps have them too",
             torch.stack(z_once))

    grid = torch.stack([torch.stack([x0[0]] + [r[k] for r in rows]) for k in (1, 2)])
    fig, ax = plt.subplots(figsize=(0.8 * (len(rows) + 1) + 1.5, 2.2))
    show_tiles(ax, grid.float(), ["$x_0$"] + [f"t={r[0]}" for r in rows],
               ["t single steps (eq. 2)", "closed form (eq. 4)"])
    save(fig, s, "02_forward.png")


# ---- 3. the posterior by Bayes' rule -------------------------------------------------------

def posterior_identity(s: Settings, checks: Checks, diff, x0: torch.Tensor) -> None:
    """q(x_t | x_{t-1}) q(x_{t-1} | x_0) / q(x_t | x_0) = N(x_{t-1}; mu_tilde, beta_tilde),
    pointwise in log-densities, at t = 2..T and the pixel values x0 [P]."""
    T, P = diff.num_timesteps, x0.numel()
    g = torch.Generator().manual_seed(s.seed + 1)
    i = torch.arange(1, T).repeat_interleave(P)                 # index t - 1, t = 2..T
    x0 = x0.double().repeat(T - 1)
    ab, abp = diff.alpha_bar[i], diff.alpha_bar_prev[i]
    alpha, beta = diff.alphas[i], diff.betas[i]
    x_prev = abp.sqrt() * x0 + (1 - abp).sqrt() * torch.randn(x0.shape, generator=g,
                                                                dtype=x0.dtype)
    x_t = alpha.sqrt() * x_prev + beta.sqrt() * torch.randn(x0.shape, generator=g,
                                                            dtype=x0.dtype)
    parts = (gaussian_logpdf(x_t, alpha.sqrt() * x_prev, beta),      # q(x_t | x_{t-1})
             gaussian_logpdf(x_prev, abp.sqrt() * x0, 1 - abp),      # q(x_{t-1} | x_0)
             -gaussian_logpdf(x_t, ab.sqrt() * x0, 1 - ab))          # / q(x_t | x_0)
    mean, var, _ = diff.q_posterior(x0[:, None], x_t[:, None], i)
    closed = gaussian_logpdf(x_prev, mean[:, 0], var[:, 0])
    checks.exact("Bayes' rule (three Gaussians) = ddpmkit's q_posterior density, t = 2..T",
                 sum(parts), closed, scale=sum(p.abs() for p in parts))


def importance_posterior(diff, x0: torch.Tensor, t: int, M: int, g: torch.Generator):
    """Monte-Carlo Bayes' rule at step t for pixels x0 [P]: draw x_t ~ q(x_t | x_0), then M
    proposals x_{t-1} ~ q(x_{t-1} | x_0) (the prior), weighted by the likelihood
    q(x_t | x_{t-1}). The weighted moments estimate the posterior's; the mean weight
    estimates the evidence q(x_t | x_0). Returns a dict of [P] tensors (estimates, their
    delta-method standard errors, closed forms) and the draws for the figure."""
    i = t - 1
    ab, abp = diff.alpha_bar[i], diff.alpha_bar_prev[i]
    alpha, beta = diff.alphas[i], diff.betas[i]
    x0 = x0.double()
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    xp = abp.sqrt() * x0 + (1 - abp).sqrt() * torch.randn((M, *x0.shape), generator=g,
                                                          dtype=x0.dtype)
    w = gaussian_logpdf(x_t, alpha.sqrt() * xp, beta).exp()               # [M, P]
    sw = w.sum(0)
    mean = (w * xp).sum(0) / sw
    dev2 = (xp - mean) ** 2
    var = (w * dev2).sum(0) / sw
    idx = torch.full(x0.shape, i)
    closed_mean, closed_var, _ = diff.q_posterior(x0, x_t, idx)
    return dict(
        x0=x0, x_t=x_t, xp=xp, w=w, ess=sw**2 / (w**2).sum(0),
        mean=mean, mean_se=((w**2 * dev2).sum(0)).sqrt() / sw, closed_mean=closed_mean,
        var=var, var_se=((w**2 * (dev2 - var) ** 2).sum(0)).sqrt() / sw, closed_var=closed_var,
        evidence=w.mean(0), evidence_se=w.std(0) / math.sqrt(M),
        closed_evidence=gaussian_logpdf(x_t, ab.sqrt() * x0, 1 - ab).exp())


def section_posterior(s: Settings, checks: Checks, diff, x_test: torch.Tensor) -> None:
    heading("3. Bayes' rule: the posterior q(x_{t-1} | x_t, x_0) (notes sec. 2; DDPM eq. 6-7)")
    x0 = x_test[0].reshape(-1)                                 # the 64 pixels of one digit
    posterior_identity(s, checks, diff, x0)
    g = torch.Generator().manual_seed(s.seed + 2)
    p = 20                                                     # row 2, column 4
    print(f"  Monte-Carlo: {s.posterior_draws} draws of x_(t-1) ~ q(x_(t-1) | x_0) per pixel, "
          f"weighted by q(x_t | x_(t-1)); pixel (row 2, col 4), x_0 = {x0[p].item():+.3f}")
    print("     t |   x_t   | mean: Monte-Carlo      closed form | variance: Monte-Carlo"
          "   closed form | evidence q(x_t|x_0): MC   closed form |  ESS")
    z, shown = [], {}
    for t in (2, 10, 100, 500, 1000):
        r = importance_posterior(diff, x0, t, s.posterior_draws, g)
        z += [(r[k] - r["closed_" + k]) / r[k + "_se"] for k in ("mean", "var", "evidence")]
        print(f"  {t:4d} | {r['x_t'][p]:+.4f} | {r['mean'][p]:+.5f}+-{r['mean_se'][p]:.5f} "
              f"{r['closed_mean'][p]:+.5f} | {r['var'][p]:.3e}+-{r['var_se'][p]:.1e} "
              f"{r['closed_var'][p]:.3e} | {r['evidence'][p]:8.4f}+-{r['evidence_se'][p]:.4f}"
              f" {r['closed_evidence'][p]:8.4f} | {r['ess'][p]:5.0f}")
        shown[t] = r
    checks.z("Monte-Carlo posterior mean, variance and evidence = eq. 6-7 and eq. 4",
             torch.stack(z))
    plot_posterior(s, diff, shown, p)


def plot_posterior(s: Settings, diff, shown: dict, p: int) -> None:
    ts = (10, 100, 1000)
    fig, axes = plt.subplots(1, len(ts), figsize=(4 * len(ts), 3.2))
    for ax, t in zip(axes, ts, strict=True):
        r, i = shown[t], t - 1
        mean, var = r["closed_mean"][p].item(), r["closed_var"][p].item()
        half = 6 * math.sqrt(var)
        grid = torch.linspace(mean - half, mean + half, 400, dtype=torch.float64)
        xp, w = r["xp"][:, p], r["w"][:, p]
        inside = (xp > grid[0]) & (xp < grid[-1])
        ax.hist(xp[inside].numpy(), bins=40, weights=w[inside].numpy(), density=True,
                alpha=0.4, label="prior draws, weighted by likelihood")
        ax.plot(grid, gaussian_logpdf(grid, torch.tensor(mean), torch.tensor(var)).exp(),
                label=r"closed form $N(\tilde\mu_t, \tilde\beta_t)$")
        abp, alpha, beta = diff.alpha_bar_prev[i], diff.alphas[i], diff.betas[i]
        prior = gaussian_logpdf(grid, abp.sqrt() * r["x0"][p], 1 - abp).exp()
        like = gaussian_logpdf(r["x_t"][p], alpha.sqrt() * grid, beta).exp()
        ax.plot(grid, prior / prior.max() * ax.get_ylim()[1] * 0.9, "--",
                label=r"prior $q(x_{t-1}|x_0)$ (scaled)")
        ax.plot(grid, like / like.max() * ax.get_ylim()[1] * 0.9, ":",
                label=r"likelihood $q(x_t|x_{t-1})$ (scaled)")
        ax.set(title=f"t = {t}", xlabel=r"$x_{t-1}$")
    axes[0].legend(fontsize=7, loc="upper left")
    save(fig, s, "03_posterior.png")


# ---- a trained model: DDPM Algorithm 1, or a run from disk --------------------------------

def net_device(model) -> torch.device:
    params = getattr(model, "parameters", None)
    return next(params()).device if callable(params) else torch.device("cpu")


def train_model(s: Settings, x_train: torch.Tensor):
    """DDPM Algorithm 1 with ddpmkit's public pieces: x_0 from the data, t ~ Uniform, eps ~
    N(0, I), a gradient step on ||eps - eps_theta(sqrt(ab) x_0 + sqrt(1 - ab) eps, t)||^2
    (eq. 14, ``loss="simple"``). Returns the EMA of the weights (eval mode) and the diffusion."""
    betas = ddpmkit.make_betas("linear", s.timesteps)
    diff = ddpmkit.GaussianDiffusion(betas, prediction="eps", variance="fixed_small",
                                     loss="simple")
    torch.manual_seed(s.seed)
    net = ddpmkit.build_unet(s.net, **({"channels": s.channels} if s.channels else {}))
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr)
    g = torch.Generator().manual_seed(s.seed)
    warmup = max(1, s.train_steps // 10)
    print(f"  U-Net preset {s.net!r}"
          f"{f' with {s.channels} base channels' if s.channels else ''}: "
          f"{sum(p.numel() for p in net.parameters()):,} parameters; linear schedule, "
          f"T = {s.timesteps}, eps-prediction, sigma_t^2 = beta_tilde_t (fixed_small)")
    bar = tqdm(range(s.train_steps), desc="training", unit="step", dynamic_ncols=True)
    for step in bar:
        x0 = x_train[torch.randint(0, len(x_train), (s.batch_size,), generator=g)]
        t = torch.randint(0, s.timesteps, (s.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = diff.training_losses(net, x0, t, eps)["loss"].mean()
        for group in opt.param_groups:          # linear warm-up, then constant
            group["lr"] = s.lr * min(1.0, (step + 1) / warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))   # EMA, short warm-up
        with torch.no_grad():
            for e, p in zip(ema.state_dict().values(), net.state_dict().values(), strict=True):
                if e.is_floating_point():
                    e.lerp_(p, 1 - decay)
                else:
                    e.copy_(p)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    print(f"  last training loss (one batch of {s.batch_size}): {loss.item():.4f}")
    return ema, diff


def load_run(s: Settings):
    """A trained digits run (1 x 8 x 8, 17 levels) from disk, through ``ddpmkit.load``."""
    run = ddpmkit.load(s.checkpoint)
    if tuple(run.data_shape) != (1, 8, 8):
        raise ddpmkit.DdpmkitError(f"--checkpoint {s.checkpoint}: the walkthrough needs a "
                                   f"digits model (1, 8, 8), this one is {run.data_shape}")
    return run


def get_model(s: Settings, x_train: torch.Tensor, run=None):
    if run is not None:
        heading(f"A trained digits model, loaded from {s.checkpoint}")
        d = run.diffusion
        print(f"  step {run.step}: T = {d.num_timesteps}, prediction {d.prediction!r}, variance "
              f"{d.variance!r}; the bound below assumes the digits' 17 levels")
        return run.model, d
    heading(f"A trained digits model: DDPM Algorithm 1, {s.train_steps} steps of "
            f"{s.batch_size} (eq. 14)")
    return train_model(s, x_train)


# ---- 4. the variational bound --------------------------------------------------------------

def level_entropies(x_train: torch.Tensor, x_eval: torch.Tensor) -> dict[str, float]:
    """Reference figures in bits per pixel: log2 17, the entropy of the 17-level histogram of
    the training digits, and the cross-entropy on x_eval of 64 per-position histograms fitted
    on the training digits (add-one smoothing): a model of independent pixels."""
    k_train = ((x_train + 1) * 8).round().long().reshape(len(x_train), -1)   # 0..16
    k_eval = ((x_eval + 1) * 8).round().long().reshape(len(x_eval), -1)
    p = torch.bincount(k_train.flatten(), minlength=LEVELS).double() / k_train.numel()
    counts = torch.stack([torch.bincount(col, minlength=LEVELS) for col in k_train.T]).double()
    per_pos = (counts + 1) / (counts.sum(1, keepdim=True) + LEVELS)           # [64, 17]
    ce = -torch.log2(per_pos.gather(1, k_eval.T)).mean()
    return {"uniform": math.log2(LEVELS),
            "marginal": float(-(p[p > 0] * p[p > 0].log2()).sum()),
            "per_position": float(ce)}


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    return v.mean().item(), (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else math.nan


def section_bound(s: Settings, checks: Checks, model, diff, x_train, x_test) -> dict:
    heading("4. The variational bound on the trained model (notes sec. 2; DDPM eq. 5, 13)")
    x, T = x_test[:s.num_eval], diff.num_timesteps
    dev = net_device(model)
    print(f"  -log p(x_0) <= L_T + sum_(t=2..T) L_(t-1) + L_0, every one of the {T} terms "
          f"evaluated (none sampled), {len(x)} held-out digits, no clipping of x_0 (DDPM eq. 11)")
    with tqdm(total=len(x) * T, desc="bound", unit="term", unit_scale=True,
              dynamic_ncols=True) as bar:
        bpd = diff.bits_per_dim(model, x.to(dev), levels=LEVELS, clip_denoised=False,
                                seed=s.seed, batch_size=500, progress=bar.update)
    terms, prior, total = bpd["terms"], bpd["prior"], bpd["total"]   # bits/dim, [N, T]
    parts = {"L_0 (decoder, eq. 13)": terms[:, 0],
             "sum_(t=2..T) L_(t-1)": terms[:, 1:].sum(1),
             "L_T (prior)": prior, "total": total}
    for name, v in parts.items():
        m, se = mean_se(v)
        print(f"    {name:24s} {m:10.5g} +- {se:.2g} bits/dim")
    abT = diff.alpha_bar[-1]
    kl = (0.5 * (abT * x.double() ** 2 - abT - torch.log1p(-abT))).mean((1, 2, 3)) / LN2
    checks.exact("bits_per_dim's L_T = the closed-form KL of section 1", prior, kl,
                 scale=torch.ones_like(kl))           # absolute, as in section 1
    ref = level_entropies(x_train, x)
    print(f"  for scale: log2 17 = {ref['uniform']:.3f} bits (each pixel uniform over the 17 "
          f"levels); entropy of the\n  17-level histogram of the training digits = "
          f"{ref['marginal']:.3f} bits; 64 per-position histograms: {ref['per_position']:.3f}"
          f" bits/dim\n  on the same {len(x)} digits (independent pixels, no diffusion at all)")
    plot_bound(s, terms, prior, ref)
    return {"terms": terms, "prior": prior, "total": total, "ref": ref}


def plot_bound(s: Settings, terms: torch.Tensor, prior: torch.Tensor, ref: dict) -> None:
    T = terms.shape[1]
    per_t = terms.mean(0).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    t = np.arange(1, T + 1)
    axes[0].semilogy(t[1:], per_t[1:], lw=1, label=r"$L_{t-1}$, t = 2..T")
    axes[0].semilogy([1], [per_t[0]], "o", label=rf"$L_0$ = {per_t[0]:.3g}")
    axes[0].semilogy([T], [prior.mean().item()], "s", label=rf"$L_T$ = {prior.mean():.2g}")
    axes[0].set(xlabel="t", ylabel="bits/dim", title="each term of the bound")
    axes[0].legend(fontsize=8)
    cum = per_t[0] + np.concatenate([[0.0], np.cumsum(per_t[1:])]) + prior.mean().item()
    axes[1].plot(t, cum, label=r"$L_0 + \sum_{s=2}^{t} L_{s-1} + L_T$")
    for key, style, label in (("uniform", ":", "log2 17 (uniform)"),
                              ("marginal", "--", "entropy of the 17-level histogram"),
                              ("per_position", "-.", "64 per-position histograms")):
        axes[1].axhline(ref[key], ls=style, color="gray")
        axes[1].text(T, ref[key], " " + label, fontsize=7, va="center")
    axes[1].set(xlabel="t", ylabel="bits/dim", xscale="log",
                title=f"running total: {cum[-1]:.3f} bits/dim at t = T")
    axes[1].legend(fontsize=8, loc="lower right")
    save(fig, s, "04_bound.png")


# ---- 5. where the notes stop: L_(t-1) -> eps -> the (simple) noise-prediction loss --------

def eps_loss_pass(s: Settings, model, diff, x: torch.Tensor) -> dict:
    """For each digit j and each t = 2..T, one draw eps ~ N(0, I), x_t = sqrt(ab) x_0 +
    sqrt(1 - ab) eps, and from the same network output: the bound's term L_(t-1) (nats/dim,
    ddpmkit's vb_terms_bpd), ||eps - eps_theta||^2 / D and the errors of eq. 10 and 11.
    The network runs in float32; the algebra in float64."""
    N, T, dev = len(x), diff.num_timesteps, net_device(model)
    x64 = x.double()
    g = torch.Generator().manual_seed(s.seed + 3)
    kl, err2 = torch.zeros(N, T - 1, dtype=torch.float64), torch.zeros(N, T - 1,
                                                                        dtype=torch.float64)
    eq10 = eq11 = 0.0
    bar = tqdm(total=N * (T - 1), desc="eps pass", unit="term", unit_scale=True,
               dynamic_ncols=True)
    for start in range(0, N * (T - 1), 500):
        flat = torch.arange(start, min(start + 500, N * (T - 1)))
        js, i = flat // (T - 1), flat % (T - 1) + 1            # index i = paper step t - 1 >= 1
        x0, eps = x64[js], torch.randn((len(flat), *x.shape[1:]), generator=g,
                                       dtype=torch.float64)
        x_t = diff.q_sample(x0, i, eps)
        with torch.inference_mode():
            out = model(x_t.float().to(dev), i.to(dev)).double().cpu()
        kl[js, i - 1] = diff.vb_terms_bpd(out, x0, x_t, i, levels=LEVELS,
                                          clip_denoised=False) * LN2
        p = diff.p_mean_variance(out, x_t, i, clip_denoised=False)
        err2[js, i - 1] = ((eps - p.pred_eps) ** 2).mean((1, 2, 3))
        c = (diff.betas[i] / (1 - diff.alpha_bar[i]).sqrt()).view(-1, 1, 1, 1)
        ra = diff.alphas[i].rsqrt().view(-1, 1, 1, 1)
        mu_tilde, _, _ = diff.q_posterior(x0, x_t, i)
        for_eq10 = ra * (x_t - c * eps)                        # DDPM eq. 10
        for_eq11 = ra * (x_t - c * p.pred_eps)                 # DDPM eq. 11
        eq10 = max(eq10, Checks.rel_err(mu_tilde, for_eq10, for_eq10.abs() + 1))
        eq11 = max(eq11, Checks.rel_err(p.mean, for_eq11, for_eq11.abs() + 1))
        bar.update(len(flat))
    bar.close()
    return {"kl": kl, "err2": err2, "variance": p.variance[0, 0, 0, 0].item(),
            "eq10": eq10, "eq11": eq11}


def loss_weights(diff, sigma2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM eq. 12's weight beta_t^2 / (2 sigma_t^2 alpha_t (1 - ab_t)) and eq. 8's constant
    C_t = KL(N(0, beta_tilde_t) || N(0, sigma_t^2)) per dimension, for t = 2..T."""
    beta, alpha, ab = diff.betas[1:], diff.alphas[1:], diff.alpha_bar[1:]
    bt = diff.posterior_variance[1:]
    w = beta**2 / (2 * sigma2 * alpha * (1 - ab))
    return w, 0.5 * (torch.log(sigma2 / bt) + bt / sigma2 - 1)


def section_eps_loss(s: Settings, checks: Checks, model, diff, x_test, bound: dict) -> None:
    heading("5. Where the notes stop: L_(t-1) as a KL of two Gaussians -> eps -> the simple "
            "loss (DDPM eq. 8-12, 14)")
    print("  L_(t-1) = KL(N(mu_tilde_t, beta_tilde_t I) || N(mu_theta, sigma_t^2 I))\n"
          "          = ||mu_tilde_t - mu_theta||^2 / (2 sigma_t^2) + C_t                   "
          "(eq. 8)\n"
          "  mu_tilde_t = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t)            "
          "(eq. 10)\n"
          "  mu_theta   = (x_t - beta_t / sqrt(1 - ab_t) eps_theta(x_t, t)) / sqrt(alpha_t)"
          "  (eq. 11)\n"
          "  => L_(t-1) = beta_t^2 / (2 sigma_t^2 alpha_t (1 - ab_t)) ||eps - eps_theta||^2"
          " + C_t (eq. 12)")
    x = x_test[:s.num_eval]
    r = eps_loss_pass(s, model, diff, x)
    what = f"max relative error over {r['kl'].numel()} x 64"
    checks.record("eq. 10: ddpmkit's posterior mean = (x_t - beta_t/sqrt(1-ab_t) eps)/sqrt(a_t)",
                  r["eq10"], EXACT_RTOL, what)
    checks.record("eq. 11: ddpmkit's mu_theta = (x_t - beta_t/sqrt(1-ab_t) eps_theta)/sqrt(a_t)",
                  r["eq11"], EXACT_RTOL, what)
    if diff.variance == "learned_range":
        print("  SKIP  eq. 12 holds for a fixed sigma_t only; this model learns its variance")
    else:
        sigma2 = diff.posterior_variance if diff.variance == "fixed_small" else \
            diff.large_variance
        w, C = loss_weights(diff, sigma2[1:])
        checks.exact("eq. 12: each L_(t-1) = w_t ||eps - eps_theta||^2 / D + C_t, same eps",
                     w * r["err2"] + C, r["kl"])
        compare_sums(checks, r, bound)
    explain_weights(s, diff, r)


def compare_sums(checks: Checks, r: dict, bound: dict) -> None:
    """Section 4's sum of L_(t-1) (bits_per_dim's noise) against this pass's (other noise):
    a paired z-test over the digits, when there are enough of them for the SE to be sound."""
    ours = r["kl"].sum(1) / LN2
    theirs = bound["terms"][:, 1:].sum(1)
    (a, sa), (b, sb) = mean_se(ours), mean_se(theirs)
    print(f"  sum_(t=2..T) L_(t-1): {a:.4f} +- {sa:.4f} bits/dim from w_t E||eps - eps_theta||"
          f"^2 + C_t here, {b:.4f} +- {sb:.4f} from bits_per_dim (other noise)")
    if len(ours) < 30:
        print(f"  (not tested: {len(ours)} digits are too few for a paired standard error)")
        return
    d, sd = mean_se(ours - theirs)
    checks.z("both estimates of sum L_(t-1) agree (paired over digits)", np.array([d / sd]))


def explain_weights(s: Settings, diff, r: dict) -> None:
    T = diff.num_timesteps
    w_small, _ = loss_weights(diff, diff.posterior_variance[1:])
    w_large, _ = loss_weights(diff, diff.large_variance[1:])
    for name, w in (("sigma_t^2 = beta_tilde_t", w_small), ("sigma_t^2 = beta_t", w_large)):
        hi, lo = int(w.argmax()), int(w.argmin())
        print(f"  w_t with {name:24s}: {w[0]:.4g} at t = 2, {w[-1]:.4g} at t = T; max "
              f"{w[hi]:.3g} (t = {hi + 2}), min {w[lo]:.3g} (t = {lo + 2}), ratio "
              f"{(w[hi] / w[lo]).item():.0f}")
    per_t_bound = r["kl"].mean(0)                 # nats/dim, t = 2..T
    per_t_simple = r["err2"].mean(0)              # E ||eps - eps_theta||^2 / D
    cut = max(2, T // 10)
    share_b = (per_t_bound[:cut - 1].sum() / per_t_bound.sum()).item()
    share_s = (per_t_simple[:cut - 1].sum() / per_t_simple.sum()).item()
    print(f"  L_simple = E_t ||eps - eps_theta||^2 / D = {per_t_simple.mean():.4f} on these "
          f"digits (eq. 14: w_t := 1)")
    print(f"  steps t = 2..{cut} ({(cut - 1) / (T - 1):.0%} of them) carry {share_b:.0%} of sum "
          f"L_(t-1) but {share_s:.0%} of L_simple:\n  the bound's weight goes to the "
          f"nearly-clean steps; eq. 14 spends the network on the noisier ones")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    t = np.arange(2, T + 1)
    axes[0].semilogy(t, w_small.numpy(), label=r"$\sigma_t^2=\tilde\beta_t$ (fixed_small)")
    axes[0].semilogy(t, w_large.numpy(), "--", label=r"$\sigma_t^2=\beta_t$ (fixed_large)")
    axes[0].axhline(1.0, color="gray", ls=":", label="simple loss: 1")
    axes[0].set(xlabel="t", title=r"$w_t=\beta_t^2/(2\sigma_t^2\alpha_t(1-\bar\alpha_t))$")
    axes[0].legend(fontsize=8)
    axes[1].plot(t, np.cumsum(per_t_bound.numpy()) / per_t_bound.sum().item(),
                 label=r"$\sum L_{t-1}$ (the bound, eq. 12)")
    axes[1].plot(t, np.cumsum(per_t_simple.numpy()) / per_t_simple.sum().item(), "--",
                 label=r"$L_{simple}$ (eq. 14)")
    axes[1].set(xlabel="t", xscale="log", ylabel="share of the total from steps <= t",
                title="where each loss puts its weight (trained model)")
    axes[1].legend(fontsize=8)
    save(fig, s, "05_eps_loss.png")


# ---- 6. ancestral sampling ----------------------------------------------------------------

def algorithm_2(model, diff, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """DDPM Algorithm 2 as printed: for t = T..1, z ~ N(0, I) if t > 1 else 0,
    x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z."""
    for i in reversed(range(diff.num_timesteps)):              # index i = paper step t - 1
        t = torch.full((x.shape[0],), i)
        eps = model(x, t)
        beta, ab, alpha = diff.betas[i], diff.alpha_bar[i], diff.alphas[i]
        z = torch.randn(x.shape, generator=g, dtype=x.dtype) if i > 0 else torch.zeros_like(x)
        sigma = diff.posterior_variance[i].sqrt() if diff.variance == "fixed_small" else \
            diff.large_variance[i].sqrt()
        x = (x - beta / (1 - ab).sqrt() * eps) / alpha.sqrt() + sigma * z
    return x


def section_sampling(s: Settings, checks: Checks, model, diff) -> None:
    heading("6. Ancestral sampling: DDPM Algorithm 2, from x_T ~ N(0, I) to x_0")
    T, n, dev = diff.num_timesteps, s.num_samples, net_device(model)

    def net64(x, t):   # the network in float32, everything around it in float64
        with torch.inference_mode():
            return model(x.float().to(dev), t.to(dev)).double().cpu()

    shape = (n, 1, 8, 8)
    g = torch.Generator().manual_seed(s.seed + 4)
    x_T = torch.randn(shape, generator=g, dtype=torch.float64)
    g_by_hand = torch.Generator()
    g_by_hand.set_state(g.get_state())                         # the same z's for both loops
    shown = sorted({T, *(round(T * f) for f in (0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02)), 0},
                   reverse=True)
    frames, preds = {T: x_T}, {}

    def keep(step, K, x, pred_x0):       # after step `step` of K: x is x_t, paper t = K-1-step,
        t = K - 1 - step                 # and pred_x0 was predicted from x_(t+1)
        if t in shown:
            frames[t] = x.clone()
        if t + 1 in shown:
            preds[t + 1] = pred_x0.clone()
        bar.update(1)

    with tqdm(total=T, desc="sampling", unit="step", dynamic_ncols=True) as bar:
        x0 = ddpmkit.sample(net64, diff, shape, method="ancestral", noise=x_T, generator=g,
                            clip_denoised=False, callback=keep)
    by_hand = algorithm_2(net64, diff, x_T.clone(), g_by_hand)
    # Both loops do float64 arithmetic in a different order around a float32 network: where
    # a value falls on a float32 rounding boundary the network sees inputs 6e-8 apart, and
    # later steps can amplify that. 1e-4 leaves room for that; a wrong coefficient or sigma
    # moves samples by far more (1e-2 and up).
    checks.record("Algorithm 2 written out = ddpmkit.sample(method='ancestral'), same noise",
                  (by_hand - x0).abs().max().item(), 1e-4, "max |difference|")
    print(f"  {n} samples: pixel values in [{x0.min():.2f}, {x0.max():.2f}]; "
          f"{(x0.abs() > 1 + 1 / 16).float().mean():.1%} of pixels outside [-1, 1] by more "
          f"than half a level")
    rows = min(n, 4)
    blank = torch.full_like(x_T, float("nan"))                 # no prediction at t = 0
    grid = torch.stack([torch.stack([(frames if k == 0 else preds).get(t, blank)[r]
                                     for t in shown]) for r in range(rows) for k in (0, 1)])
    fig, ax = plt.subplots(figsize=(0.75 * len(shown) + 1, 0.75 * 2 * rows + 0.5))
    show_tiles(ax, grid, [f"t={t}" for t in shown],
               [label for r in range(rows) for label in (r"$x_t$", r"$\hat x_0(x_t)$")])
    ax.set_title("ancestral sampling: each sample's state $x_t$ and its prediction of $x_0$",
                 fontsize=9)
    save(fig, s, "06_sampling.png")


# ---- main ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> Settings:
    d = Settings(out=Path("walkthrough"))
    p = argparse.ArgumentParser(
        description="DDPM from the study notes to the code: each step of the derivation "
                    "printed, checked (PASS/FAIL) and drawn. Exit status 1 if a check fails, "
                    "2 on bad input.")
    quick = ", ".join(f"{k}={v}" for k, v in QUICK.items())
    p.add_argument("--out", type=Path, help=f"folder for the figures (default: {d.out})")
    p.add_argument("--quick", action="store_true", help=f"a tiny setting for tests: {quick}")
    p.add_argument("--seed", type=int, help=f"seed of every random draw (default: {d.seed})")
    p.add_argument("--checkpoint", metavar="RUN",
                   help="a trained digits run to use (through ddpmkit.load) instead of "
                        "training a model here")
    p.add_argument("--train-steps", type=int,
                   help=f"training steps of the model trained here (default: {d.train_steps})")
    p.add_argument("--net", choices=("digits", "tiny"),
                   help=f"U-Net preset of the model trained here (default: {d.net})")
    p.add_argument("--channels", type=int,
                   help="base channels of that U-Net (default: the preset's)")
    p.add_argument("--timesteps", type=int,
                   help=f"T of the model trained here, linear schedule (default: {d.timesteps})")
    p.add_argument("--num-eval", type=int,
                   help=f"held-out digits in the bound (sec. 4) and the eps-loss pass "
                        f"(sec. 5) (default: {d.num_eval}, at most 297)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's choice; 1 is much faster on a "
                        "machine busy with other work)")
    a = p.parse_args(argv)
    s = replace(d, **QUICK) if a.quick else d
    s = replace(s, **{k: v for k, v in vars(a).items() if k != "quick" and v is not None})
    for name in ("train_steps", "timesteps", "num_eval"):
        if getattr(s, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if s.timesteps < 21:
        p.error("--timesteps must be >= 21 (the linear schedule's beta_T = 0.02 x 1000 / T)")
    return s


def run(s: Settings) -> int:
    s.out.mkdir(parents=True, exist_ok=True)
    tune_allocator()  # ddpmkit's allocator setting for scripts (runtime.py)
    if s.threads:
        torch.set_num_threads(s.threads)
    global _START
    _START, checks = time.perf_counter(), Checks()
    run = load_run(s) if s.checkpoint else None           # a bad path fails before any work
    x_train, x_test = digits()
    notes_diffusion = section_schedule(s, checks)
    section_forward(s, checks, notes_diffusion, x_test)
    section_posterior(s, checks, notes_diffusion, x_test)
    model, diff = get_model(s, x_train, run)
    bound = section_bound(s, checks, model, diff, x_train, x_test)
    section_eps_loss(s, checks, model, diff, x_test, bound)
    section_sampling(s, checks, model, diff)
    heading("Summary")
    print(f"  {len(checks.lines) - len(checks.failed)} of {len(checks.lines)} checks passed; "
          f"{len(s.figures)} figures in {s.out}; {time.perf_counter() - _START:.0f} s")
    for line in checks.failed:
        print("  " + line)
    return 1 if checks.failed else 0


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    try:
        return run(s)
    except (ddpmkit.DdpmkitError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
