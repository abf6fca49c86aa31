"""Gaussian diffusion: the forward process, its posterior, the learned reverse process and
the variational bound (Ho et al. 2020, "DDPM"; Nichol & Dhariwal 2021, "Improved DDPM").

Index convention: ``t`` is an int64 tensor of indices in [0, T); index ``i`` is the paper's
step ``i + 1``. So ``t == 0`` is the last reverse step, whose bound term is the decoder L_0.

Every schedule quantity is computed once in float64 and kept per device; at use it is gathered
at ``t`` on the input's device and cast to the input dtype (no host round trips per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .losses import (
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    mean_flat,
    min_snr_weight,
    normal_kl,
)
from .schedules import betas_from_alpha_bar, validate_betas

__all__ = ["GaussianDiffusion", "PMeanVariance", "PREDICTIONS", "VARIANCES", "LOSSES"]

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSSES = ("simple", "vlb", "hybrid")

Model = Callable[..., torch.Tensor]  # model(x_t, t) or model(x_t, t, y)


@dataclass
class PMeanVariance:
    """p_theta(x_{t-1} | x_t) at one step; every field is shaped like x_t."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor


class GaussianDiffusion:
    """DDPM with a choice of network target, reverse variance and training loss.

    Args:
        betas: float [T] schedule, each in (0, 1) (see :func:`ddpmkit.make_betas`).
        prediction: what the network outputs: "eps" (DDPM eq. 11), "x0" or "v"
            (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, Salimans & Ho 2022).
        variance: "fixed_small" (beta_tilde_t), "fixed_large" (beta_t) or "learned_range"
            (Improved DDPM eq. 15; the network then outputs twice the data channels).
        loss: "simple" (DDPM eq. 14), "vlb" (the bound) or "hybrid" (Improved DDPM eq. 16).
        hybrid_lambda: weight of the bound in the hybrid loss (0.001 in Improved DDPM).
        timestep_map: for a respaced diffusion, the original step index each of its steps
            stands for; the network is called with these (default: identity).
    """

    def __init__(self, betas: torch.Tensor, prediction: str = "eps",
                 variance: str = "fixed_small", loss: str = "simple",
                 hybrid_lambda: float = 0.001, timestep_map: torch.Tensor | None = None,
                 min_snr_gamma: float = 0.0):
        for name, value, choices in (("prediction", prediction, PREDICTIONS),
                                     ("variance", variance, VARIANCES),
                                     ("loss", loss, LOSSES)):
            if value not in choices:
                raise ValueError(f"{name}={value!r}; choose one of {', '.join(choices)}")
        self.prediction = prediction
        self.variance = variance
        self.loss = loss
        self.hybrid_lambda = float(hybrid_lambda)
        self.min_snr_gamma = float(min_snr_gamma)  # 0: the plain simple loss

        betas = validate_betas(betas)
        self.num_timesteps = T = int(betas.numel())
        f64 = dict(dtype=torch.float64)
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, **f64), alpha_bar[:-1]])

        # Posterior q(x_{t-1} | x_t, x_0), DDPM eq. 7. At t = 1 (index 0) the variance is
        # exactly 0; its log is "clipped" to the t = 2 value so that the decoder's log-variance
        # stays finite, as the reference implementations do (beta_1 when T = 1).
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        floor = posterior_variance[1] if T > 1 else betas[0]
        posterior_log_variance_clipped = torch.log(
            torch.cat([floor.reshape(1), posterior_variance[1:]]))
        # fixed_large uses beta_t, with the same t = 1 substitution (DDPM sec. 3.2 names
        # sigma_t^2 = beta_t; Improved DDPM's code uses beta_tilde_2 at t = 1).
        large_variance = torch.cat([floor.reshape(1), betas[1:]])

        if timestep_map is None:
            timestep_map = torch.arange(T)
        timestep_map = torch.as_tensor(timestep_map, dtype=torch.int64)
        if timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have T = {T} entries, got "
                             f"{tuple(timestep_map.shape)}")

        # float64 master copies on the CPU (and the int64 step map); `_table` hands out
        # per-device copies.
        self._tables: dict[str, torch.Tensor] = dict(
            betas=betas,
            alphas=alphas,
            alpha_bar=alpha_bar,
            alpha_bar_prev=alpha_bar_prev,
            sqrt_alpha_bar=alpha_bar.sqrt(),
            sqrt_one_minus_alpha_bar=(1.0 - alpha_bar).sqrt(),
            log_one_minus_alpha_bar=torch.log1p(-alpha_bar),
            sqrt_recip_alpha_bar=alpha_bar.rsqrt(),
            sqrt_recipm1_alpha_bar=(1.0 / alpha_bar - 1.0).sqrt(),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef_x0=betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            posterior_mean_coef_xt=(1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar),
            large_variance=large_variance,
            log_large_variance=torch.log(large_variance),
            log_betas=torch.log(betas),
            timestep_map=timestep_map,
        )
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    # ---- schedule access -------------------------------------------------------------------

    def __getattr__(self, name: str) -> torch.Tensor:
        # Schedule tables read as attributes (diff.alpha_bar, diff.betas, ...), float64 CPU.
        tables = self.__dict__.get("_tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        cache = self._on_device.get(device)
        if cache is None:
            cache = {k: v.to(device) for k, v in self._tables.items()}
            self._on_device[device] = cache
        return cache[name]

    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gather schedule ``name`` at indices ``t`` [B], cast to x's dtype, shaped
        [B, 1, ..., 1] to broadcast against x [B, ...]."""
        values = self._table(name, t.device)[t]
        return values.to(x.dtype).reshape(t.shape[0], *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The step indices the network sees (the original ones for a respaced diffusion)."""
        return self._table("timestep_map", t.device)[t]

    def respace(self, kept: list[int] | torch.Tensor) -> GaussianDiffusion:
        """A diffusion over a subset of steps (Improved DDPM sec. 4).

        ``kept`` are increasing step indices of this diffusion; the new one has K = len(kept)
        steps whose alpha_bar equals this one's at the kept steps, betas recomputed by
        beta_k = 1 - alpha_bar_k / alpha_bar_{k-1}. The network still sees original indices.
        """
        kept = torch.as_tensor(kept, dtype=torch.int64).flatten()
        if kept.numel() < 1 or (kept[1:] <= kept[:-1]).any() or kept[0] < 0 \
                or kept[-1] >= self.num_timesteps:
            raise ValueError(f"kept steps must be increasing indices in [0, "
                             f"{self.num_timesteps}), got {kept.tolist()[:10]}...")
        betas = betas_from_alpha_bar(self.alpha_bar[kept])
        return GaussianDiffusion(betas, self.prediction, self.variance, self.loss,
                                 self.hybrid_lambda, timestep_map=self.timestep_map[kept])

    # ---- forward process -------------------------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), DDPM eq. 4.

        Returns (mean, variance, log_variance), each shaped like x0 [B, ...].
        """
        mean = self._at("sqrt_alpha_bar", t, x0) * x0
        variance = (1.0 - self._at("alpha_bar", t, x0)).expand_as(x0)
        log_variance = self._at("log_one_minus_alpha_bar", t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) by reparameterisation (DDPM eq. 4):
        x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. Shapes: x0, noise [B, ...]."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (self._at("sqrt_alpha_bar", t, x0) * x0
                + self._at("sqrt_one_minus_alpha_bar", t, x0) * noise)

    def q_step_sample(self, x_prev: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """One forward step q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (DDPM eq. 2).

        ``x_prev`` is x at index t - 1 (x_0 when t == 0); returns x at index t. For tests and
        pictures: iterating this t times has the law of :meth:`q_sample`.
        """
        if noise is None:
            noise = torch.randn_like(x_prev)
        return (self._at("alphas", t, x_prev).sqrt() * x_prev
                + self._at("betas", t, x_prev).sqrt() * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I), DDPM eq. 6-7:

        mu_tilde_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                     + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t,
        beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t.

        Returns (mean, variance, log_variance) shaped like x_t; the log-variance at t = 0 is the
        clipped one (see ``__init__``), the variance there is exactly 0.
        """
        mean = (self._at("posterior_mean_coef_x0", t, x_t) * x0
                + self._at("posterior_mean_coef_xt", t, x_t) * x_t)
        variance = self._at("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._at("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ---- prediction conversions (all from x_t = sqrt(ab) x0 + sqrt(1 - ab) eps) ------------

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (DDPM eq. 4 solved for x0)."""
        return (self._at("sqrt_recip_alpha_bar", t, x_t) * x_t
                - self._at("sqrt_recipm1_alpha_bar", t, x_t) * eps)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)."""
        return ((self._at("sqrt_recip_alpha_bar", t, x_t) * x_t - x0)
                / self._at("sqrt_recipm1_alpha_bar", t, x_t))

    def v_from_x0_eps(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, sec. 4)."""
        return (self._at("sqrt_alpha_bar", t, x0) * eps
                - self._at("sqrt_one_minus_alpha_bar", t, x0) * x0)

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
        return (self._at("sqrt_alpha_bar", t, x_t) * x_t
                - self._at("sqrt_one_minus_alpha_bar", t, x_t) * v)

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v."""
        return (self._at("sqrt_one_minus_alpha_bar", t, x_t) * x_t
                + self._at("sqrt_alpha_bar", t, x_t) * v)

    def target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output for this ``prediction`` type."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        return self.v_from_x0_eps(x0, t, eps)

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor):
        """Model output -> (prediction part, variance part or None), split on dim 1."""
        if self.variance == "learned_range":
            if model_output.shape[1] != 2 * x_t.shape[1]:
                raise ValueError(f"variance='learned_range' needs a model output with "
                                 f"2 x {x_t.shape[1]} channels, got {model_output.shape[1]}")
            pred, var_values = model_output.chunk(2, dim=1)
            return pred, var_values
        if model_output.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} does not match "
                             f"x_t {tuple(x_t.shape)}")
        return model_output, None

    def pred_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """The network's prediction part -> (x0, eps) estimates, both shaped like x_t."""
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, t, pred), pred
        if self.prediction == "x0":
            return pred, self.eps_from_x0(x_t, t, pred)
        return self.x0_from_v(x_t, t, pred), self.eps_from_v(x_t, t, pred)

    # ---- reverse process -------------------------------------------------------------------

    def model_variance(self, var_values: torch.Tensor | None, x_t: torch.Tensor,
                       t: torch.Tensor):
        """Sigma_theta(x_t, t) as (variance, log_variance), shaped like x_t.

        fixed_small: beta_tilde_t (DDPM sec. 3.2, the posterior variance);
        fixed_large: beta_t; learned_range: Improved DDPM eq. 15,
        log Sigma = v log beta_t + (1 - v) log beta_tilde_t with the network's v in [-1, 1]
        mapped to [0, 1].
        """
        if self.variance == "fixed_small":
            variance = self._at("posterior_variance", t, x_t).expand_as(x_t)
            log_variance = self._at("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        elif self.variance == "fixed_large":
            variance = self._at("large_variance", t, x_t).expand_as(x_t)
            log_variance = self._at("log_large_variance", t, x_t).expand_as(x_t)
        else:
            frac = (var_values + 1.0) / 2.0
            log_variance = (frac * self._at("log_betas", t, x_t)
                            + (1.0 - frac) * self._at("posterior_log_variance_clipped", t, x_t))
            variance = torch.exp(log_variance)
        return variance, log_variance

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = True) -> PMeanVariance:
        """p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta) from the network's output.

        The mean is the posterior mean (DDPM eq. 7) at the predicted x0, which for eps
        prediction equals DDPM eq. 11; ``clip_denoised`` clamps the predicted x0 to [-1, 1]
        first (only meaningful for data in [-1, 1]). Shapes: x_t [B, ...], t [B].
        """
        pred, var_values = self.split_output(model_output, x_t)
        pred_x0, pred_eps = self.pred_x0_eps(pred, x_t, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            pred_eps = self.eps_from_x0(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        variance, log_variance = self.model_variance(var_values, x_t, t)
        return PMeanVariance(mean, variance, log_variance, pred_x0, pred_eps)

    def call_model(self, model: Model, x_t: torch.Tensor, t: torch.Tensor,
                   y: torch.Tensor | None = None) -> torch.Tensor:
        """Run the network at step indices ``t`` (mapped to the original steps if respaced),
        with class labels ``y`` [B] when given (``model(x_t, t)`` otherwise, so networks
        without labels keep their two-argument contract)."""
        if y is None:
            return model(x_t, self.model_timesteps(t))
        return model(x_t, self.model_timesteps(t), y)

    # ---- the variational bound -------------------------------------------------------------

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, [B] (DDPM eq. 5)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device,
                       dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))
        return mean_flat(kl) / math.log(2.0)

    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor, levels: int | None = 256,
                     clip_denoised: bool = False) -> torch.Tensor:
        """One term of the bound per example, in bits/dim, [B] (DDPM eq. 5):

        t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t));
        t = 0: L_0 = -log p_theta(x_0 | x_1), the discretised Gaussian decoder (DDPM eq. 13)
        with ``levels`` bins, or a Gaussian density for continuous data (``levels=None``).
        """
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance))
        if levels is None:
            nll = -gaussian_log_likelihood(x0, out.mean, out.log_variance)
        else:
            nll = -discretized_gaussian_log_likelihood(x0, out.mean, out.log_variance, levels)
        decoder_nll = mean_flat(nll)
        return torch.where(t == 0, decoder_nll, kl) / math.log(2.0)

    def training_losses(self, model: Model, x0: torch.Tensor, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, levels: int | None = 256,
                        y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-example training losses at steps ``t`` (uniform if None); the caller reduces.

        - "simple": ||target - prediction||^2 averaged over dimensions (DDPM eq. 14 for eps).
        - "vlb": T * L_t in bits/dim, an unbiased estimate of sum_t L_t (DDPM eq. 5) under
          uniform t; the decoder term at t = 0.
        - "hybrid": simple + lambda * T * L_t (Improved DDPM eq. 16), where the bound term sees
          the mean with its gradient stopped, so it trains only the variance (sec. 3.1).
        ``y`` [B]: class labels for a class-conditional network (None: none passed).
        Returns a dict with "loss" [B] and its parts ("mse", "vb") where they apply.
        """
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        model_output = self.call_model(model, x_t, t, y)
        terms: dict[str, torch.Tensor] = {}
        pred, var_values = self.split_output(model_output, x_t)
        T = self.num_timesteps

        if self.loss in ("simple", "hybrid"):
            terms["mse"] = mean_flat((self.target(x0, t, noise) - pred.float()) ** 2)
            if self.min_snr_gamma > 0:
                terms["mse"] = terms["mse"] * self.snr_weight(t).float()
        if self.loss in ("vlb", "hybrid"):
            if self.loss == "hybrid" and var_values is not None:
                # Stop the bound's gradient to the mean: L_simple alone trains it.
                vb_output = torch.cat([pred.detach(), var_values], dim=1)
            else:
                vb_output = model_output
            terms["vb"] = self.vb_terms_bpd(vb_output.float(), x0.float(), x_t.float(), t,
                                            levels=levels, clip_denoised=False)
        if self.loss == "simple":
            terms["loss"] = terms["mse"]
        elif self.loss == "vlb":
            terms["loss"] = T * terms["vb"]
        else:
            terms["loss"] = terms["mse"] + self.hybrid_lambda * T * terms["vb"]
        return terms

    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights of the simple loss at steps ``t`` [B] (float64), from
        :func:`ddpmkit.losses.min_snr_weight`; all ones when ``min_snr_gamma`` is 0."""
        alpha_bar = self._table("alpha_bar", t.device)[t]
        if self.min_snr_gamma <= 0:
            return torch.ones_like(alpha_bar)
        return min_snr_weight(alpha_bar / (1.0 - alpha_bar), self.min_snr_gamma,
                              self.prediction)

    @torch.inference_mode()
    def bits_per_dim(self, model: Model, x0: torch.Tensor, levels: int | None = 256,
                     clip_denoised: bool = True, seed: int = 0,
                     example_ids: torch.Tensor | None = None, batch_size: int = 256,
                     progress: Callable[[int], None] | None = None,
                     y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The full bound -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0 (DDPM eq. 5), in bits/dim.

        Every term is evaluated (no sampling of t), each with its own noise. The noise for
        example ``example_ids[j]`` at step t comes from a generator seeded by (seed, id, t), so
        the figure does not depend on ``batch_size`` or on how examples are split over calls or
        processes. Network calls are batched over (example, t) pairs, ``batch_size`` at a time.

        ``y`` [B]: class labels for a class-conditional network, giving the bound on
        -log p(x_0 | y); a conditional network's null class gives the bound on -log p(x_0).

        Returns {"total": [B], "prior": [B], "terms": [B, T]} (terms[:, 0] is L_0), float64.
        """
        B, T = x0.shape[0], self.num_timesteps
        device = x0.device
        if example_ids is None:
            example_ids = torch.arange(B)
        example_ids = example_ids.cpu().long().tolist()
        # One generator on the device, re-seeded per (example, t) pair: the draws are queued
        # kernels, with no host-to-device copy to wait for.
        gen = torch.Generator(device=device)
        terms = torch.zeros(B, T, dtype=torch.float64, device=device)
        for start in range(0, B * T, batch_size):
            flat = torch.arange(start, min(start + batch_size, B * T))
            js, ts = flat // T, flat % T
            noise = torch.empty((len(flat), *x0.shape[1:]), dtype=torch.float32, device=device)
            for k, (j, i) in enumerate(zip(js.tolist(), ts.tolist(), strict=True)):
                gen.manual_seed(pair_seed(seed, example_ids[j], i))
                noise[k].normal_(generator=gen)
            noise = noise.to(x0.dtype)
            js_d, tb = js.to(device), ts.to(device)
            xb = x0[js_d]
            x_t = self.q_sample(xb, tb, noise)
            yb = None if y is None else y[js.to(y.device)]
            model_output = self.call_model(model, x_t, tb, yb)
            # The bound's arithmetic runs in at least float32, whatever the network's dtype.
            dt = torch.promote_types(x0.dtype, torch.float32)
            vb = self.vb_terms_bpd(model_output.to(dt), xb.to(dt), x_t.to(dt), tb,
                                   levels=levels, clip_denoised=clip_denoised)
            terms[js_d, tb] = vb.double()
            if progress is not None:
                progress(len(flat))
        terms = terms.cpu()
        prior = self.prior_bpd(x0.double()).cpu()
        return {"total": prior + terms.sum(dim=1), "prior": prior, "terms": terms}


def pair_seed(seed: int, example_id: int, t: int) -> int:
    """A fixed injective-enough mix of (seed, example, step) into one 63-bit seed."""
    return ((seed * 1_000_003 + example_id) * 1_000_033 + t) % (2**63 - 1)
