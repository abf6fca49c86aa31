"""Training speed of the default digits run alone and beside one busy process (issue 14, item 6).

    python benchmarks/busy_machine.py                          # all variants, 150 steps each
    python benchmarks/busy_machine.py --steps 60 --variants torch-default one-thread

Each variant is a fresh ``ddpmkit train`` process (the default digits preset, ``--max-steps
STEPS``); its speed is the median of the ``steps_per_s`` column of metrics.csv over the rows
after the first (the first holds start-up). Every variant runs once on the machine as it is
("alone") and once while a competing process (a Python busy loop, one core) runs ("busy").
The busy phase starts ``--settle`` seconds after the competitor, so the 1-minute load average
(which ``--threads 0`` reads) has risen: after 60 s it shows ~0.63 of the competitor.

Variants:
  torch-default  --threads <cores>: PyTorch's default, one thread per core
  one-thread     --threads 1
  passive        --threads <cores> with OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead
                 of spinning while they wait; it must be set before torch loads, hence per
                 process)
  auto           --threads 0, ddpmkit's default: the free cores by the 1-minute load average

Reads: the slowdown (alone / busy steps/s) per variant; a busy core should cost about the share
of the CPU it takes (2 cores, 1 taken: ~2x for a 2-thread run, ~1x for a 1-thread one), not
3-25x. Run it on an otherwise quiet machine: the "alone" figures assume no other load (the
load average at each start is recorded). Writes results.json and results.md to --out-dir.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

VARIANTS = ("torch-default", "one-thread", "passive", "auto")
BUSY_LOOP = "while True: pass"


def variant_args(name: str) -> tuple[list[str], dict[str, str]]:
    """Extra ddpmkit flags and environment of one variant."""
    cores = str(os.cpu_count() or 1)
    return {"torch-default": (["--threads", cores], {}),
            "one-thread": (["--threads", "1"], {}),
            "passive": (["--threads", cores], {"OMP_WAIT_POLICY": "PASSIVE"}),
            "auto": (["--threads", "0"], {})}[name]


def run_training(name: str, steps: int, log_every: int, workdir: Path) -> dict:
    """One fresh training process; its median steps/s and what it said about threads."""
    flags, extra_env = variant_args(name)
    out = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    env = {**os.environ, **extra_env}
    env.pop("OMP_NUM_THREADS", None)  # ddpmkit's auto treats it as the user's choice
    cmd = [sys.executable, "-m", "ddpmkit", "train", "--config", "digits", "--max-steps",
           str(steps), "--log-every", str(log_every), "--checkpoint-every", str(steps),
           "--sample-num", "4", "--no-progress", "--out", str(out), *flags]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: ddpmkit train failed:\n{proc.stderr[-2000:]}")
    with open(out / "metrics.csv") as f:
        rates = [float(r["steps_per_s"]) for r in csv.DictReader(f)][1:]
    note = next((ln for ln in proc.stdout.splitlines() if "thread(s) instead of" in ln),
                "")
    return {"variant": name, "steps_per_s": statistics.median(rates),
            "slowest_window_steps_per_s": min(rates), "wall_s": wall,
            "load_at_start": load, "auto_note": note}


def measure(variants: list[str], steps: int, log_every: int, workdir: Path,
            settle: float) -> list[dict]:
    rows = []
    for v in variants:
        rows.append({"condition": "alone", **run_training(v, steps, log_every, workdir)})
        print(json.dumps(rows[-1]), flush=True)
    competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(settle)
        for v in variants:
            rows.append({"condition": "busy", **run_training(v, steps, log_every, workdir)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        competitor.kill()
        competitor.wait()
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["variant"], r["condition"]): r for r in rows}
    lines = ["| variant | alone, steps/s | with 1 busy process, steps/s | slowdown | "
             "slowest log window (busy), steps/s |", "|---|---|---|---|---|"]
    for v in dict.fromkeys(r["variant"] for r in rows):
        a, b = by.get((v, "alone")), by.get((v, "busy"))
        if a and b:
            lines.append(f"| {v} | {a['steps_per_s']:.2f} | {b['steps_per_s']:.2f} | "
                         f"{a['steps_per_s'] / b['steps_per_s']:.2f}x | "
                         f"{b['slowest_window_steps_per_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per variant")
    p.add_argument("--log-every", type=int, default=10, help="steps per steps/s reading")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--settle", type=float, default=60.0,
                   help="seconds between starting the competitor and the first busy run")
    p.add_argument("--out-dir", default="benchmarks/results/busy_machine")
    args = p.parse_args()
    if args.steps < 3 * args.log_every:
        p.error("--steps must be at least 3 * --log-every (the first row is dropped)")
    with tempfile.TemporaryDirectory(prefix="busy-machine-") as tmp:
        rows = measure(args.variants, args.steps, args.log_every, Path(tmp), args.settle)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores", "torch": torch.__version__, "steps": args.steps,
            "command": " ".join(["python", *sys.argv])}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = table(rows)
    note = (f"{meta['date']}, {meta['machine']}, torch {meta['torch']}; median steps/s of "
            f"{args.steps} default digits steps; `{meta['command']}`. Load averages at each "
            "start are in results.json.")
    (out / "results.md").write_text(text + "\n\n" + note + "\n")
    print(text)
    print(note)


if __name__ == "__main__":
    main()
