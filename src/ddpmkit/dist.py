"""torchrun helpers: rank, world size, device choice and rank-0 printing.

Only torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) is read. Without
it everything runs single-process and no process group is created.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from .errors import ConfigError


def world_size() -> int:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> this process's GPU when CUDA is present, else the CPU; or an explicit name.

    Under torchrun, 'auto' and 'cuda' mean GPU ``LOCAL_RANK`` (one GPU per process). 'cuda:N'
    is honoured only with one process per machine: with several, it would put them all on
    GPU N (NCCL refuses that); CUDA_VISIBLE_DEVICES picks which GPUs they share out.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device name (auto, cpu, cuda, cuda:N)") \
            from None
    if device.type not in ("cpu", "cuda", "mps"):
        # torch names more device types (meta, xla, lazy, hpu, ...) than ddpmkit runs on
        raise ConfigError(f"device={name!r} cannot run ddpmkit; use auto, cpu, cuda or cuda:N")
    if device.type != "cuda":
        try:
            torch.empty(1, device=device)  # a name torch accepts but this build cannot use
        except Exception as e:  # RuntimeError, AssertionError, ... depending on the backend
            first = str(e).splitlines()[0][:150] if str(e) else type(e).__name__
            raise ConfigError(f"device={name!r} cannot be used here: {first}") from None
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if device.index is None:
        return torch.device("cuda", local_rank() % count)
    if local_world_size() > 1:
        raise ConfigError(f"device={name!r} would put all {local_world_size()} processes of "
                          "this machine on one GPU: use --device cuda (or auto) to give each "
                          "process GPU LOCAL_RANK, and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if device.index >= count:
        raise ConfigError(f"device={name!r} but this machine has {count} GPU(s) "
                          f"(cuda:0 .. cuda:{count - 1})")
    return device


# Rank 0 alone writes checkpoints and samples picture grids while the others wait in a
# collective; on a big model that takes minutes, so the wait limit must be generous.
TIMEOUT = timedelta(minutes=30)


def init_process_group(device: torch.device, timeout: timedelta = TIMEOUT) -> bool:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); False when single-process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group(backend=backend, timeout=timeout)
        global _control
        _control = None
        if backend == "nccl":  # every rank creates it, in the same order
            _control = torch_dist.new_group(backend="gloo", timeout=timeout)
    return True


# A gloo group beside NCCL for small host-side agreements (stop flags): a CPU all-reduce does
# not wait for the GPU to finish its queued work, where an NCCL one read back on the host does.
_control = None


def any_rank(*flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (one small CPU all-reduce; the flags as given in one
    process)."""
    if not is_distributed():
        return [bool(f) for f in flags]
    group = _control
    device = torch.device("cpu") if group is not None else comm_device()
    t = torch.tensor([float(f) for f in flags], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and world_size() > 1


def comm_device() -> torch.device:
    """Where tensors must be for collectives: this rank's GPU under NCCL, else the CPU."""
    if is_distributed() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_equal(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on all ranks), on the CPU, in rank order."""
    if not is_distributed():
        return [t.cpu()]
    t = t.to(comm_device())
    out = [torch.empty_like(t) for _ in range(world_size())]
    torch_dist.all_gather(out, t)
    return [o.cpu() for o in out]


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


GATHER_BYTES = 256 << 20  # per rank and gather: bounds the buffers, whatever the total


def gather_rows(x: torch.Tensor, counts: list[int],
                max_bytes: int = GATHER_BYTES) -> torch.Tensor | None:
    """Rank r's ``x`` [counts[r], ...] -> on rank 0, all ranks' rows in rank order; else None.

    Rows travel in rounds of at most ``max_bytes`` per rank, so no device ever holds more
    than one round's buffers (rank 0: one per rank); rank 0 collects them on the CPU. Each
    rank pads a round to the same row count so that one fixed-size gather works with gloo
    and NCCL; gather (not all_gather) so that only rank 0 ever holds the whole set.
    """
    if not is_distributed():
        return x
    r = rank()
    if x.shape[0] != counts[r]:
        raise ValueError(f"rank {r} has {x.shape[0]} rows, expected {counts[r]}")
    row_bytes = max(1, math.prod(x.shape[1:]) * x.element_size())
    per_round = max(1, max_bytes // row_bytes)
    parts: list[list[torch.Tensor]] = [[] for _ in counts]
    for lo in range(0, max(counts), per_round):
        n = min(per_round, max(counts) - lo)
        padded = torch.zeros((n, *x.shape[1:]), dtype=x.dtype, device=comm_device())
        mine = x[lo:lo + n]
        padded[:len(mine)] = mine.to(padded.device)
        bufs = [torch.empty_like(padded) for _ in counts] if r == 0 else None
        torch_dist.gather(padded, bufs, dst=0)
        if r == 0:
            for k, (buf, c) in enumerate(zip(bufs, counts, strict=True)):
                parts[k].append(buf[:max(0, min(n, c - lo))].cpu())
    if r != 0:
        return None
    return torch.cat([torch.cat(p) if p else x[:0].cpu() for p in parts])


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def destroy() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
