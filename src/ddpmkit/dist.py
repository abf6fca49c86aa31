"""torchrun helpers: rank, world size, device choice and rank-0 printing.

Only torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) is read. Without
it everything runs single-process and no process group is created.
"""

from __future__ import annotations

import os

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


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> this process's GPU when CUDA is present, else the CPU; or an explicit name."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device name (auto, cpu, cuda, cuda:N)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available on this machine")
    return device


def init_process_group(device: torch.device) -> bool:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); False when single-process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def destroy() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
