"""Classifier-free guidance on digits, and inpainting (issue "Conditioning and editing").

Guidance: for each scale S (and each guidance interval of ``--intervals``), ``--per-class``
samples of every class with ``--class K`` (seeds fixed, the same for every row), scored by
ddpmkit's digit classifier (metrics.py): the share read as the asked class, the share
*recognisable* (classifier confidence >= 0.9, the real digits' figure beside it), the Frechet
distance of all samples to the 297 test digits, and the sampling wall time. Rows for real
training digits (the FD floor at the same N), the null class, and (``--uncond-checkpoint``)
an unconditional model's samples at the same N come first.

Inpainting (``--inpaint``): the bottom half (rows 4-7) of the 297 test digits is generated
from the top half with each method, on ``--uncond-checkpoint`` when given (else on
``--checkpoint`` through its null class); the share the classifier reads as the true digit
is compared with the same digits with the bottom half set to the training mean, and with
the real digits.

    python benchmarks/guidance.py --checkpoint runs/digits-cond --uncond-checkpoint \
        runs/digits --inpaint --intervals 0.5:10 --jobs 3 --out-dir benchmarks/results/guidance

Rows run in ``--jobs`` processes of one torch thread each (times are then those of one
busy core). Writes results.json, results.md and guidance.png into --out-dir and prints the
tables.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import torch

from ddpmkit import sample
from ddpmkit.config import DataConfig, SampleConfig
from ddpmkit.data import load_data
from ddpmkit.editing import RECONSTRUCTION_WEIGHT, inpaint
from ddpmkit.loading import load
from ddpmkit.metrics import digit_labels, digit_quality, load_digit_classifier

DEFAULT_SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)
CONFIDENT = 0.9  # "recognisable": the classifier's top class has probability >= this


def _share(classifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        pred = classifier(x.float().clamp(-1, 1)).argmax(1)
    return float((pred == labels).double().mean())


def _recognisable(classifier, x: torch.Tensor) -> float:
    with torch.inference_mode():
        p = classifier(x.float().clamp(-1, 1)).softmax(1).amax(1)
    return float((p >= CONFIDENT).double().mean())


def _scores(classifier, x: torch.Tensor, y: torch.Tensor | None) -> dict:
    return {"fd": digit_quality(x, classifier=classifier)["fd"],
            "share": None if y is None else _share(classifier, x, y),
            "recognisable": _recognisable(classifier, x)}


# Each row is one job, run in a worker process that loads checkpoints once.
_CACHE: dict = {}


def _worker_init() -> None:
    torch.set_num_threads(1)


def _get(key, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def run_job(job: dict) -> dict:
    """One row: {"kind": "real" | "null" | "guided" | "uncond" | "inpaint", ...} -> scores."""
    classifier = _get("classifier", load_digit_classifier)
    kind = job["kind"]
    if kind == "inpaint":
        return _inpaint_row(job, classifier)
    K, per_class = job["num_classes"], job["per_class"]
    y = torch.arange(K).repeat_interleave(per_class)
    n = len(y)
    if kind == "real":  # training digits against the test digits, at the same N
        x = load_data(DataConfig(name="digits"), "train").x[:n]
        return {**job, **_scores(classifier, x, digit_labels("train")[:n]), "seconds": None}
    ckpt = job["uncond_checkpoint"] if kind == "uncond" else job["checkpoint"]
    run = _get(ckpt, lambda: load(ckpt, device="cpu"))
    kw = {}
    if kind == "guided":
        kw = dict(y=y, guidance=job["S"], guidance_interval=job.get("interval"))
    t0 = time.perf_counter()
    x = sample(run.model, run.diffusion, (n, *run.data_shape), job["sampler"], job["steps"],
               seeds=range(job["seed"], job["seed"] + n), **kw)
    sec = time.perf_counter() - t0
    row = {**job, **_scores(classifier, x, y if kind != "uncond" else None), "seconds": sec}
    if kind == "null":
        row["share"] = _share(classifier, x, y)  # chance level: the label is not used
    return row


VAL_DIGITS = slice(1203, 1500)  # validation: the last 297 training digits (as many as test)


def inpaint_digits(which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(digits [297, 1, 8, 8], labels [297]) of ``which``: "test" (the 297 test digits, the
    issue's target) or "val" (training digits 1203-1499, where methods are chosen)."""
    if which == "test":
        return load_data(DataConfig(name="digits"), "test").x, digit_labels("test")
    return (load_data(DataConfig(name="digits"), "train").x[VAL_DIGITS],
            digit_labels("train")[VAL_DIGITS])


def _inpaint_row(job: dict, classifier) -> dict:
    ckpt = job["uncond_checkpoint"] or job["checkpoint"]
    run = _get(ckpt, lambda: load(ckpt, device="cpu"))
    digits, labels = inpaint_digits(job["digits"])
    t0 = time.perf_counter()
    x = inpaint(run.model, run.diffusion, digits, _bottom_half(),
                seeds=range(job["seed"], job["seed"] + len(digits)), **job["kw"])
    sec = time.perf_counter() - t0
    assert torch.equal(x[:, :, :4], digits[:, :, :4])  # kept pixels come back unchanged
    share = _share(classifier, x, labels)
    return {**job, "share": share, "se": math.sqrt(share * (1 - share) / len(labels)),
            "seconds": sec}


def _bottom_half() -> torch.Tensor:
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[4:] = True  # rows 4-7: generated
    return mask


def inpaint_baselines(classifier, which: str = "test") -> list[dict]:
    """The real digits, and the same with rows 4-7 set to the training mean."""
    digits, labels = inpaint_digits(which)
    train_mean = load_data(DataConfig(name="digits"), "train").x.mean(0)
    filled = torch.where(_bottom_half(), train_mean, digits)
    return [{"method": "real digits", "share": _share(classifier, digits, labels)},
            {"method": "bottom half = training mean", "share": _share(classifier, filled,
                                                                       labels)}]


def _interval_text(interval) -> str:
    if interval is None:
        return ""
    lo, hi = (v if isinstance(v, str) else format(v, "g") for v in interval)
    return f"sigma in ({lo}, {hi}]"


def _finite_json(v):
    """inf -> "inf", so that results.json is strict JSON."""
    if isinstance(v, dict):
        return {k: _finite_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_json(x) for x in v]
    return "inf" if isinstance(v, float) and math.isinf(v) else v


def guidance_jobs(args, num_classes: int) -> list[dict]:
    base = dict(checkpoint=args.checkpoint, uncond_checkpoint=args.uncond_checkpoint,
                num_classes=num_classes, per_class=args.per_class, sampler=args.sampler,
                steps=args.steps, seed=args.seed)
    jobs = [{**base, "kind": "real", "S": "real digits"},
            {**base, "kind": "null", "S": "null class"}]
    if args.uncond_checkpoint:
        jobs.append({**base, "kind": "uncond", "S": "unconditional model"})
    for S in args.scales:
        jobs.append({**base, "kind": "guided", "S": S, "interval": None})
    for interval in args.intervals:
        for S in args.interval_scales:
            jobs.append({**base, "kind": "guided", "S": S, "interval": interval})
    return jobs


DEFAULT_INPAINT = "replace;repaint:jump=2:resample=10"
_INPAINT_KEYS = {"steps": int, "jump": int, "resample": int, "weight": float}
_KW_NAMES = {"weight": "recon_weight"}  # the config key -> inpaint()'s keyword


def parse_inpaint_config(text: str, steps: int) -> tuple[str, dict]:
    """"method[:key=value...]" (keys: steps, jump, resample, weight) -> (row name, inpaint kw).
    E.g. "reconstruction:weight=2:resample=1"."""
    method, *pairs = text.strip().split(":")
    kw: dict = {"method": method, "steps": steps}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in _INPAINT_KEYS or not value:
            raise SystemExit(f"error: --inpaint-configs entry {text!r}: use key=value with "
                             f"keys {', '.join(_INPAINT_KEYS)}")
        kw[_KW_NAMES.get(key, key)] = _INPAINT_KEYS[key](value)
    if method == "replace":
        name = f"replace ({kw['steps']} steps)"
    else:
        kw.setdefault("jump", 2)
        kw.setdefault("resample", 1 if method == "reconstruction" else 10)
        if method == "reconstruction":
            kw.setdefault("recon_weight", RECONSTRUCTION_WEIGHT)
        name = (f"{'RePaint' if method == 'repaint' else method} ({kw['steps']} steps, "
                f"jump {kw['jump']}, resample {kw['resample']}"
                + (f", w_r {kw['recon_weight']:g}" if method == "reconstruction" else "")
                + ")")
    return name, kw


def inpaint_jobs(args) -> list[dict]:
    base = dict(kind="inpaint", checkpoint=args.checkpoint, seed=args.seed,
                uncond_checkpoint=args.uncond_checkpoint, digits=args.inpaint_digits)
    configs = [c for c in args.inpaint_configs.split(";") if c.strip()]
    if args.inpaint_jump10:
        configs.append("repaint:jump=10:resample=10")
    jobs = []
    for c in configs:
        name, kw = parse_inpaint_config(c, args.inpaint_steps)
        jobs.append({**base, "method": name, "kw": kw})
    return jobs


def run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    """Rows in the order of ``jobs``; the costliest (RePaint, guided) start first."""
    if workers <= 1:
        _worker_init()
        rows = [run_job(j) for j in jobs]
    else:
        order = sorted(range(len(jobs)), key=lambda i: jobs[i]["kind"] != "inpaint")
        with ProcessPoolExecutor(workers, initializer=_worker_init) as pool:
            futures = {i: pool.submit(run_job, jobs[i]) for i in order}
            rows = [futures[i].result() for i in range(len(jobs))]
    for r in rows:
        print(_row_line(r), flush=True)
    return rows


def _row_line(r: dict) -> str:
    if r["kind"] == "inpaint":
        return (f"{r['method']}: {r['share']:.3f} (SE {r['se']:.3f}, "
                f"{r['seconds']:.0f} s)")
    return (f"{r['S']} {_interval_text(r.get('interval'))}: share {_fmt(r['share'])}, "
            f"recognisable {r['recognisable']:.3f}, FD {r['fd']:.2f}")


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
        out += ["| guidance S | guided steps | share read as the asked class | recognisable "
                f"(confidence >= {CONFIDENT}) | FD to test digits | sampling time (s) |",
                "|---|---|---|---|---|---|"]
        for r in res["guidance"]:
            where = (_interval_text(r.get("interval")) or "all") if r["kind"] == "guided" \
                else "-"
            out.append(f"| {r['S']} | {where} | {_fmt(r['share'])} | "
                       f"{_fmt(r['recognisable'])} | {_fmt(r['fd'], '.2f')} | "
                       f"{_fmt(r['seconds'], '.1f')} |")
        out.append("")
    if res.get("inpaint"):
        which = {"test": "the 297 test digits",
                 "val": "validation digits (training 1203-1499)"}[res["inpaint_digits"]]
        out += [f"| inpainting rows 4-7 of {which}, seeds {res['inpaint_seeds']} | "
                "read as the true digit | standard error | time (s) |", "|---|---|---|---|"]
        for r in res["inpaint"]:
            out.append(f"| {r['method']} | {_fmt(r['share'])} | {_fmt(r.get('se'))} | "
                       f"{_fmt(r.get('seconds'), '.0f')} |")
        out.append("")
    out.append(res["footer"])
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in rows if r["kind"] == "guided" and r.get("interval") is None]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ax[0].plot([r["S"] for r in pts], [r["share"] for r in pts], "o-")
    ax[0].set(xlabel="guidance S", ylabel="share read as the asked class")
    ax[1].plot([r["S"] for r in pts], [r["fd"] for r in pts], "o-", label="samples")
    for kind, style, name in (("real", "--", "real digits"),
                              ("uncond", ":", "unconditional model")):
        ref = [r["fd"] for r in rows if r["kind"] == kind]
        if ref:
            ax[1].axhline(ref[0], color="grey", ls=style, label=name)
    ax[1].set(xlabel="guidance S", ylabel="FD to test digits")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _interval(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    return float(lo), float(hi)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="class-conditional run")
    p.add_argument("--uncond-checkpoint", help="unconditional run: a quality row at the same "
                   "N, and the model that --inpaint uses")
    p.add_argument("--scales", default=",".join(map(str, DEFAULT_SCALES)),
                   help="guidance scales guided at every step ('' for none)")
    p.add_argument("--intervals", default="",
                   help="guidance intervals LO:HI in sigma, comma-separated (e.g. 0.5:10,1:inf)")
    p.add_argument("--interval-scales", default=str(SampleConfig().guidance),
                   help="scales run with each interval")
    p.add_argument("--per-class", type=int, default=100, help="samples per class and row")
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="rows run in this many processes")
    p.add_argument("--inpaint", action="store_true", help="also the inpainting table")
    p.add_argument("--inpaint-only", action="store_true", help="only the inpainting table")
    p.add_argument("--inpaint-steps", type=int, default=50)
    p.add_argument("--inpaint-jump10", action="store_true",
                   help="also RePaint with jump 10 (RePaint's paper setting)")
    p.add_argument("--inpaint-configs", default=DEFAULT_INPAINT,
                   help="inpainting rows, ';'-separated, each method[:key=value...] with keys "
                        "steps, jump, resample, weight (e.g. 'reconstruction:weight=2:"
                        "resample=1'); steps defaults to --inpaint-steps")
    p.add_argument("--inpaint-digits", choices=("test", "val"), default="test",
                   help="test: the 297 test digits; val: training digits 1203-1499, on which "
                        "methods and settings are chosen")
    p.add_argument("--out-dir", default="benchmarks/results/guidance")
    p.add_argument("--pictures", action="store_true",
                   help="also write the README pictures (class grid, inpainting, SDEdit, "
                        "interpolation strips) into --out-dir")
    p.add_argument("--picture-guidance", type=float, default=SampleConfig().guidance)
    args = p.parse_args()
    args.scales = [float(v) for v in args.scales.split(",") if v.strip()]
    args.intervals = [_interval(v) for v in args.intervals.split(",") if v.strip()]
    args.interval_scales = [float(v) for v in args.interval_scales.split(",") if v.strip()]

    torch.set_num_threads(1)
    run = load(args.checkpoint, device="cpu")
    classifier = load_digit_classifier()
    jobs = []
    if not args.inpaint_only:
        if not run.config.model.num_classes:
            raise SystemExit("error: guidance needs a class-conditional checkpoint")
        jobs += guidance_jobs(args, run.config.model.num_classes)
    if args.inpaint or args.inpaint_only:
        jobs += inpaint_jobs(args)
    rows = run_jobs(jobs, args.jobs)
    res: dict = {"checkpoint": args.checkpoint, "step": run.step,
                 "uncond_checkpoint": args.uncond_checkpoint, "sampler": args.sampler,
                 "steps": args.steps, "per_class": args.per_class}
    if args.uncond_checkpoint:
        res["uncond_step"] = load(args.uncond_checkpoint, device="cpu").step
    res["guidance"] = [r for r in rows if r["kind"] != "inpaint"]
    if args.inpaint or args.inpaint_only:
        res["inpaint_digits"] = args.inpaint_digits
        n = len(inpaint_digits(args.inpaint_digits)[1])
        res["inpaint_seeds"] = f"{args.seed}..{args.seed + n - 1}"
        res["inpaint"] = inpaint_baselines(classifier, args.inpaint_digits) + [r for r in rows
                                                          if r["kind"] == "inpaint"]
    what = (f"{args.sampler} {args.steps} steps, {args.per_class} samples per class"
            if res["guidance"] else "inpainting (steps, jump and resample as each row names)")
    steps = f"checkpoint step {run.step}" + (f", unconditional step {res['uncond_step']}"
                                              if args.uncond_checkpoint else "")
    res["footer"] = (f"{steps}, {what}; {date.today()}, {platform.machine()}, "
                     f"{args.jobs} processes of 1 torch thread, torch {torch.__version__}.")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_finite_json(res), indent=1, allow_nan=False))
    (out / "results.md").write_text(tables(res))
    if res["guidance"]:
        plot(res["guidance"], out / "guidance.png")
    print(tables(res))
    if args.pictures:
        pictures(run, out, args.picture_guidance, args.seed)


if __name__ == "__main__":
    main()
