"""Throughput of the input pipeline alone: read, decode, flip, to float, batches of 128.

Sources (made in a temporary folder, nothing downloaded):
  shards  the same N images as prepared tar shards (`ddpmkit prepare --format shards`:
          .npy members, 10,000 per shard), read map-style (one pread per image)
  npy     N 32x32 RGB uint8 images in one .npy, read in place (pread per image)
  jpeg    M 256x256 RGB JPEGs in a folder, decoded per image (no resize)
each with 0, 1 and 2 DataLoader workers, next to PIL's raw decode rate of the same JPEGs
in this process (the issue's yardstick for the folder), measured before and after the rows;
the last lines give each folder row as a share of the higher of the two. With the ``jpeg``
extra installed
(simplejpeg) the folder rows come twice: as ddpmkit reads it then, and with PIL alone, with
simplejpeg's raw rate beside PIL's. Also: the training rate of the CIFAR-10 network
(measured here: a few steps at batch 16; docs/speed.md has the careful figure), and the
rate an 8-accelerator node would ask of the input pipeline. Prints images/s; not a test. On a
shared machine the figures move a lot from run to run: compare rows of one run.

`--readers` compares shard readers instead, on 32x32 PNG shards in one process: the
`webdataset` package (if installed: `pip install webdataset`), a plain `tarfile` stream
reader, and ddpmkit's own (its stream reader for pipe: shards, its index + pread reader for
local ones). This is the measurement behind ddpmkit reading shards itself (data/shards.py).

    python benchmarks/data.py --seconds 5
    python benchmarks/data.py --readers
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpmkit.config import DataConfig
from ddpmkit.data import Batch, Loader, images, load_data, rank_rows
from ddpmkit.runtime import tune_allocator

BATCH = 128


def make_npy(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    path = folder / "images.npy"
    np.save(path, rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    return path


def make_jpegs(folder: Path, n: int) -> Path:
    """Smooth random pictures (noise would make JPEG unrealistically slow)."""
    root = folder / "jpegs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((256, 256), Image.Resampling.BICUBIC).save(
            root / f"{i:05d}.jpg", quality=90)
    return root


def make_shards(folder: Path, npy: Path) -> Path:
    from ddpmkit.data.prepare import prepare
    out = folder / "shards"
    prepare(str(npy), out, fmt="shards", shard_size=10_000, workers=0, progress=False)
    return out


def make_png_shards(folder: Path, n: int, per: int = 2_500) -> list[str]:
    """32x32 RGB PNG members (smooth pictures) with .cls labels, ``per`` to a shard."""
    rng = np.random.default_rng(0)
    paths = []
    for s in range(0, n, per):
        path = folder / f"png-{s // per:04d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s, min(n, s + per)):
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((32, 32), Image.Resampling.BICUBIC).save(buf, "PNG")
                for name, data in ((f"{i:06d}.png", buf.getvalue()),
                                   (f"{i:06d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def _timed(items) -> float:
    n, t0 = 0, time.perf_counter()
    for _ in items:
        n += 1
    return n / (time.perf_counter() - t0)


def reader_rates(paths: list[str]) -> dict[str, float]:
    """Images/s decoding every PNG shard once (uint8 HWC + label), one process each."""
    from ddpmkit.data.shards import decode_member
    from ddpmkit.data.sources import open_reader
    from ddpmkit.data.stream import shard_examples

    def plain_tarfile():
        for p in paths:
            with tarfile.open(p, "r|") as tf:
                for m in tf:
                    data = tf.extractfile(m).read()
                    if m.name.endswith(".png"):
                        with Image.open(io.BytesIO(data), formats=("PNG",)) as img:
                            yield np.asarray(img.convert("RGB"))
                    else:
                        int(data)

    def own_stream():
        for p in paths:
            for ex in shard_examples(p, "all"):
                yield decode_member(ex.data, ex.ext, 0, 3), ex.label

    # indexing (a header scan) and the size probe are once per run, not per epoch: untimed
    r, _ = open_reader(DataConfig(name=str(Path(paths[0]).parent / "png-*.tar")))

    def own_index():
        for j in range(len(r)):
            yield r.read(j), r.label(j)

    rates = {}
    try:
        import webdataset as wds
        ds = wds.WebDataset(paths, shardshuffle=False, empty_check=False)
        rates["webdataset (decode rgb8)"] = _timed(ds.decode("rgb8").to_tuple("png", "cls"))
    except ImportError:
        print("webdataset is not installed: its row is left out")
    rates["tarfile stream + PIL"] = _timed(plain_tarfile())
    rates["ddpmkit stream (pipe:)"] = _timed(own_stream())
    rates["ddpmkit index + pread"] = _timed(own_index())
    return rates


def pipeline_rate(data, workers: int, seconds: float) -> float:
    """Images/s of Loader.next() plus a random flip and the conversion to float, as the
    trainer does them (``Batch.to_float(data, mirror)``), after one warm-up batch."""
    loader = Loader(data, 0, 0, BATCH, rank_rows(0, 1, BATCH, 1), workers=workers)
    gen = torch.Generator().manual_seed(0)
    loader.next()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = loader.next().data
        coin = torch.rand(len(x), generator=gen) < 0.5
        Batch.to_float(x, coin)
        n += len(x)
    rate = n / (time.perf_counter() - t0)
    loader.close()
    return rate


# Ho et al. 2020 (DDPM), Appendix B: the CIFAR-10 model trained at 21 steps/s at batch 128 on a
# TPU v3-8 (8 cores). That is the one published per-device training rate for this network;
# it is what "an 8-accelerator node" means below (about 336 images/s per core).
PAPER_STEPS_PER_S, PAPER_BATCH, PAPER_DEVICES = 21, 128, 8


def cifar_train_rate(steps: int, batch: int = 16) -> float:
    """Images/s of the CIFAR-10 U-Net's training step (loss, backward, AdamW) in this process,
    after one warm-up step; the data is fixed (this is the network's side of the comparison)."""
    from ddpmkit import GaussianDiffusion, make_betas
    from ddpmkit.nn import build_unet
    from ddpmkit.train.trainer import make_optimizer

    torch.manual_seed(0)
    model = build_unet("cifar10")
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    opt = make_optimizer(model, 2e-4)
    x0 = torch.rand(batch, 3, 32, 32) * 2 - 1

    def step():
        t = torch.randint(0, 1000, (batch,))
        diffusion.training_losses(model, x0, t)["loss"].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def pil_decode_rate(folder: Path, seconds: float) -> float:
    files = sorted(folder.glob("*.jpg"))
    blobs = [f.read_bytes() for f in files]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        with Image.open(io.BytesIO(blobs[n % len(blobs)])) as img:
            np.asarray(img.convert("RGB"))
        n += 1
    return n / (time.perf_counter() - t0)


def simplejpeg_decode_rate(folder: Path, seconds: float) -> float:
    sj = images._simplejpeg()
    blobs = [f.read_bytes() for f in sorted(folder.glob("*.jpg"))]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sj.decode_jpeg(blobs[n % len(blobs)], colorspace="RGB")
        n += 1
    return n / (time.perf_counter() - t0)


@contextlib.contextmanager
def _pil_only(on: bool):
    """Decode JPEGs with PIL alone (as without the ``jpeg`` extra); forked workers inherit it."""
    if not on:
        yield
        return
    saved = images._simplejpeg
    images._simplejpeg = lambda: None
    try:
        yield
    finally:
        images._simplejpeg = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row")
    p.add_argument("--npy-images", type=int, default=50_000)
    p.add_argument("--jpeg-images", type=int, default=600)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--readers", action="store_true",
                   help="compare shard readers (webdataset, tarfile, ddpmkit) instead")
    p.add_argument("--png-images", type=int, default=10_000, help="images for --readers")
    p.add_argument("--cifar-steps", type=int, default=3,
                   help="timed training steps of the CIFAR-10 network (0: skip)")
    p.add_argument("--cifar-threads", type=int, default=0,
                   help="torch threads for the network's steps (0: all cores)")
    args = p.parse_args()
    torch.set_num_threads(1)
    tune_allocator()  # as `ddpmkit train` does: a fresh 100 MB float batch costs page faults
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.readers:
            paths = make_png_shards(tmp, args.png_images)
            print(f"{args.png_images} 32x32 RGB PNG members in {len(paths)} shards, read once")
            for _ in range(2):  # twice: the second round has a warm page cache for all
                for name, rate in reader_rates(paths).items():
                    print(f"{name:26s} {rate:10,.0f} images/s")
            return
        npy = make_npy(tmp, args.npy_images)
        sources = {"shards 32x32 (prepared)": make_shards(tmp, npy), "npy 32x32": npy,
                   "jpeg folder 256x256": make_jpegs(tmp, args.jpeg_images)}
        print(f"batch {BATCH}, {args.seconds:g} s per row, torch threads 1 in the trainer")
        folder = sources["jpeg folder 256x256"]
        # PIL's raw rate moves by a third between moments on a shared VM: measured before
        # and after the pipeline rows, and the target is checked against the higher one
        pil = [pil_decode_rate(folder, args.seconds)]
        fast = images._simplejpeg() is not None
        jpeg_rates = {}
        for name, path in sources.items():
            data = load_data(DataConfig(name=str(path)))
            for pil_only in (False, True) if fast and "jpeg" in name else (not fast,):
                label = name + (" (PIL)" if pil_only and "jpeg" in name else "")
                with _pil_only(pil_only):
                    for w in workers:
                        rate = pipeline_rate(data, w, args.seconds)
                        print(f"{label:28s} workers {w}: {rate:10,.0f} images/s")
                        if label == name and "jpeg" in name:
                            jpeg_rates[w] = rate
        pil.append(pil_decode_rate(folder, args.seconds))
        print(f"{'PIL raw JPEG decode':28s} 1 process: {pil[0]:10,.0f} images/s before the "
              f"rows, {pil[1]:,.0f} after")
        if fast:
            sj = simplejpeg_decode_rate(folder, args.seconds)
            print(f"{'simplejpeg raw JPEG decode':28s} 1 process: {sj:10,.0f} images/s")
        for w, rate in jpeg_rates.items():
            print(f"{'jpeg folder / PIL raw (max)':28s} workers {w}: {rate / max(pil):10.0%}")
    if args.cifar_steps:
        torch.set_num_threads(args.cifar_threads or os.cpu_count() or 1)
        rate = cifar_train_rate(args.cifar_steps)
        print(f"{'CIFAR-10 net training':22s} {torch.get_num_threads()} threads: "
              f"{rate:10,.2f} images/s (batch 16)")
    node = PAPER_STEPS_PER_S * PAPER_BATCH
    print(f"an 8-accelerator node needs {node:,} images/s ({PAPER_STEPS_PER_S} steps/s x batch "
          f"{PAPER_BATCH} on {PAPER_DEVICES} TPU v3 cores, DDPM paper appendix B; "
          f"{node / PAPER_DEVICES:,.0f} per device)")


if __name__ == "__main__":
    main()
