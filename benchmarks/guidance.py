"""Classifier-free guidance on digits, and inpainting (issue "Conditioning and editing").

Guidance: for each scale S, ``--per-class`` samples of every class with ``--class K``
(seeds fixed, the same for every S), scored by ddpmkit's digit classifier (metrics.py): the
share read as the asked class, the Frechet distance of all samples to the 297 test digits,
and the sampling wall time. Rows for the null class (unconditional samples) and for as many
real training digits (the FD floor) come first.

Inpainting (``--inpaint``): the bottom half (rows 4-7) of the 297 test digits is generated
from the top half with each method; the share the classifier reads as the true digit is
compared with the same digits with the bottom half set to the training mean, and with the
real digits. A conditional model inpaints through its null class (unconditional).

    python benchmarks/guidance.py --checkpoint runs/digits-cond \
        --out-dir benchmarks/results/guidance
    python benchmarks/guidance.py --checkpoint runs/digits --inpaint-only --out-dir ...

Writes results.json, results.md and guidance.png into --out-dir and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from ddpmkit import sample
from ddpmkit.config import DataConfig
from ddpmkit.data import load_data
from ddpmkit.editing import inpaint
from ddpmkit.loading import load
from ddpmkit.metrics import digit_labels, digit_quality, load_digit_classifier, real_digit_baseline

DEFAULT_SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)


def _share(classifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        pred = classifier(x.float().clamp(-1, 1)).argmax(1)
    return float((pred == labels).double().mean())


def guidance_rows(run, classifier, scales, per_class: int, sampler: str, steps: int,
                  seed: int) -> list[dict]:
    K = run.config.model.num_classes
    y = torch.arange(K).repeat_interleave(per_class)
    n = len(y)
    seeds = range(seed, seed + n)
    real = real_digit_baseline("test", n=min(n, 1500), classifier=classifier)
    rows = [{"S": "real", "fd": real["fd"], "share": None, "seconds": None}]
    t0 = time.perf_counter()
    x = sample(run.model, run.diffusion, (n, *run.data_shape), sampler, steps, seeds=seeds)
    rows.append({"S": "null class", "fd": digit_quality(x, classifier=classifier)["fd"],
                 "share": _share(classifier, x, y), "seconds": time.perf_counter() - t0})
    for S in scales:
        t0 = time.perf_counter()
        x = sample(run.model, run.diffusion, (n, *run.data_shape), sampler, steps,
                   seeds=seeds, y=y, guidance=S)
        sec = time.perf_counter() - t0
        rows.append({"S": S, "fd": digit_quality(x, classifier=classifier)["fd"],
                     "share": _share(classifier, x, y), "seconds": sec})
        print(f"S={S}: share {rows[-1]['share']:.3f}, FD {rows[-1]['fd']:.2f}, {sec:.1f} s",
              flush=True)
    return rows


def inpaint_rows(run, classifier, methods: list[tuple[str, dict]], seed: int) -> list[dict]:
    test = load_data(DataConfig(name="digits"), "test").x
    labels = digit_labels("test")
    train_mean = load_data(DataConfig(name="digits"), "train").x.mean(0)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[4:] = True
    filled = torch.where(mask, train_mean, test)
    rows = [{"method": "real digits", "share": _share(classifier, test, labels)},
            {"method": "bottom half = training mean", "share": _share(classifier, filled,
                                                                       labels)}]
    for name, kw in methods:
        t0 = time.perf_counter()
        x = inpaint(run.model, run.diffusion, test, mask, seeds=range(seed, seed + len(test)),
                    **kw)
        sec = time.perf_counter() - t0
        assert torch.equal(x[:, :, :4], test[:, :, :4])
        rows.append({"method": name, "share": _share(classifier, x, labels), "seconds": sec})
        print(f"{name}: {rows[-1]['share']:.3f} ({sec:.0f} s)", flush=True)
    return rows


def pictures(run, out: Path, guidance: float, seed: int) -> None:
    """README pictures: class grid, inpainting strip, SDEdit strip, interpolation strip."""
    from ddpmkit import viz
    from ddpmkit.editing import interpolate, sdedit

    K = run.config.model.num_classes
    test = load_data(DataConfig(name="digits"), "test").x[:8]
    labels = digit_labels("test")[:8]
    y = torch.arange(K).repeat_interleave(10) if K else None
    x = sample(run.model, run.diffusion, (len(y) if K else 100, *run.data_shape), "dpm++2m", 20,
               seeds=range(seed, seed + (len(y) if K else 100)), y=y,
               guidance=guidance if K else 1.0)
    viz.save_image_grid(x, out / "class_grid.png", nrow=10)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[4:] = True
    shown = torch.where(mask, torch.zeros(()), test)  # the generated area in mid grey
    filled = inpaint(run.model, run.diffusion, test, mask, seeds=range(seed, seed + 8))
    viz.save_strip([test, shown, filled], out / "inpaint_strip.png",
                   labels=["digit", "kept", "RePaint"])
    cols, names = [test], ["input"]
    for s in (0.3, 0.5, 0.7):
        target = (labels + 1) % 10 if K else None
        cols.append(sdedit(run.model, run.diffusion, test, s, method="ancestral", steps=50,
                           seeds=range(seed, seed + 8), y=target,
                           guidance=guidance if K else 1.0))
        names.append(f"s={s}" + (" y+1" if K else ""))
    viz.save_strip(cols, out / "sdedit_strip.png", labels=names)
    rows = [interpolate(run.model, run.diffusion, test[i:i + 1], test[i + 1:i + 2], num=8,
                        steps=50) for i in (0, 2, 4)]
    viz.save_strip([torch.stack([r[j] for r in rows]) for j in range(8)],
                   out / "interpolate_strip.png", labels=["A"] + [""] * 6 + ["B"])


def _fmt(v, spec=".3f"):
    return "-" if v is None else (format(v, spec) if isinstance(v, float) else str(v))


def tables(res: dict) -> str:
    out = []
    if res.get("guidance"):
        out += ["| guidance S | share read as the asked class | FD to test digits | "
                "sampling time (s) |", "|---|---|---|---|"]
        for r in res["guidance"]:
            out.append(f"| {r['S']} | {_fmt(r['share'])} | {_fmt(r['fd'], '.2f')} | "
                       f"{_fmt(r['seconds'], '.1f')} |")
        out.append("")
    if res.get("inpaint"):
        out += ["| inpainting rows 4-7 of the 297 test digits | read as the true digit | "
                "time (s) |", "|---|---|---|"]
        for r in res["inpaint"]:
            out.append(f"| {r['method']} | {_fmt(r['share'])} | "
                       f"{_fmt(r.get('seconds'), '.0f')} |")
        out.append("")
    out.append(res["footer"])
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in rows if isinstance(r["S"], float)]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ax[0].plot([r["S"] for r in pts], [r["share"] for r in pts], "o-")
    ax[0].set(xlabel="guidance S", ylabel="share read as the asked class")
    ax[1].plot([r["S"] for r in pts], [r["fd"] for r in pts], "o-", label="samples")
    real = next(r["fd"] for r in rows if r["S"] == "real")
    ax[1].axhline(real, color="grey", ls="--", label="real digits")
    ax[1].set(xlabel="guidance S", ylabel="FD to test digits")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--scales", default=",".join(map(str, DEFAULT_SCALES)))
    p.add_argument("--per-class", type=int, default=100, help="samples per class and scale")
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inpaint", action="store_true", help="also the inpainting table")
    p.add_argument("--inpaint-only", action="store_true", help="only the inpainting table")
    p.add_argument("--inpaint-steps", type=int, default=50)
    p.add_argument("--inpaint-jump10", action="store_true",
                   help="also RePaint with jump 10 (RePaint's paper setting)")
    p.add_argument("--out-dir", default="benchmarks/results/guidance")
    p.add_argument("--pictures", action="store_true",
                   help="also write the README pictures (class grid, inpainting, SDEdit, "
                        "interpolation strips) into --out-dir")
    p.add_argument("--picture-guidance", type=float, default=2.0)
    args = p.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = load(args.checkpoint, device="cpu")
    classifier = load_digit_classifier()
    res: dict = {"checkpoint": args.checkpoint, "step": run.step, "sampler": args.sampler,
                 "steps": args.steps}
    if not args.inpaint_only and args.scales:
        if not run.config.model.num_classes:
            raise SystemExit("error: guidance needs a class-conditional checkpoint")
        scales = [float(s) for s in args.scales.split(",")]
        res["guidance"] = guidance_rows(run, classifier, scales, args.per_class, args.sampler,
                                        args.steps, args.seed)
    if args.inpaint or args.inpaint_only:
        st = args.inpaint_steps
        methods = [(f"replace ({st} steps)", dict(method="replace", steps=st)),
                   (f"RePaint ({st} steps, jump 2, resample 10)",
                    dict(method="repaint", steps=st, jump=2, resample=10))]
        if args.inpaint_jump10:
            methods.append((f"RePaint ({st} steps, jump 10, resample 10)",
                            dict(method="repaint", steps=st, jump=10, resample=10)))
        res["inpaint"] = inpaint_rows(run, classifier, methods, args.seed)
    what = (f"{args.sampler} {args.steps} steps, {args.per_class} samples per class"
            if res.get("guidance") else f"inpainting over {args.inpaint_steps} steps")
    res["footer"] = (f"checkpoint step {run.step}, {what}; {date.today()}, "
                     f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                     f"torch {torch.__version__}.")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(tables(res))
    if res.get("guidance"):
        plot(res["guidance"], out / "guidance.png")
    print(tables(res))
    if args.pictures:
        pictures(run, out, args.picture_guidance, args.seed)


if __name__ == "__main__":
    main()
