"""Checkpoints: a folder of safetensors + JSON, written atomically. Nothing is ever unpickled.

Layout of a run folder::

    RUN_DIR/config.json                   the resolved config of the run
    RUN_DIR/checkpoints/step-0001000/     one complete checkpoint
        model.safetensors                 the trained weights
        ema.safetensors                   the EMA weights (what sampling and eval use)
        trainer.safetensors               optimizer state, RNG states, timestep-sampler state;
                                          its metadata holds the JSON trainer state (step, ...)
        config.json                       the run's config, so the folder stands alone

A checkpoint is written into a hidden temporary folder beside its final place, every file
fsync'ed, then renamed into place (atomic on POSIX) and the parent fsync'ed. A crash at any
moment leaves either the previous checkpoints or the new one complete, never a half one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import RunConfig
from ..errors import CheckpointError, ConfigError

FORMAT_VERSION = 1
FILES = ("model.safetensors", "ema.safetensors", "trainer.safetensors", "config.json")


@dataclass
class Checkpoint:
    path: Path
    config: RunConfig
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    trainer_tensors: dict[str, torch.Tensor]
    trainer_state: dict

    @property
    def step(self) -> int:
        return int(self.trainer_state.get("step", 0))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def write_json_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, model: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor], trainer_tensors: dict[str, torch.Tensor],
                    trainer_state: dict, config: RunConfig, keep: int = 3) -> Path:
    """Write ``RUN_DIR/checkpoints/step-XXXXXXX`` atomically; keep the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = dict(trainer_state, step=step, format_version=FORMAT_VERSION)
    save_file(_contiguous(model), tmp / "model.safetensors")
    save_file(_contiguous(ema), tmp / "ema.safetensors")
    save_file(_contiguous(trainer_tensors), tmp / "trainer.safetensors",
              metadata={"trainer_state": json.dumps(state)})
    (tmp / "config.json").write_text(config.to_json())
    for name in FILES:
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():  # re-saving the same step (e.g. a signal right after a checkpoint)
        old = root / f".old-step-{step:07d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    prune(root, keep)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() \
                and all((p / f).is_file() for f in FILES):
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and stale temporary folders."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-step-", ".old-step-")) and not p.name.endswith(
                f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
    done = list_checkpoints(root.parent)
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder meaning its newest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / "model.safetensors").exists() or (path / "ema.safetensors").exists():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path} holds no complete checkpoint (expected a run folder with "
                              "checkpoints/step-*/ or a checkpoint folder)")
    return found[-1]


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or "
                              f"corrupt?): {e}") from None


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for k, v in tensors.items():
        if v.dtype.is_floating_point and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: tensor {k!r} contains NaN or infinite values")


def load_checkpoint(path: str | Path, with_trainer: bool = True) -> Checkpoint:
    """Read a checkpoint (or a run folder's newest); every problem is a CheckpointError."""
    path = find_checkpoint(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing: cannot know the network's shape")
    try:
        config = RunConfig.from_json(config_path.read_text())
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    ema = _load_tensors(path / "ema.safetensors")
    model = _load_tensors(path / "model.safetensors")
    _check_finite(path / "ema.safetensors", ema)
    _check_finite(path / "model.safetensors", model)
    trainer_tensors: dict[str, torch.Tensor] = {}
    state: dict = {}
    if with_trainer:
        trainer_path = path / "trainer.safetensors"
        trainer_tensors = _load_tensors(trainer_path)
        from safetensors import safe_open
        with safe_open(trainer_path, framework="pt") as f:
            meta = f.metadata() or {}
        try:
            state = json.loads(meta.get("trainer_state", "{}"))
        except json.JSONDecodeError:
            raise CheckpointError(f"{trainer_path}: trainer state is not valid JSON") from None
        version = state.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer ddpmkit (format {version}); "
                                  "upgrade ddpmkit to read it")
    return Checkpoint(path, config, model, ema, trainer_tensors, state)


# ---- optimizer state <-> flat tensors + JSON ---------------------------------------------

def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> ({"optim.<param>.<key>": tensor}, JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, pstate in state_dict["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    meta = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    return tensors, meta


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}

