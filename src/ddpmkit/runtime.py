"""Process-wide settings for fast CPU runs: keep freed memory in the process.

A training step of the CIFAR-10 U-Net allocates and frees ~0.5 GB of activations and
gradients in tensors of 1-16 MB. With glibc's defaults, blocks that large are mapped fresh
from the kernel (``mmap``) for every allocation and unmapped on free, so every step pays
~120,000 page faults, each zeroing a 4 KiB page, before any arithmetic happens. Raising the
mmap and trim thresholds makes glibc serve those blocks from its heap and keep the freed ones
for the next step. On the 2-core machine of docs/speed.md that made a training step ~1.14x
and a forward pass ~1.09x faster, the same for any PyTorch model (diffusers' U-Net included).

The cost: memory freed by the process is not returned to the OS until it exits, so the
resident size stays at its peak. ``ddpmkit``'s commands and :func:`ddpmkit.train.train` call
:func:`tune_allocator`; set ``DDPMKIT_TUNE_MALLOC=0`` to keep the allocator's defaults. In
your own scripts, call it once at start-up. Only glibc (Linux) is tuned; elsewhere it does
nothing (macOS's and musl's allocators behave differently and were not measured).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

__all__ = ["tune_allocator", "set_tf32", "threads_for_load", "choose_threads",
           "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks below 1 GiB come from the heap (above it, mmap as usual); up to 2 GiB - 1 of free
# heap top is kept rather than returned (mallopt takes an int).
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2**31 - 1

_done: bool | None = None


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once; idempotent).

    Returns True when the allocator was tuned, False when it was left alone (not glibc, or
    ``DDPMKIT_TUNE_MALLOC=0``).
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("DDPMKIT_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl, ...)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _done = ok
    return ok


def set_tf32(enabled: bool = True) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on Ampere+ GPUs, both on or both off.

    PyTorch's defaults differ: cuDNN convolutions use TF32, matmuls (attention, linear
    layers) do not. ddpmkit's train, sample and eval (and benchmarks/speed.py) call this with
    one setting, default on (``--tf32 false`` for full float32): TF32 keeps float32's range
    with a 10-bit mantissa, which the diffusion loss tolerates as it does bf16 autocast. No
    effect on the CPU.
    """
    import torch

    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def threads_for_load(threads_now: int, load_1min: float) -> int:
    """Threads to train with when other programs keep ``load_1min`` cores busy (a load figure:
    :func:`busy_cores`): the cores left
    free (at least 1), never more than ``threads_now`` (PyTorch's default, one per core).

    Why: PyTorch's intra-op threads split every operation and wait for each other at its end.
    When another process holds a core, the thread sharing it runs late and the others spin or
    sleep until it arrives: on the 2-core machine of issue 14, two threads beside one busy
    process took up to 5.8 s for a 0.2 s step. ``benchmarks/busy_machine.py`` measures it.
    """
    taken = int(load_1min + 0.5)  # busy cores, rounded
    return max(1, min(threads_now, (os.cpu_count() or 1) - taken))


def choose_threads(requested: int = 0) -> tuple[int, str | None]:
    """Set this process's torch threads: ``requested`` (> 0), or by how many cores other
    programs keep busy now (0: :func:`busy_cores`, :func:`threads_for_load`). Returns the
    count and a note for the user (None if none).

    Call before the first training step; ``OMP_NUM_THREADS`` set in the environment is taken
    as the user's choice (auto leaves it alone).
    """
    import torch

    now = torch.get_num_threads()
    if requested > 0:
        torch.set_num_threads(requested)
        return requested, None
    if os.environ.get("OMP_NUM_THREADS") or now <= 1:  # one thread cannot drop further:
        return now, None                                 # no need to spend 0.3 s measuring
    busy, how = busy_cores()
    if busy is None:
        return now, None
    n = threads_for_load(now, busy)
    if n >= now:
        return now, None
    torch.set_num_threads(n)
    return n, (f"note: other programs keep {busy:.1f} of {os.cpu_count()} cores busy ({how}): "
               f"training with {n} thread(s) instead of {now}, which a busy core slows much "
               "less (--threads N to choose)")


def busy_cores(window_s: float = 0.3) -> tuple[float | None, str]:
    """How many cores other programs keep busy *now*, and how that was measured.

    Linux: the share of non-idle time in ``/proc/stat`` over ``window_s`` seconds (while this
    process sleeps), times the number of CPUs. Elsewhere: the 1-minute load average. The load
    average lags by about a minute both ways: right after a benchmark or a build it still
    says a core is taken although the machine is quiet, and it would cost the next training
    run half its speed.
    """
    try:
        before = _cpu_times()
        time.sleep(window_s)
        after = _cpu_times()
    except (OSError, ValueError, IndexError):
        before = after = None
    if before is not None and after is not None and after[0] > before[0]:
        total, idle = after[0] - before[0], after[1] - before[1]
        return (1.0 - idle / total) * before[2], f"measured over {window_s:g} s"
    if hasattr(os, "getloadavg"):
        return os.getloadavg()[0], "1-minute load average"
    return None, ""


def _cpu_times() -> tuple[int, int, int]:
    """(all jiffies, idle + iowait jiffies, CPU count) from /proc/stat."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    fields = [int(v) for v in lines[0].split()[1:]]
    cpus = sum(1 for ln in lines[1:] if ln.startswith("cpu") and ln[3:4].isdigit())
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    return sum(fields[:8]), fields[3] + fields[4], cpus
