#!/usr/bin/env python
"""Mutation testing for ddpmkit: does the test suite notice a realistic one-line bug?

Each mutant below is one small edit of the kind real bugs are made of (a dropped sqrt, an
off-by-one, swapped arguments, an inverted weight, a wrong sign or index), located by an exact
snippet of the source. For each, the script copies src/, tests/, benchmarks/ and pyproject.toml
into a scratch folder (the working tree is never touched), applies the edit there, and runs the
mutant's own test files with ``pytest -x`` (the fast suite's marks: slow tests deselected).
A failing run "kills" the mutant; a passing one means no test checks that behaviour: a
"survivor". The score is killed / (killed + survived).

A snippet that is no longer in its file (the code moved or changed) makes the mutant "stale":
reported, not counted; update or drop it. A snippet found more than once is "ambiguous" (also
not counted): lengthen it. Grow the list with the code: add the mutants of each new module.

    python scripts/mutants.py                 # all mutants, one at a time (2-core machine)
    python scripts/mutants.py --list          # names, places, what each breaks; stale ones
    python scripts/mutants.py --only ema-lerp-weight --only unet-skip-order
    python scripts/mutants.py -j 2 --timeout 300

Before the mutants, the unmutated copy runs every test file the list uses (the baseline):
a red baseline would make every mutant look killed, so the script stops there
(``--no-baseline`` skips it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("src", "tests", "benchmarks", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str               # under src/ddpmkit/
    old: str                # exact snippet, found exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: test files or node ids
    what: str               # the bug, in words


def M(name: str, path: str, old: str, new: str, tests: str, what: str) -> Mutant:
    return Mutant(name, path, old, new, tuple(tests.split()), what)


# Test selections (files, so that a new test of the same behaviour is picked up).
DIFF = "tests/test_diffusion.py"
SCHED = "tests/test_schedules.py tests/test_diffusion.py"
LOSS = "tests/test_losses.py tests/test_diffusion.py"
SAMP = "tests/test_sampling.py"
NN = "tests/test_unet_reference.py tests/test_nn.py"
COND = "tests/test_conditioning.py tests/test_cli_edit.py"
TRAIN = "tests/test_train.py"
DATA = "tests/test_data.py"
SHARDS = "tests/test_shards.py"
INTEROP = "tests/test_interop.py"
RECIPES = "tests/test_recipes.py"

MUTANTS: list[Mutant] = [
    # ---- schedules ----------------------------------------------------------------------
    M("linear-scale-inverted", "schedules.py",
      "scale = 1000.0 / T", "scale = T / 1000.0", SCHED,
      "linear schedule endpoints scaled by T / 1000 instead of 1000 / T"),
    M("cosine-dropped-square", "schedules.py",
      "f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2",
      "f = torch.cos((steps + s) / (1 + s) * math.pi / 2)", SCHED,
      "cosine alpha_bar without the square"),
    M("cosine-ratio-to-first", "schedules.py",
      "betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)\n    return validate_betas(betas)\n\n\n"
      "def sigmoid_betas",
      "betas = (1.0 - f[1:] / f[0]).clamp(max=max_beta)\n    return validate_betas(betas)\n\n\n"
      "def sigmoid_betas", SCHED,
      "cosine betas from alpha_bar(t) / alpha_bar(0) (1 - alpha_bar) instead of consecutive "
      "ratios"),
    M("sigmoid-start-sign", "schedules.py",
      "(steps * (end - start) + start) / tau", "(steps * (end - start) - start) / tau", SCHED,
      "sigmoid schedule's ramp starts at -start"),
    M("betas-from-alpha-bar-ratio", "schedules.py",
      "betas = 1.0 - alpha_bar / prev", "betas = 1.0 - alpha_bar", SCHED,
      "respaced betas = 1 - alpha_bar (the cumulative product, not the step)"),

    # ---- diffusion: forward process and posterior ----------------------------------------
    M("alpha-bar-prev-shift", "diffusion.py",
      "alpha_bar_prev = torch.cat([torch.ones(1, **f64), alpha_bar[:-1]])",
      "alpha_bar_prev = torch.cat([torch.ones(1, **f64), alpha_bar[1:]])", DIFF,
      "alpha_bar_{t-1} taken one step ahead (alpha_bar_{t+1})"),
    M("posterior-variance-inverted", "diffusion.py",
      "posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)",
      "posterior_variance = betas * (1.0 - alpha_bar) / (1.0 - alpha_bar_prev)", DIFF,
      "beta_tilde with the ratio upside down"),
    M("posterior-log-floor-index", "diffusion.py",
      "floor = posterior_variance[1] if T > 1 else betas[0]",
      "floor = posterior_variance[2] if T > 2 else betas[0]", DIFF,
      "clipped log-variance at t = 1 from beta_tilde_3 instead of beta_tilde_2"),
    M("posterior-coef-x0-no-sqrt", "diffusion.py",
      "posterior_mean_coef_x0=betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar)",
      "posterior_mean_coef_x0=betas * alpha_bar_prev / (1.0 - alpha_bar)", DIFF,
      "posterior mean: dropped sqrt on alpha_bar_{t-1}"),
    M("posterior-coef-xt-no-sqrt", "diffusion.py",
      "(1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar)",
      "(1.0 - alpha_bar_prev) * alphas / (1.0 - alpha_bar)", DIFF,
      "posterior mean: dropped sqrt on alpha_t"),
    M("recipm1-no-sqrt", "diffusion.py",
      "sqrt_recipm1_alpha_bar=(1.0 / alpha_bar - 1.0).sqrt()",
      "sqrt_recipm1_alpha_bar=(1.0 / alpha_bar - 1.0)", DIFF,
      "x0 from eps: sqrt(1 / alpha_bar - 1) without the sqrt"),
    M("q-sample-no-sqrt", "diffusion.py",
      'return (self._at("sqrt_alpha_bar", t, x0) * x0',
      'return (self._at("alpha_bar", t, x0) * x0', DIFF,
      "q_sample scales x0 by alpha_bar instead of its sqrt"),
    M("q-step-no-sqrt", "diffusion.py",
      '+ self._at("betas", t, x_prev).sqrt() * noise)',
      '+ self._at("betas", t, x_prev) * noise)', DIFF,
      "one forward step adds beta (not sqrt(beta)) times the noise"),
    M("eps-from-x0-times", "diffusion.py",
      '/ self._at("sqrt_recipm1_alpha_bar", t, x_t))',
      '* self._at("sqrt_recipm1_alpha_bar", t, x_t))', DIFF,
      "eps from x0: multiplies where it should divide"),
    M("x0-from-v-sign", "diffusion.py",
      '- self._at("sqrt_one_minus_alpha_bar", t, x_t) * v)',
      '+ self._at("sqrt_one_minus_alpha_bar", t, x_t) * v)', DIFF,
      "x0 from v: wrong sign"),
    M("eps-from-v-sign", "diffusion.py",
      '+ self._at("sqrt_alpha_bar", t, x_t) * v)',
      '- self._at("sqrt_alpha_bar", t, x_t) * v)', DIFF,
      "eps from v: wrong sign"),

    # ---- diffusion: reverse process and the bound -----------------------------------------
    M("learned-range-inverted", "diffusion.py",
      "frac = (var_values + 1.0) / 2.0", "frac = (1.0 - var_values) / 2.0", DIFF,
      "learned-range interpolation weight inverted (v = 1 gives beta_tilde)"),
    M("fixed-large-log-variance", "diffusion.py",
      'log_variance = self._at("log_large_variance", t, x_t).expand_as(x_t)',
      'log_variance = self._at("posterior_log_variance_clipped", t, x_t).expand_as(x_t)',
      f"{DIFF} {SAMP}", "fixed_large's log-variance is beta_tilde's"),
    M("clip-range", "diffusion.py",
      "pred_x0 = pred_x0.clamp(-1.0, 1.0)", "pred_x0 = pred_x0.clamp(0.0, 1.0)",
      f"{DIFF} {SAMP}", "predicted x0 clipped to [0, 1] instead of [-1, 1]"),
    M("clip-keeps-stale-eps", "diffusion.py",
      "            pred_eps = self.eps_from_x0(x_t, t, pred_x0)\n",
      "", DIFF, "after clipping x0, eps still the unclipped one (inconsistent with x_t)"),
    M("prior-wrong-step", "diffusion.py",
      "t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device,",
      "t = torch.full((x0.shape[0],), self.num_timesteps - 2, device=x0.device,", DIFF,
      "L_T evaluated at step T - 1"),
    M("decoder-at-wrong-step", "diffusion.py",
      "return torch.where(t == 0, decoder_nll, kl) / math.log(2.0)",
      "return torch.where(t == 1, decoder_nll, kl) / math.log(2.0)", DIFF,
      "the decoder term L_0 used at index 1"),
    M("bound-nats-not-bits", "diffusion.py",
      "return torch.where(t == 0, decoder_nll, kl) / math.log(2.0)",
      "return torch.where(t == 0, decoder_nll, kl)", DIFF,
      "bound terms in nats, reported as bits"),
    M("kl-swapped-arguments", "diffusion.py",
      "normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)",
      "normal_kl(out.mean, out.log_variance, true_mean, true_log_variance)", DIFF,
      "KL(p || q) instead of KL(q || p) (equal only for equal variances)"),
    M("total-without-prior", "diffusion.py",
      'return {"total": prior + terms.sum(dim=1), "prior": prior, "terms": terms}',
      'return {"total": terms.sum(dim=1), "prior": prior, "terms": terms}', DIFF,
      "bits/dim total leaves out L_T (~1e-5 bits)"),
    M("bpd-noise-by-position", "diffusion.py",
      "gen.manual_seed(pair_seed(seed, example_ids[j], i))",
      "gen.manual_seed(pair_seed(seed, j, i))", DIFF,
      "bits/dim noise seeded by batch position, not example id"),
    M("vlb-loss-not-scaled-by-T", "diffusion.py",
      'terms["loss"] = T * terms["vb"]', 'terms["loss"] = terms["vb"]', DIFF,
      "the vlb loss is one term, not T times it (an estimate of the sum)"),
    M("hybrid-no-stop-gradient", "diffusion.py",
      "vb_output = torch.cat([pred.detach(), var_values], dim=1)",
      "vb_output = torch.cat([pred, var_values], dim=1)", DIFF,
      "the hybrid loss's bound term also trains the mean"),
    M("respace-from-betas", "diffusion.py",
      "betas = betas_from_alpha_bar(self.alpha_bar[kept])", "betas = self.betas[kept]",
      f"{DIFF} {SAMP}", "respacing keeps the kept steps' betas instead of their alpha_bar"),

    # ---- losses ---------------------------------------------------------------------------
    M("mean-flat-sum", "losses.py",
      "return x.reshape(x.shape[0], -1).mean(dim=1)",
      "return x.reshape(x.shape[0], -1).sum(dim=1)", LOSS,
      "per-example losses summed over dimensions (not bits per dim)"),
    M("kl-wrong-variance", "losses.py",
      "+ (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)",
      "+ (mean1 - mean2) ** 2 * torch.exp(-logvar1) - 1.0)", LOSS,
      "Gaussian KL: mean term scaled by the first variance"),
    M("bin-half-width", "losses.py",
      "half = 1.0 / (levels - 1)", "half = 1.0 / levels", LOSS,
      "discretised decoder: bins of width 2 / levels instead of 2 / (levels - 1)"),
    M("top-bin-wrong-tail", "losses.py",
      "torch.where(is_highest, torch.special.log_ndtr(-lo), log_mid))",
      "torch.where(is_highest, torch.special.log_ndtr(lo), log_mid))", LOSS,
      "the highest bin's mass is P(z < lo) instead of P(z > lo)"),
    M("stable-mass-sign", "losses.py",
      "return log_b + torch.log1p(-torch.exp(log_a - log_b))",
      "return log_b + torch.log1p(torch.exp(log_a - log_b))", LOSS,
      "bin mass Phi(b) + Phi(a) instead of Phi(b) - Phi(a)"),
    M("gaussian-ll-no-log-var", "losses.py",
      "return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))",
      "return -0.5 * (math.log(2 * math.pi) + (x - mean) ** 2 * torch.exp(-log_var))", LOSS,
      "continuous decoder density without its log-variance term"),

    # ---- sampling -------------------------------------------------------------------------
    M("trailing-floor", "sampling.py",
      "return sorted((2 * T * (S - k) + S) // (2 * S) - 1 for k in range(S))",
      "return sorted((2 * T * (S - k)) // (2 * S) - 1 for k in range(S))", SAMP,
      "trailing spacing truncates instead of rounding (wrong when S does not divide T)"),
    M("quadratic-floor", "sampling.py",
      "target = (2 * T * (k + 1) ** 2 + S * S) // (2 * S * S) - 1",
      "target = (2 * T * (k + 1) ** 2) // (2 * S * S) - 1", SAMP,
      "quadratic spacing truncates instead of rounding"),
    M("sections-floor", "sampling.py",
      "kept.extend(start + (2 * j * (size - 1) + count - 1) // (2 * (count - 1))",
      "kept.extend(start + (2 * j * (size - 1)) // (2 * (count - 1))", SAMP,
      "section spacing truncates instead of rounding"),
    M("sections-extra-to-last", "sampling.py",
      "size = base + (1 if i < extra else 0)",
      "size = base + (1 if i >= len(counts) - extra else 0)", SAMP,
      "the T mod n leftover steps go to the last sections instead of the first"),
    M("noise-block-from-batch", "sampling.py",
      "L = max(1, min(64, 4096 // max(1, math.prod(per_sample))))",
      "L = max(1, min(64, 4096 // max(1, math.prod(shape))))", SAMP,
      "noise block length depends on the batch size (seed no longer fixes the sample)"),
    M("sampler-clip-range", "sampling.py",
      "return lambda x0: x0.clamp(-1.0, 1.0)", "return lambda x0: x0.clamp(0.0, 1.0)", SAMP,
      "samplers clip the predicted x0 to [0, 1] instead of [-1, 1]"),
    M("dynamic-threshold-no-rescale", "sampling.py",
      "return torch.minimum(torch.maximum(x0, -s), s) / s",
      "return torch.minimum(torch.maximum(x0, -s), s)", SAMP,
      "dynamic thresholding clamps to [-s, s] but does not divide by s"),
    M("ancestral-noise-at-last-step", "sampling.py",
      "    if i == 0:\n        return mean, x0",
      "    if i < 0:\n        return mean, x0", SAMP,
      "ancestral sampling adds noise at the final step too"),
    M("ancestral-std-not-sqrt", "sampling.py",
      "return mean + torch.exp(0.5 * log_variance) * draw(), x0",
      "return mean + torch.exp(log_variance) * draw(), x0", SAMP,
      "ancestral noise scaled by the variance, not the standard deviation"),
    M("ddim-sigma-ratio-inverted", "sampling.py",
      "sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))",
      "sigma = eta * math.sqrt((1.0 - ab) / (1.0 - ab_prev) * (1.0 - ab / ab_prev))", SAMP,
      "DDIM sigma (eq. 16) with its first ratio upside down"),
    M("ddim-prev-index", "sampling.py",
      "ab_prev = alpha_bar[i - 1] if i > 0 else 1.0",
      "ab_prev = alpha_bar[i - 2] if i > 1 else 1.0", SAMP,
      "DDIM steps to alpha_bar two steps back"),
    M("dpm-2m-ratio-inverted", "sampling.py",
      "r = (lam_s - lam_1) / h", "r = h / (lam_s - lam_1)", SAMP,
      "DPM-Solver++(2M): step ratio r inverted"),
    M("dpm-phi1-sign", "sampling.py",
      "phi1 = -math.expm1(-h)  # 1 - e^-h", "phi1 = math.expm1(h)  # 1 - e^-h", SAMP,
      "DPM-Solver++: e^h - 1 in place of 1 - e^-h"),
    M("heun-no-average", "sampling.py",
      "x_hat = x_hat + (s_next - s_i) * 0.5 * (d + d_next)",
      "x_hat = x_hat + (s_next - s_i) * d_next", SAMP,
      "Heun's corrector uses the end slope only (not the average)"),
    M("edm-rho-inverted", "sampling.py",
      "lo, hi = s_min ** (1 / EDM_RHO), s_max ** (1 / EDM_RHO)",
      "lo, hi = s_min ** EDM_RHO, s_max ** EDM_RHO", SAMP,
      "EDM time steps raised to rho instead of 1 / rho"),
    M("lambda-interp-inverted", "sampling.py",
      "pos = (p - 1).double() + (lam - lo) / (hi - lo)",
      "pos = (p - 1).double() + (hi - lam) / (hi - lo)", SAMP,
      "fractional index from log-SNR interpolated the wrong way"),
    M("v-to-x0-sign-continuous", "sampling.py",
      "x0 = alpha * x - sigma * pred", "x0 = alpha * x + sigma * pred", SAMP,
      "continuous-time v -> x0 conversion with the wrong sign"),

    # ---- nn -------------------------------------------------------------------------------
    M("unet-skip-order", "nn/unet.py",
      "h = torch.cat([h, pop.pop()], dim=1)", "h = torch.cat([pop.pop(), h], dim=1)", NN,
      "up-path skip concatenated as [skip, h] (published: [h, skip])"),
    M("attention-no-residual", "nn/unet.py",
      "return x + out.transpose(1, 2).view(b, c, hh, ww)",
      "return out.transpose(1, 2).view(b, c, hh, ww)", NN,
      "attention block's residual connection dropped"),
    M("attention-k-v-swapped", "nn/unet.py",
      "weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])",
      "weight = torch.cat([self.to_q.weight, self.to_v.weight, self.to_k.weight])", NN,
      "fused qkv weights with k and v swapped"),
    M("resblock-no-residual", "nn/unet.py",
      "return h.add_(skip)  # conv2's output", "return h  # conv2's output", NN,
      "residual block's skip connection dropped"),
    M("unet-temb-no-silu", "nn/unet.py",
      "temb = F.silu(temb)\n\n        h = self.conv_in(",
      "temb = temb\n\n        h = self.conv_in(", NN,
      "the time embedding reaches the blocks without its SiLU"),
    M("unet-mid-attention-first", "nn/unet.py",
      "h = self._call(self.mid.blocks[0], h, temb)\n        h = self._call(self.mid.attn[0], h)",
      "h = self._call(self.mid.attn[0], h)\n        h = self._call(self.mid.blocks[0], h, temb)",
      NN, "middle block: attention before the first residual block"),
    M("downsample-pad-left", "nn/unet.py",
      "return self.conv(F.pad(x, (0, 1, 0, 1)))", "return self.conv(F.pad(x, (1, 0, 1, 0)))",
      NN, "downsampling pads left/top instead of right/bottom"),
    M("upsample-fold-tap", "nn/unet.py",
      "rows = torch.stack([w[:, :, 2], w[:, :, 1] + w[:, :, 2],",
      "rows = torch.stack([w[:, :, 2], w[:, :, 0] + w[:, :, 2],", NN,
      "folded upsampling kernel sums the wrong taps"),
    M("groupnorm-eps", "nn/unet.py",
      "GROUPNORM_EPS = 1e-6", "GROUPNORM_EPS = 1e-5", f"{NN} tests/test_interop.py",
      "GroupNorm eps 1e-5 (PyTorch's default), not the published 1e-6"),
    M("embedding-cos-sin", "nn/embeddings.py",
      "emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)",
      "emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)", NN,
      "timestep embedding as [cos, sin] (published: [sin, cos])"),
    M("embedding-freq-shift", "nn/embeddings.py",
      "freqs = torch.exp(exponent / (half - 1))", "freqs = torch.exp(exponent / half)", NN,
      "timestep frequencies divided by half instead of half - 1"),
    M("mlp-no-residual", "nn/mlp.py",
      "return h + self.fc2(self.dropout(F.silu(z)))", "return self.fc2(self.dropout(F.silu(z)))",
      "tests/test_nn.py", "MLP block's residual connection dropped"),
    M("dropout-scale", "nn/dropout.py",
      "scale = MASK_LEVELS / (MASK_LEVELS - drop)", "scale = (MASK_LEVELS - drop) / MASK_LEVELS",
      "tests/test_dropout.py", "kept activations scaled by 1 - p instead of 1 / (1 - p)"),

    # ---- interop (diffusers import and export) ---------------------------------------------
    M("interop-scaled-linear-no-square", "interop/scheduler.py",
      "return torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float64) ** 2",
      "return torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float64)", INTEROP,
      "scaled_linear betas read without the square"),
    M("interop-large-log-is-small", "interop/scheduler.py",
      '"fixed_large": "fixed_large", "fixed_large_log": "fixed_large",',
      '"fixed_large": "fixed_large", "fixed_large_log": "fixed_small",', INTEROP,
      "variance_type fixed_large_log read as fixed_small"),
    M("interop-predictions-swapped", "interop/scheduler.py",
      '_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}',
      '_PREDICTIONS = {"epsilon": "eps", "sample": "v", "v_prediction": "x0"}', INTEROP,
      "prediction_type sample and v_prediction swapped"),
    M("interop-legacy-key-value", "interop/unet.py",
      '(r"\\.key\\.", ".to_k."), (r"\\.value\\.", ".to_v.")',
      '(r"\\.key\\.", ".to_v."), (r"\\.value\\.", ".to_k.")', INTEROP,
      "old diffusers attention names: key and value swapped"),

    # ---- train ----------------------------------------------------------------------------
    M("ema-lerp-weight", "train/ema.py",
      "torch._foreach_lerp_(targets, sources, 1.0 - decay)",
      "torch._foreach_lerp_(targets, sources, decay)", TRAIN,
      "EMA moves by decay instead of 1 - decay"),
    M("ema-lerp-weight-on-device", "train/ema.py",
      "weight = torch.where(where, 1.0 - decay, 0.0)", "weight = torch.where(where, decay, 0.0)",
      TRAIN, "the trainer's EMA update (decided on the device) moves by decay, not 1 - decay"),
    M("ema-update-where-inverted", "train/ema.py",
      "weight = torch.where(where, 1.0 - decay, 0.0)",
      "weight = torch.where(where, 0.0, 1.0 - decay)",
      TRAIN, "the EMA updates on skipped steps and stays still on good ones"),
    M("ema-decay-exponent", "train/ema.py",
      "return 0.5 ** (images_per_step / h)", "return 0.5 ** (h / images_per_step)", TRAIN,
      "EMA decay exponent inverted"),
    M("ema-rampup-max", "train/ema.py",
      "h = min(h, rampup * images_seen)", "h = max(h, rampup * images_seen)", TRAIN,
      "ramp-up lengthens the half-life instead of capping it"),
    M("checkpoint-ema-is-raw", "train/trainer.py",
      "self.ema.state_dict(), tensors, state, self.cfg,",
      "self.model.state_dict(), tensors, state, self.cfg,", TRAIN,
      "ema.safetensors written from the raw weights"),
    M("inference-loads-raw", "loading.py",
      "model.load_state_dict(ckpt.ema if use_ema else ckpt.model)",
      "model.load_state_dict(ckpt.model if use_ema else ckpt.ema)", TRAIN,
      "sample/eval load the raw weights when asked for the EMA"),
    M("data-order-same-every-epoch", "data/loader.py",
      "g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)",
      "g = torch.Generator().manual_seed(self.seed * 1_000_003)", TRAIN,
      "the data order repeats identically every epoch"),
    M("data-order-epoch-overrun", "data/loader.py",
      "take = min(count, self.n - offset)", "take = min(count, self.n)", TRAIN,
      "a batch crossing an epoch boundary skips the next epoch's first examples"),
    M("warmup-off-by-one", "train/trainer.py",
      "return tc.lr * (step + 1) / tc.warmup_steps", "return tc.lr * step / tc.warmup_steps",
      TRAIN, "the first step trains with lr = 0"),
    M("resume-one-step-late", "train/trainer.py",
      '_count({"step": ckpt.step}, "step", 0)', '_count({"step": ckpt.step + 1}, "step", 0)',
      TRAIN,
      "a resumed run skips one step"),
    M("prune-keeps-one-more", "train/checkpoint.py",
      "for p in done[:-keep] if keep > 0 else []:",
      "for p in done[:-(keep + 1)] if keep > 0 else []:", TRAIN,
      "pruning keeps keep + 1 checkpoints"),
    M("loss-aware-no-sqrt", "train/timesteps.py",
      "w = self.history.pow(2).mean(dim=1).sqrt()", "w = self.history.pow(2).mean(dim=1)",
      TRAIN, "loss-aware p_t from E[L^2] instead of its square root"),
    M("loss-aware-weight-inverted", "train/timesteps.py",
      "return t, (1.0 / (self.T * p[t])).float()", "return t, (self.T * p[t]).float()",
      TRAIN, "importance weights T p_t instead of 1 / (T p_t) (biased loss)"),

    # ---- data -----------------------------------------------------------------------------
    M("flip-vertical", "data/images.py",
      "x.flip(-1), x)", "x.flip(-2), x)", DATA,
      "random flips (and small uint8 images' mirroring) go top-bottom, not left-right"),
    M("uint8-scale", "data/images.py",
      "return x.div_(127.5).sub_(1.0)", "return x.div_(128.0).sub_(1.0)", DATA,
      "uint8 -> [-1, 1] with 128 (255 maps below 1, off the 256-level grid)"),
    M("to-uint8-truncates", "data/images.py",
      "y = ((y + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)",
      "y = ((y + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)", DATA,
      "samples -> uint8 by truncation instead of rounding"),
    M("digits-grid", "data/sources.py",
      "x = torch.from_numpy(images_ / 8.0 - 1.0).to(torch.float32)[:, None]",
      "x = torch.from_numpy(images_ / 16.0 - 1.0).to(torch.float32)[:, None]", DATA,
      "digits mapped to [-1, 0] instead of [-1, 1]"),
    # ---- tar shards (issue 11) ----
    M("stream-slot-reads-every-shard", "data/stream.py",
      "        g += slots\n", "        g += 1\n", SHARDS,
      "every pipe: slot reads every shard: examples doubled across ranks and workers"),
    M("stream-resume-wrong-worker-turn", "data/stream.py",
      "slot = self.rank * workers + (self.state.batches + w) % workers",
      "slot = self.rank * workers + w % workers", SHARDS,
      "a resumed stream starts with worker 0's slot, not the one whose turn it was"),
    M("shard-split-wrong-ordinal", "data/shards.py",
      "test = (ordinal % _TEST_EVERY) == _TEST_EVERY - 1",
      "test = (ordinal % _TEST_EVERY) == 0", SHARDS,
      "local shards' test split is example 0, 20, ... of a shard, not 19, 39, ..."),
    M("stream-split-wrong-ordinal", "data/shards.py",
      "return k % _TEST_EVERY == _TEST_EVERY - 1", "return k % _TEST_EVERY == 0", SHARDS,
      "pipe: shards' test split is example 0, 20, ... of a shard, not 19, 39, ..."),
    M("shard-writer-split-lost", "data/shard_writer.py",
      "test = pos % 20 == 19", "test = pos % 20 == 0", SHARDS,
      "prepared shards put other examples at the test positions than the source's split"),
    M("shard-cls-ignored", "data/shards.py",
      "label = parse_cls(os.pread(raw.fileno(), min(size, 64), off))",
      "label = parse_cls(b'0')", SHARDS, "local shards' .cls labels are all read as class 0"),
    # ---- conditioning and editing (issue 13) ----
    M("guidance-from-cond", "sampling.py",
      "mixed = uncond + S * (cond - uncond)",
      "mixed = cond + S * (cond - uncond)", COND,
      "classifier-free guidance extrapolates from the conditional output, not the null one"),
    M("unet-class-embed-ignored", "nn/unet.py",
      "temb = temb + self.class_embed(y, x.shape[0], x.device).to(temb.dtype)",
      "temb = temb + 0 * self.class_embed(y, x.shape[0], x.device).to(temb.dtype)", COND,
      "the U-Net's class embedding never reaches the blocks"),
    M("repaint-jump-no-sqrt", "editing.py",
      "x = math.sqrt(r) * x + math.sqrt(1.0 - r) * draw()",
      "x = r * x + math.sqrt(1.0 - r) * draw()", COND,
      "RePaint's forward jump scales x by r instead of sqrt(r)"),
    M("inpaint-known-wrong-level", "editing.py",
      "x = torch.where(mask, x, known(s))",
      "x = torch.where(mask, x, known(prev))", COND,
      "inpainting joins the kept pixels noised to the previous level, not the new one"),
    M("recon-guidance-sign", "editing.py",
      "x0 = x0_hat.detach() - (weight * alpha / 2.0) * grad * mask.to(x.dtype)",
      "x0 = x0_hat.detach() + (weight * alpha / 2.0) * grad * mask.to(x.dtype)", COND,
      "reconstruction guidance pushes the generated pixels away from the kept ones"),
    M("recon-guidance-no-alpha", "editing.py",
      "x0 = x0_hat.detach() - (weight * alpha / 2.0) * grad * mask.to(x.dtype)",
      "x0 = x0_hat.detach() - (weight / 2.0) * grad * mask.to(x.dtype)", COND,
      "reconstruction guidance drops Ho et al.'s alpha_t factor (too strong at high noise)"),
    # (Not masking the gradient is an equivalent mutant: the kept pixels of the step's
    # result are replaced by q(x_s | x_0) draws right after it.)
    # (Dropping inpaint's final torch.where(mask, x, x0) is an equivalent mutant: the last
    # state is always s = -1, where the loop has already joined x0's kept pixels exactly.)
    M("slerp-ends-swapped", "editing.py",
      "(math.sin((1 - w) * theta) / s) * a + (math.sin(w * theta) / s) * b",
      "(math.sin(w * theta) / s) * a + (math.sin((1 - w) * theta) / s) * b", COND,
      "slerp runs from b to a"),
    # ---- recipes, guidance interval, batch conversion (issues 11, 13, 14) ----------------
    M("guidance-interval-inverted", "sampling.py",
      "mixed = torch.where(inside.view(-1, *[1] * (x.ndim - 1)), mixed, cond)",
      "mixed = torch.where(inside.view(-1, *[1] * (x.ndim - 1)), cond, mixed)", COND,
      "the guidance interval guides outside its noise range and not inside it"),
    M("min-snr-clamp-min", "losses.py",
      "clipped = snr.clamp(max=gamma)", "clipped = snr.clamp(min=gamma)", RECIPES,
      "min-SNR weights clip the SNR from below instead of above"),
    M("min-snr-eps-undivided", "losses.py",
      "        return clipped / snr\n", "        return clipped\n", RECIPES,
      "min-SNR weight for eps-prediction without the division by SNR"),
    M("min-snr-v-as-eps", "losses.py",
      "return clipped / (snr + 1.0)", "return clipped / snr", RECIPES,
      "min-SNR weight for v-prediction divides by SNR (the eps form) instead of SNR + 1"),
    M("stratify-wrong-stratum", "train/timesteps.py",
      "return (positions + u.double()) / n", "return (positions + u.double()) / (n + 1)",
      RECIPES, "stratified t: strata of width 1/(n+1), so the top of [0, 1) is never drawn"),
    M("threads-load-ignored", "runtime.py",
      "return max(1, min(threads_now, (os.cpu_count() or 1) - taken))",
      "return max(1, min(threads_now, (os.cpu_count() or 1)))", RECIPES,
      "--threads auto ignores the load other programs put on the machine"),
    M("to-float-mirror-dropped", "data/images.py",
      "row.copy_(src.flip(-1) if flip else src)", "row.copy_(src)", DATA,
      "large uint8 images are never mirrored by the random flip"),
    M("to-float-mirror-inverted", "data/images.py",
      "u8 = mirror_rows(u8, mirror)", "u8 = mirror_rows(u8, ~mirror)", DATA,
      "small uint8 images are mirrored where they should not be and kept where they should"),
    M("batch-chw-swaps-h-w", "data/loader.py",
      "row[...] = img.transpose(2, 0, 1)", "row[...] = img.transpose(2, 1, 0)", DATA,
      "batches of large images from files come out transposed (H and W swapped)"),
    M("slot-not-copied-out", "data/loader.py",
      "u8 = u8.clone()", "pass", "tests/test_data_scale.py",
      "a batch handed out is the worker's shared-memory slot itself, refilled under it"),
    M("slot-never-released", "data/loader.py",
      "self.free[slot] = 1", "self.free[slot] = 0", "tests/test_data_scale.py",
      "workers never get their slots back and allocate fresh shared memory for every batch"),
    M("workers-not-niced", "data/loader.py",
      "os.nice(WORKER_NICENESS)", "os.nice(0)", "tests/test_data_scale.py",
      "decoding workers compete with the trainer at its own priority"),
]


# ---- running ----------------------------------------------------------------------------------

def locate(m: Mutant) -> str:
    """'ok', 'stale' (snippet gone) or 'ambiguous' (found more than once)."""
    path = ROOT / "src" / "ddpmkit" / m.path
    if not path.exists():
        return "stale"
    n = path.read_text().count(m.old)
    return "ok" if n == 1 else ("stale" if n == 0 else "ambiguous")


def scratch_copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)


def run_pytest(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    """pytest -x over ``tests`` inside ``tree`` (its src first on the path); (rc, tail).

    rc None: timed out (the whole process group is killed)."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=-m 'not slow'", *tests]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, ""
    return proc.returncode, out[-3000:]


def check_imports_from(tree: Path) -> None:
    """The scratch copy, not an installed ddpmkit, must be what the tests import."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    got = subprocess.run([sys.executable, "-c", "import ddpmkit; print(ddpmkit.__file__)"],
                         cwd=tree, env=env, capture_output=True, text=True).stdout.strip()
    if not got.startswith(str(tree)):
        sys.exit(f"error: the scratch copy imports ddpmkit from {got or '?'}, not from "
                 f"{tree / 'src'}: an installed ddpmkit shadows PYTHONPATH")


def run_mutant(m: Mutant, timeout: float) -> tuple[str, float, str]:
    """(status, seconds, pytest tail): killed | survived | timeout | error."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        tree = Path(tmp)
        scratch_copy(tree)
        target = tree / "src" / "ddpmkit" / m.path
        target.write_text(target.read_text().replace(m.old, m.new, 1))
        rc, tail = run_pytest(tree, m.tests, timeout)
    dt = time.perf_counter() - t0
    if rc is None:
        return "timeout", dt, ""
    if rc == 0:
        return "survived", dt, tail
    if rc in (1, 2):  # tests failed, or collection failed (e.g. the module no longer imports)
        return "killed", dt, tail
    return "error", dt, tail  # 3 internal error, 4 usage, 5 no tests collected


def baseline(mutants: list[Mutant], timeout: float) -> None:
    files = sorted({t.split("::")[0] for m in mutants for t in m.tests})
    print(f"baseline: the unmutated copy against {len(files)} test files ...", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        tree = Path(tmp)
        scratch_copy(tree)
        check_imports_from(tree)
        rc, tail = run_pytest(tree, tuple(files), timeout * 4)
    if rc != 0:
        print(tail)
        sys.exit(f"error: the unmutated tests do not pass (rc {rc}); fix them first, or every "
                 "mutant would look killed")
    print(f"baseline: green in {time.perf_counter() - t0:.0f} s", flush=True)


def describe_tree() -> str:
    """The commit the run tested, and whether the tree had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *COPIED], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head}" + (" + uncommitted changes" if dirty else "")


def select(names: list[str] | None) -> list[Mutant]:
    if not names:
        return MUTANTS
    wanted = [n for arg in names for n in arg.split(",") if n]
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        sys.exit(f"error: no mutant named {', '.join(unknown)} (see --list)")
    return [known[n] for n in wanted]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--list", action="store_true", help="list the mutants (and stale ones), run "
                   "nothing")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only these mutants (repeat, or NAME,NAME)")
    p.add_argument("-j", "--jobs", type=int, default=1,
                   help="mutants run in parallel (default: %(default)s; each pytest uses one "
                   "thread)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds per mutant's test run before it counts as a timeout "
                   "(default: %(default)s)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the unmutated run of the selected test files")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print the pytest output of survivors and errors")
    args = p.parse_args(argv)
    mutants = select(args.only)
    located = {m.name: locate(m) for m in mutants}

    if args.list:
        for m in mutants:
            flag = "" if located[m.name] == "ok" else f"  [{located[m.name].upper()}]"
            print(f"{m.name:32s} {m.path:20s} {m.what}{flag}")
            print(f"{'':32s} tests: {' '.join(m.tests)}")
        bad = [n for n, s in located.items() if s != "ok"]
        print(f"\n{len(mutants)} mutants; {len(bad)} stale or ambiguous"
              + (f": {', '.join(bad)}" if bad else ""))
        return 0

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python scripts/mutants.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# ddpmkit mutation testing, {now}: {command}", flush=True)
    print(f"# tree: {describe_tree()}; {os.cpu_count()} CPUs, Python "
          f"{sys.version.split()[0]}, {len(mutants)} mutants, {args.jobs} job(s)", flush=True)
    runnable = [m for m in mutants if located[m.name] == "ok"]
    if not args.no_baseline and runnable:
        baseline(runnable, args.timeout)
    results: dict[str, tuple[str, float, str]] = {}
    for m in mutants:
        if located[m.name] != "ok":
            results[m.name] = (located[m.name], 0.0, "")
            print(f"{located[m.name]:9s}    -   {m.name}: snippet "
                  f"{'not found' if located[m.name] == 'stale' else 'found more than once'} "
                  f"in src/ddpmkit/{m.path}", flush=True)
    t_all = time.perf_counter()

    def one(m: Mutant) -> None:
        status, dt, tail = run_mutant(m, args.timeout)
        results[m.name] = (status, dt, tail)
        print(f"{status:9s} {dt:5.0f}s {m.name}: {m.what}", flush=True)
        if args.verbose and status in ("survived", "error"):
            print("    " + tail.replace("\n", "\n    "), flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, runnable))

    counts = {s: [n for n, r in results.items() if r[0] == s]
              for s in ("killed", "timeout", "survived", "error", "stale", "ambiguous")}
    caught = len(counts["killed"]) + len(counts["timeout"])
    scored = caught + len(counts["survived"])
    score = 100.0 * caught / scored if scored else 0.0
    print(f"\nmutation score: {caught}/{scored} = {score:.1f}% "
          f"({len(counts['killed'])} killed, {len(counts['timeout'])} timed out, "
          f"{len(counts['survived'])} survived; {len(counts['error'])} errors, "
          f"{len(counts['stale'])} stale, {len(counts['ambiguous'])} ambiguous; not scored) "
          f"in {time.perf_counter() - t_all:.0f} s")
    by_name = {m.name: m for m in mutants}
    for status in ("survived", "error", "stale", "ambiguous"):
        for n in counts[status]:
            print(f"  {status}: {n} ({by_name[n].path}): {by_name[n].what}")
    return 1 if counts["survived"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
