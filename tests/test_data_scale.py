"""Data at scale: flat memory, the loader's order (resume, workers, ranks), labels, bad files.

The subprocess tests run ``ddpmkit train`` on the tiny U-Net of test_train, so what they
measure is the data path, not the network.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import TINY_FLAGS

from ddpmkit.config import DataConfig
from ddpmkit.data import Loader, load_data, rank_rows

MIB = 1 << 20


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                **extra)


# ---- memory flat in the data set's size --------------------------------------------------------

_PEAK_RSS = """
import resource, sys
from ddpmkit.cli import main
rc = main(sys.argv[1:])
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # DataLoader workers, reaped
print("PEAK_RSS_KB", own, kids)
sys.exit(rc)
"""


def _write_npy(path: Path, n: int) -> None:
    """``n`` 32x32 RGB uint8 images, written in blocks (the test itself stays small)."""
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    for lo in range(0, n, len(block)):
        arr[lo:lo + len(block)] = block[:n - lo]
    arr.flush()
    del arr


def _peak_rss_mib(tmp_path: Path, data: Path, workers: int) -> tuple[float, float]:
    cmd = [sys.executable, "-c", _PEAK_RSS, "train", "--config", "digits", "--data", str(data),
           "--out", str(tmp_path / f"run-{data.stem}"), "--max-steps", "3", "--max-minutes", "0",
           "--sample-every", "0", "--workers", str(workers), *TINY_FLAGS,
           "--checkpoint-every", "1000", "--attention-resolutions", "16"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_RSS_KB"))
    own, kids = (int(v) / 1024 for v in line.split()[1:])
    return own, kids


def test_peak_memory_is_flat_in_the_data_sets_size(tmp_path):
    """3 steps on 2,000 vs 100,000 32x32 RGB images (a 6 MB vs a 307 MB .npy), 1 worker.

    Loading the images would cost 1,200 MB more as float32 (300 MB as uint8), so a margin of
    48 MiB catches any whole-array copy, in the trainer or in its worker, while leaving room
    for the run-to-run noise of the allocator (a few MiB here).
    """
    small, large = tmp_path / "small.npy", tmp_path / "large.npy"
    _write_npy(small, 2_000)
    _write_npy(large, 100_000)
    own_s, kids_s = _peak_rss_mib(tmp_path, small, workers=1)
    own_l, kids_l = _peak_rss_mib(tmp_path, large, workers=1)
    print(f"peak RSS MiB, trainer / worker: 2k images {own_s:.0f} / {kids_s:.0f}, "
          f"100k images {own_l:.0f} / {kids_l:.0f}")
    assert own_l - own_s < 48, (own_s, own_l)
    assert kids_s > 0 and kids_l - kids_s < 48, (kids_s, kids_l)
