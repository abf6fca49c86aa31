"""Throughput of the input pipeline alone: read, decode, flip, to float, batches of 128.

Sources (made in a temporary folder, nothing downloaded):
  npy     N 32x32 RGB uint8 images in one .npy, read in place (pread per image)
  jpeg    M 256x256 RGB JPEGs in a folder, decoded per image (no resize)
each with 0, 1 and 2 DataLoader workers, next to PIL's raw decode rate of the same JPEGs
in this process (the ceiling for the folder) and the training rate of the CIFAR-10 network
(docs/speed.md). Prints images/s; not a test. On a shared machine the figures move a lot
from run to run: compare rows of one run.

    python benchmarks/data.py --seconds 5
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpmkit.config import DataConfig
from ddpmkit.data import Loader, load_data, rank_rows

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


def pipeline_rate(data, workers: int, seconds: float) -> float:
    """Images/s of Loader.next() plus a random flip, after one warm-up batch."""
    loader = Loader(data, 0, 0, BATCH, rank_rows(0, 1, BATCH, 1), workers=workers)
    gen = torch.Generator().manual_seed(0)
    loader.next()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = loader.next().x
        coin = torch.rand(len(x), generator=gen) < 0.5
        torch.where(coin[:, None, None, None], x.flip(-1), x)
        n += len(x)
    rate = n / (time.perf_counter() - t0)
    loader.close()
    return rate


def pil_decode_rate(folder: Path, seconds: float) -> float:
    files = sorted(folder.glob("*.jpg"))
    blobs = [f.read_bytes() for f in files]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        with Image.open(io.BytesIO(blobs[n % len(blobs)])) as img:
            np.asarray(img.convert("RGB"))
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row")
    p.add_argument("--npy-images", type=int, default=50_000)
    p.add_argument("--jpeg-images", type=int, default=600)
    p.add_argument("--workers", default="0,1,2")
    args = p.parse_args()
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"npy 32x32": make_npy(tmp, args.npy_images),
                   "jpeg folder 256x256": make_jpegs(tmp, args.jpeg_images)}
        print(f"batch {BATCH}, {args.seconds:g} s per row, torch threads 1 in the trainer")
        for name, path in sources.items():
            data = load_data(DataConfig(name=str(path)))
            for w in workers:
                rate = pipeline_rate(data, w, args.seconds)
                print(f"{name:22s} workers {w}: {rate:10,.0f} images/s")
        pil = pil_decode_rate(sources["jpeg folder 256x256"], args.seconds)
        print(f"{'PIL raw JPEG decode':22s} 1 process: {pil:10,.0f} images/s")


if __name__ == "__main__":
    main()
