"""Sample quality and test bound against training time, for each training recipe (issue 14).

    python benchmarks/time_to_quality.py                                   # every recipe, 10 min
    python benchmarks/time_to_quality.py --recipes baseline min-snr stratified --minutes 5 \
        --parallel 2 --out-dir benchmarks/results/time_to_quality

What "minutes" means here: CPU minutes of a one-thread training process, read with
``time.process_time()`` plus finished child processes' CPU time (the C++ compiler that
torch.compile runs) over the training steps alone (model build, checkpoint writes and all
measuring are outside it). A one-thread process's CPU time barely depends on what else runs
on the machine, so recipes can train side by side (``--parallel``, one thread each) and a
shared machine gives the same figures as a quiet one. It is not wall time of the default
``ddpmkit train``, which uses both cores: the step counts in results.json convert (on a quiet
2-core machine the default 2-thread run does ~275 steps per wall minute, README).

Every recipe starts from the digits preset (same seed, same data order) and changes one
thing (RECIPES below). Each training process saves a checkpoint at every ``--every`` CPU
minutes; after training, the same process measures every checkpoint's EMA weights:
- ``fd``: Frechet distance of ``--num`` samples (the preset's sampler: DPM-Solver++ 2M, 20
  calls, seeds 0..num-1) to the 297 test digits, in the features of ddpmkit's digit
  classifier (ddpmkit.metrics), with the real-digit FD at the same N for reference;
- ``recognisable``: the share of those samples the classifier reads with confidence >= 0.9;
- ``bound``: the test negative log-likelihood bound in bits/dim, estimated with ``--bound-t``
  timesteps per test digit (stratified: one from each of bound_t equal blocks of the T steps,
  an unbiased estimate of the full sum) instead of all T = 1000 that ``ddpmkit eval`` uses.
  Every recipe and checkpoint draws the same t and noise (seed 0), so the comparisons are
  paired; the reported standard error is that of the mean over the 297 digits (it includes
  how much the digits themselves differ, so it overstates the noise of a comparison).
Writes results.json, results.md and quality.png (FD, recognisable share and bound against
minutes, one line per recipe) to --out-dir.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

# Changes to the digits preset as it is now (sigmoid schedule, v-prediction, since the third
# sweep). The first two sweeps in benchmarks/results/time_to_quality ran on the preset before
# (cosine, eps): their "baseline" is today's "cosine-eps", their "v-pred" today's "cosine",
# their "v-min-snr" today's "cosine-min-snr"; the other names are the same change to either.
# The third sweep's "sigmoid" is today's "eps-pred" and its "sigmoid-v" today's "baseline".
RECIPES: dict[str, dict] = {
    "baseline": {},
    "cosine-eps": {"diffusion": {"schedule": "cosine", "prediction": "eps"}},
    "cosine": {"diffusion": {"schedule": "cosine"}},
    "eps-pred": {"diffusion": {"prediction": "eps"}},
    "min-snr": {"diffusion": {"min_snr_gamma": 5.0}},
    "cosine-min-snr": {"diffusion": {"schedule": "cosine", "min_snr_gamma": 5.0}},
    "stratified": {"train": {"stratified_t": True}},
    "ema-short": {"train": {"ema_half_life": 5_000.0}},
    "no-ema-rampup": {"train": {"ema_rampup": 0.0}},
    "no-warmup": {"train": {"warmup_steps": 0}},
    "no-dropout": {"model": {"dropout": 0.0}},
    "lr-2e-3": {"train": {"lr": 2e-3}},
    "batch-64": {"train": {"batch_size": 64}},
    "small-net": {"model": {"channel_mult": [1, 2], "num_res_blocks": 1}},
    "compile": {"train": {"compile": True}},
    "nll": {"diffusion": {"variance": "learned_range", "loss": "hybrid"}},
}


# ---- one recipe, in its own process ------------------------------------------------------------

def recipe_config(name: str):
    from ddpmkit import config as C
    base = C.RUN_PRESETS["digits"]
    overrides = {s: dict(v) for s, v in RECIPES[name].items()}
    # no checkpoints but ours, and every one kept
    overrides.setdefault("train", {}).update(max_steps=0, max_minutes=0.0, keep_checkpoints=1000,
                                             checkpoint_every=10**9, threads=1)
    return C.RunConfig.from_dict(overrides, base=base)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children: torch.compile runs the C++
    compiler in child processes, and its cost belongs to the recipe."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def train_recipe(name: str, out: Path, minutes: float, every: float) -> list[dict]:
    """Train for ``minutes`` of training-loop CPU time; a checkpoint at every ``every``."""
    import torch

    from ddpmkit.runtime import tune_allocator
    from ddpmkit.train.trainer import _Trainer

    torch.set_num_threads(1)
    tune_allocator()
    out.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(recipe_config(name), out, time.time())
    trainer.restore(None, None)
    trainer._wrap_for_training()
    marks, cpu, wall = [], 0.0, 0.0
    next_mark = every
    while cpu < minutes * 60 - 1e-9:
        c0, w0 = cpu_seconds(), time.perf_counter()
        trainer.step()
        cpu += cpu_seconds() - c0
        wall += time.perf_counter() - w0
        if cpu >= next_mark * 60 or cpu >= minutes * 60:
            trainer._check_health()
            path = trainer.save()  # outside the timed span
            marks.append({"minutes": round(cpu / 60, 3), "step": trainer.step_count,
                          "wall_minutes": round(wall / 60, 3), "load": os.getloadavg()[0],
                          "checkpoint": str(path)})
            print(json.dumps({"recipe": name, **marks[-1]}), flush=True)
            next_mark += every
    return marks


def bound_estimate(run, x0, levels: int, k: int, seed: int = 0) -> tuple[float, float]:
    """Stratified estimate of the test bound (bits/dim) and its standard error: per example,
    L_T + (T / k) * sum of one L_t from each of k equal blocks of steps (DDPM eq. 5)."""
    import torch

    diffusion, T = run.diffusion, run.diffusion.num_timesteps
    if T % k:
        raise SystemExit(f"--bound-t {k} must divide T = {T}")
    g = torch.Generator().manual_seed(seed)
    totals = diffusion.prior_bpd(x0).double()
    with torch.inference_mode():
        for s in range(k):
            t = s * (T // k) + torch.randint(0, T // k, (x0.shape[0],), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            x_t = diffusion.q_sample(x0, t, noise)
            out = diffusion.call_model(run.model, x_t, t, None)
            totals += (T / k) * diffusion.vb_terms_bpd(out, x0, x_t, t, levels=levels,
                                                      clip_denoised=True).double()
    return float(totals.mean()), float(totals.std() / math.sqrt(len(totals)))


def sample_quality(run, num: int, first_seed: int = 0) -> dict:
    """digit_quality of ``num`` samples with the preset's sampler, seeds first_seed + 0..num-1."""
    from ddpmkit.metrics import digit_quality
    from ddpmkit.sampling import sample

    sc = run.config.sample
    x = sample(run.model, run.diffusion, (num, *run.data_shape), method=sc.sampler,
               steps=sc.steps or None, spacing=sc.spacing, clip_denoised=True,
               seeds=range(first_seed, first_seed + num))
    return digit_quality(x)


def measure_checkpoint(path: str, num: int, bound_t: int) -> dict:
    from ddpmkit.data import load_data
    from ddpmkit.loading import load

    run = load(path, device="cpu")
    q = sample_quality(run, num)
    test = load_data(run.config.data, "test")
    bound, se = bound_estimate(run, test.x.float(), test.levels, bound_t)
    return {"fd": q["fd"], "kd": q["kd"], "recognisable": q["recognisable"],
            "confidence": q["confidence"], "bound": bound, "bound_se": se}


def seed_spread(rows: list[dict], num: int, sets: int) -> dict | None:
    """FD and recognisable share of the baseline's last checkpoint for ``sets`` disjoint sets
    of ``num`` seeds (set 0 is the one in the table): how far seed noise alone moves them."""
    import torch

    from ddpmkit.loading import load
    base = [r for r in rows if r["recipe"] == "baseline"]
    if sets < 2 or not base:
        return None
    torch.set_num_threads(1)
    run = load(base[-1]["checkpoint"], device="cpu")
    qs = [base[-1]] + [sample_quality(run, num, k * num) for k in range(1, sets)]
    return {"checkpoint": base[-1]["checkpoint"], "step": base[-1]["step"], "num": num,
            "first_seeds": [k * num for k in range(sets)], "fd": [q["fd"] for q in qs],
            "recognisable": [q["recognisable"] for q in qs]}


def worker(args) -> None:
    out = Path(args.out_dir) / "runs" / args.worker
    load = os.getloadavg()[0]
    marks = train_recipe(args.worker, out, args.minutes, args.every)
    rows = []
    for m in marks:
        rows.append({"recipe": args.worker, **m, "load_at_start": load,
                     **measure_checkpoint(m["checkpoint"], args.num, args.bound_t)})
        print(json.dumps(rows[-1]), flush=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


# ---- the sweep ---------------------------------------------------------------------------------

def sweep(args) -> list[dict]:
    """One worker process per recipe, ``--parallel`` at a time, each with one thread."""
    # One compile thread: inductor then compiles in this process and its C++ compiler runs
    # as waited-for children, so cpu_seconds() sees the cost (a worker pool's would not).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    pending, running, rows = list(args.recipes), [], []
    forward = ["--minutes", str(args.minutes), "--every", str(args.every), "--num",
               str(args.num), "--bound-t", str(args.bound_t), "--out-dir", args.out_dir]
    done = {}
    if args.reuse:  # recipes measured by an earlier sweep into the same --out-dir
        done = {n: Path(args.out_dir, "runs", n, "rows.json") for n in pending}
        done = {n: json.loads(f.read_text()) for n, f in done.items() if f.is_file()}
        pending = [n for n in pending if n not in done]
        for n, got in done.items():
            if abs(got[-1]["minutes"] - args.minutes) > 0.1:  # the table shows it
                print(f"note: {n} was trained for {got[-1]['minutes']:.1f} CPU minutes, not "
                      f"--minutes {args.minutes:g}", flush=True)
        print(f"reusing {', '.join(done) or 'none'}", flush=True)
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            cmd = [sys.executable, __file__, "--worker", name, *forward]
            running.append((name, subprocess.Popen(cmd, env=env)))
        time.sleep(1.0)
        for item in list(running):
            name, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                raise SystemExit(f"recipe {name} failed (exit {proc.returncode})")
            done[name] = json.loads(Path(args.out_dir, "runs", name, "rows.json").read_text())
    for name in args.recipes:  # in the order asked for
        rows += done[name]
    return rows


def report(rows: list[dict], args) -> None:
    import torch

    from ddpmkit.metrics import real_digit_baseline
    out = Path(args.out_dir)
    real = [real_digit_baseline(n=min(args.num, 1500), seed=s)["fd"] for s in range(3)]
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores", "torch": torch.__version__,
            "command": " ".join(["python", *sys.argv]), "minutes": "training-loop CPU "
            "minutes of a 1-thread process and its compiler children (time.process_time + "
            "os.times children, measuring excluded)",
            "num": args.num, "bound_t": args.bound_t, "real_digits_fd_at_num": real,
            "recipes": {r: RECIPES[r] for r in args.recipes}}
    spread = seed_spread(rows, args.num, args.seed_sets)
    meta["seed_spread"] = spread
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| recipe | CPU min | step | FD | recognisable | test bound, bits/dim |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['minutes']:.1f} | {r['step']} | {r['fd']:.2f} | "
                     f"{r['recognisable']:.3f} | {r['bound']:.3f} ± {r['bound_se']:.3f} |")
    note = (f"{meta['date']}, {meta['machine']}, torch {meta['torch']}; minutes: "
            f"{meta['minutes']}; FD and recognisable share of {args.num} samples (DPM-Solver++ "
            f"2M, 20 calls), real digits' FD at that N: {sum(real) / 3:.2f}; bound estimated "
            f"with {args.bound_t} stratified t per test digit (± one standard error); "
            f"`{meta['command']}`; 1-min load average at each recipe's start and at each "
            f"checkpoint in results.json.")
    lines += ["", *against_baseline(rows)]
    if spread:
        lines += ["", f"Seed noise: the baseline at step {spread['step']}, {len(spread['fd'])} "
                  f"disjoint sets of {args.num} seeds: FD "
                  + ", ".join(f"{v:.2f}" for v in spread["fd"]) + "; recognisable "
                  + ", ".join(f"{v:.3f}" for v in spread["recognisable"]) + "."]
    (out / "results.md").write_text("\n".join(lines) + "\n\n" + note + "\n")
    plot(rows, out / "quality.png", sum(real) / 3)
    print("\n".join(lines))
    print(note)


def interpolate(rows: list[dict], x_key: str, x: float, y_key: str) -> float | None:
    """``y_key`` of a recipe's checkpoints, linear in ``x_key`` at ``x``; None outside them
    (by more than 1%: the last checkpoint of a 5-minute run is at 5.004 minutes)."""
    pts = sorted((r[x_key], r[y_key]) for r in rows)
    for end_x, end_y in (pts[0], pts[-1]):
        if abs(x - end_x) <= 0.01 * abs(end_x):
            return end_y
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
    return None


def against_baseline(rows: list[dict]) -> list[str]:
    """Each recipe minus the baseline at the same CPU minutes and at the same step (the
    baseline linearly interpolated between its checkpoints): steps per CPU minute move with
    the machine's load, so a recipe trained beside other jobs can look slower or faster."""
    base = [r for r in rows if r["recipe"] == "baseline"]
    if not base:
        return []
    keys = ("fd", "recognisable", "bound")
    lines = ["Minus the baseline, at equal CPU minutes | at equal steps (FD, recognisable, "
             "bound; lower FD and bound, higher recognisable are better):", "",
             "| recipe | CPU min | step | ΔFD | Δrec. | Δbound | ΔFD | Δrec. | Δbound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["recipe"] == "baseline":
            continue
        cells = []
        for x_key in ("minutes", "step"):
            for k in keys:
                b = interpolate(base, x_key, r[x_key], k)
                cells.append("–" if b is None else f"{r[k] - b:+.3f}" if k != "fd"
                             else f"{r[k] - b:+.2f}")
        lines.append(f"| {r['recipe']} | {r['minutes']:.1f} | {r['step']} | "
                     + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], path: Path, real_fd: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.4))
    panels = (("fd", f"FD to test digits (real: {real_fd:.2f})"),
              ("recognisable", "recognisable share (conf. >= 0.9)"),
              ("bound", "test bound, bits/dim"))
    x_axes = (("minutes", "training CPU minutes (1 thread)"), ("step", "training steps"))
    for row, (x_key, x_label) in zip(axes, x_axes, strict=True):
        for ax, (key, title) in zip(row, panels, strict=True):
            for recipe in dict.fromkeys(r["recipe"] for r in rows):
                pts = [(r[x_key], r[key]) for r in rows if r["recipe"] == recipe]
                ax.plot(*zip(*pts, strict=True), marker="o", label=recipe)
            ax.set_title(title)
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--minutes", type=float, default=10.0, help="CPU minutes per recipe")
    p.add_argument("--every", type=float, default=1.0, help="CPU minutes between measurements")
    p.add_argument("--parallel", type=int, default=2, help="recipes trained at once")
    p.add_argument("--num", type=int, default=500, help="samples per FD measurement")
    p.add_argument("--bound-t", type=int, default=100, help="timesteps per test digit")
    p.add_argument("--seed-sets", type=int, default=2,
                   help="disjoint seed sets of --num samples for the baseline's last "
                        "checkpoint: the seed noise of FD and the recognisable share")
    p.add_argument("--out-dir", default="benchmarks/results/time_to_quality")
    p.add_argument("--reuse", action="store_true",
                   help="read recipes already measured into --out-dir (their runs/NAME/"
                        "rows.json) instead of training them again: adds recipes to a sweep")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    report(sweep(args), args)


if __name__ == "__main__":
    main()
