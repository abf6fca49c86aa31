"""Each CPU speed-up of ddpmkit's U-Net step, switched on and off round by round in one process.

    python benchmarks/ablate.py                       # all switches, batch 16, 8 rounds
    python benchmarks/ablate.py --only dropout optimizer --rounds 12

For every switch the same training step (or forward call) runs with the switch on and off in
turn (on, off, on, off, ...) after a warm-up, so that machine noise hits both alike; printed
are the medians and the median of the per-round ratios off/on (> 1: the switch pays).
The process tunes the allocator as ``ddpmkit train`` does. The allocator setting itself
cannot be switched fairly inside one process (glibc's dynamic mmap threshold has a memory of
past frees): measure it across processes with
``python benchmarks/speed.py --contenders ddpmkit ddpmkit-default-malloc``.

Switches:
  dropout    ddpmkit.nn.dropout's 16-bit CPU mask  vs  torch.nn.functional.dropout
  optimizer  fused AdamW (make_optimizer)          vs  torch.optim.AdamW's default (foreach),
             timing ``optimizer.step()`` alone (2% of a step: whole-step rounds miss it)
  layout     channels_last for >= 16x16 maps       vs  NCHW everywhere
  fold       folded upsample (one transposed conv) vs  nearest upsample + 3x3 conv
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from speed import build_ours  # benchmarks/speed.py, next to this script
from torch.nn import functional as F

from ddpmkit.diffusion import GaussianDiffusion
from ddpmkit.nn import dropout as dropout_mod
from ddpmkit.nn import unet as unet_mod
from ddpmkit.runtime import tune_allocator
from ddpmkit.schedules import linear_betas
from ddpmkit.train.ema import EMA
from ddpmkit.train.trainer import make_optimizer

SWITCHES = ("dropout", "optimizer", "layout", "fold")


def build(batch: int):
    model = build_ours()  # the network speed.py times (seed 0, outputs depend on inputs)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (batch, 3, 32, 32), generator=g).float() / 127.5 - 1.0
    t = torch.randint(0, 1000, (batch,), generator=g)
    return model, x0, t


def train_step(model, x0, t, optimizer) -> Callable[[], None]:
    diffusion = GaussianDiffusion(linear_betas(1000))
    ema = EMA(model)
    model.train()

    def step():
        diffusion.training_losses(model, x0, t)["loss"].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, 0.9999)
    return step


def setting(switch: str, on: bool) -> None:
    """Put the module-level switch ``switch`` into state ``on``."""
    if switch == "dropout":
        dropout_mod.Dropout.forward = (_ours_dropout if on else _torch_dropout)
    elif switch == "layout":
        unet_mod.CPU_CHANNELS_LAST_MIN_PIXELS = _DEFAULTS["layout"] if on else 10**12
    elif switch == "fold":
        unet_mod.FOLDED_UPSAMPLE_MIN_PIXELS = _DEFAULTS["fold"] if on else 10**12


_DEFAULTS = dict(layout=unet_mod.CPU_CHANNELS_LAST_MIN_PIXELS,
                 fold=unet_mod.FOLDED_UPSAMPLE_MIN_PIXELS)
_ours_dropout = dropout_mod.Dropout.forward


def _torch_dropout(self, x):
    return F.dropout(x, self.p, self.training)


def alternate(fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    ratios = [off / on for on, off in zip(times["on"], times["off"], strict=True)]
    return dict(on_median_s=statistics.median(times["on"]),
                off_median_s=statistics.median(times["off"]),
                ratio_median=statistics.median(ratios), ratio_min=min(ratios),
                ratio_max=max(ratios), times=times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--only", nargs="+", choices=SWITCHES, default=list(SWITCHES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    tuned = tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# batch {args.batch}, {args.rounds} rounds, {torch.get_num_threads()} threads, "
          f"allocator tuned: {tuned}, torch {torch.__version__}", flush=True)
    out = {}
    for switch in args.only:
        for what in ("train", "forward"):
            if switch == "optimizer" and what == "forward":
                continue
            if switch == "dropout" and what == "forward":
                continue  # dropout is off in eval mode
            model, x0, t = build(args.batch)
            if switch == "optimizer":
                # The optimizer step alone (a whole step's noise would hide it): gradients
                # from one backward pass, then the two optimizers over the same parameters
                # in turn. They share nothing but the parameters and gradients.
                GaussianDiffusion(linear_betas(1000)).training_losses(
                    model.train(), x0, t)["loss"].mean().backward()
                fused = make_optimizer(model, 2e-4)
                default = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.999),
                                            weight_decay=0.0)
                fns = {"on": fused.step, "off": default.step}
                what = "opt.step"
            else:
                if what == "train":
                    step = train_step(model, x0, t, make_optimizer(model, 2e-4))
                else:
                    model.eval()

                    def step(model=model, x0=x0, t=t):
                        with torch.inference_mode():
                            model(x0, t)

                def with_state(on, step=step, switch=switch):
                    def fn():
                        setting(switch, on)
                        step()
                    return fn
                fns = {"on": with_state(True), "off": with_state(False)}
            r = alternate(fns, args.rounds, args.warmup)
            setting(switch, True)
            out[f"{switch}/{what}"] = r
            print(f"{switch:9s} {what:7s}  on {r['on_median_s'] * 1e3:7.0f} ms  off "
                  f"{r['off_median_s'] * 1e3:7.0f} ms  off/on median {r['ratio_median']:.3f} "
                  f"(rounds {r['ratio_min']:.2f}-{r['ratio_max']:.2f})", flush=True)
    print(json.dumps(dict(batch=args.batch, rounds=args.rounds, threads=torch.get_num_threads(),
                          results=out)))


if __name__ == "__main__":
    main()
