"""Sample quality against network calls for every sampler (issue "Fast sampling").

For a digits checkpoint: Frechet / kernel distance in the features of ddpmkit's own digit
classifier (metrics.py) between N samples and the 297 held-out test digits, next to the same
figure for N real training digits (what "as good as data" reads). For a 2-D checkpoint:
energy distance to fresh data points, next to a second fresh data sample. Every sampler runs
at each budget of network calls with the same per-sample seeds, and its wall time is taken.

    python benchmarks/quality_vs_steps.py --checkpoint runs/digits --num 500 \
        --out-dir benchmarks/results/digits
    python benchmarks/quality_vs_steps.py --checkpoint runs/moons --num 2000 \
        --out-dir benchmarks/results/moons

Writes results.json, results.md (a table) and quality.png into --out-dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from ddpmkit import sample, viz
from ddpmkit.loading import clip_denoised_for, load

DEFAULT_SAMPLERS = ("ancestral", "ddim", "dpm++2m", "dpm++3m", "heun")
DEFAULT_CALLS = (5, 10, 20, 50, 100, 250, 1000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num", type=int, default=500, help="samples per point")
    p.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS))
    p.add_argument("--calls", default=",".join(map(str, DEFAULT_CALLS)))
    p.add_argument("--max-calls-fast", type=int, default=0,
                   help="cap the budgets of all samplers but ancestral (0: no cap), to save "
                        "time on a CPU; ancestral still runs every budget")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    run = load(args.checkpoint, device="cpu")
    points = run.kind == "points"
    name = run.config.data.name
    if points:
        from ddpmkit.metrics import points_quality

        def score(x):
            q = points_quality(x, name)
            return {"energy": q["energy"], "mmd": q["mmd"], "recall": q["recall"],
                    "baseline_energy": q["baseline"]["energy"]}
        metric = "energy"
    else:
        from ddpmkit.metrics import digit_quality, real_digit_baseline

        def score(x):
            q = digit_quality(x)
            return {"fd": q["fd"], "kd": q["kd"], "classes": q["classes_present"],
                    "confidence": q["confidence"]}
        metric = "fd"

    T = run.diffusion.num_timesteps
    calls = [c for c in (int(s) for s in args.calls.split(",")) if c <= T]
    rows = []
    shape = (args.num, *run.data_shape)
    for sampler in args.samplers.split(","):
        for n_calls in calls:
            if sampler != "ancestral" and args.max_calls_fast and n_calls > args.max_calls_fast:
                continue
            t0 = time.perf_counter()
            x = sample(run.model, run.diffusion, shape, method=sampler, steps=n_calls,
                       clip_denoised=clip_denoised_for(run.kind), seeds=range(args.num))
            wall = time.perf_counter() - t0
            row = {"sampler": sampler, "calls": n_calls, "wall_s": wall, **score(x)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    baseline = None
    if not points:
        # Real digits at the same N, three draws: the spread says what "within noise" means.
        draws = [real_digit_baseline(n=args.num, seed=s) for s in range(3)]
        baseline = {"fd": sum(b["fd"] for b in draws) / 3, "kd": sum(b["kd"] for b in draws) / 3,
                    "fd_draws": [b["fd"] for b in draws]}
    else:
        baseline = {"energy": rows[0]["baseline_energy"]}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(run.path), "step": run.step, "data": name, "num": args.num,
            "date": date.today().isoformat(), "machine": f"{platform.machine()}, "
            f"{torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
            "torch": torch.__version__, "baseline_real_data": baseline}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    curves: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        curves.setdefault(r["sampler"], []).append((r["calls"], r[metric]))
    viz.plot_quality_vs_steps(curves, out / "quality.png",
                              ylabel=f"{metric} (lower is better; real data: "
                                     f"{baseline[metric]:.3g})")
    head = "| sampler | " + " | ".join(f"{c} calls" for c in calls) + " |"
    lines = [head, "|---" * (len(calls) + 1) + "|"]
    for sampler, pts in curves.items():
        cells = dict(pts)
        walls = {r["calls"]: r["wall_s"] for r in rows if r["sampler"] == sampler}
        lines.append(f"| {sampler} | " + " | ".join(
            f"{cells[c]:.3g} ({walls[c]:.0f}s)" if c in cells else "-" for c in calls) + " |")
    table = "\n".join(lines)
    note = (f"{metric} of {args.num} samples (wall time in brackets) for {name}, checkpoint "
            f"step {run.step}; real data at the same N: {baseline[metric]:.3g}. "
            f"{meta['date']}, {meta['machine']}, torch {meta['torch']}.")
    (out / "results.md").write_text(table + "\n\n" + note + "\n")
    print(table)
    print(note)


if __name__ == "__main__":
    main()
