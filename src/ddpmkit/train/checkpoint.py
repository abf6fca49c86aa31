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
A failed write (a full disk) removes the temporary folder and raises a CheckpointError; the
older checkpoints are left as they were.

Weights from elsewhere (``.pt``/``.pth``/``.bin``) are read only by :func:`load_state_dict_file`,
through ``torch.load(weights_only=True)``, which refuses to run code hidden in a pickle.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import RunConfig
from ..errors import CheckpointError, ConfigError
from ..outputs import refuse_link, write_text_atomic

# 2: training noise keyed per example (no "rng.generator"), "rng.cuda.rank{r}", the GradScaler
# state and the overflow count; version 1 checkpoints still resume (their extra state is unused)
FORMAT_VERSION = 2
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
        if "step" in self.trainer_state:
            return int(self.trainer_state["step"])
        name = self.path.name  # loaded without the trainer state: the folder says it
        return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _io_reason(e: BaseException) -> str:
    """The OS's words for an I/O failure (safetensors reports them as SafetensorError)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _space_hint(e: BaseException) -> str:
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "os error 28" in str(e) or "No space left" in str(e)
    return "; free some disk space or lower --keep-checkpoints" if full else ""


def write_json_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fresh temporary file and a rename (a link at
    ``path`` is replaced, never followed: :func:`ddpmkit.outputs.atomic_write`)."""
    write_text_atomic(path, text)  # an I/O failure is a DdpmkitError naming the path


def save_checkpoint(run_dir: str | Path, step: int, model: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor], trainer_tensors: dict[str, torch.Tensor],
                    trainer_state: dict, config: RunConfig, keep: int = 3) -> Path:
    """Write ``RUN_DIR/checkpoints/step-XXXXXXX`` atomically; keep the newest ``keep``.

    An I/O failure (ENOSPC, EIO, ...) is a CheckpointError naming the folder and the OS's
    reason; the half-written temporary folder is removed and older checkpoints stay intact.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    # Unique per process and call; mkdir never reuses (or follows) anything already there.
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}-{secrets.token_hex(4)}"
    old = root / f".old-step-{step:07d}-{os.getpid()}"
    try:
        refuse_link(root, "checkpoints")
        root.mkdir(parents=True, exist_ok=True)
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
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(root)
        prune(root, keep)
    except (OSError, SafetensorError) as e:
        # A half-written folder only eats the space that is short; the finished ones stay.
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not final.exists():  # failed between the swap's two renames
            with contextlib.suppress(OSError):
                os.replace(old, final)
        raise CheckpointError(f"cannot save checkpoint {final.name} in {root}: {_io_reason(e)}"
                              f"{_space_hint(e)} (older checkpoints are intact)") from None
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


def incomplete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Visible ``step-*`` folders that lack a file: damaged by hand or by a failing disk.

    (Atomic saves never leave these; an interrupted save is a hidden ``.tmp-step-*``.)
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    broken = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
              and p.name[5:].isdigit() and not all((p / f).is_file() for f in FILES)]
    return sorted(broken, key=lambda p: int(p.name[5:]))


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and stale temporary folders.

    A dead process's ``.old-step-N`` whose ``step-N`` is missing (it died between the two
    renames of a same-step re-save) is the only copy of that step: it is put back instead.
    """
    for p in root.iterdir():
        mine = p.name.endswith(f"-{os.getpid()}") or f"-{os.getpid()}-" in p.name
        if p.name.startswith((".tmp-step-", ".old-step-")) and not mine:
            restored = root / p.name[len(".old-"):].rsplit("-", 1)[0]
            if p.name.startswith(".old-step-") and not restored.exists():
                with contextlib.suppress(OSError):
                    os.replace(p, restored)
                continue
            shutil.rmtree(p, ignore_errors=True)
    done = list_checkpoints(root.parent)
    for p in done[:-keep] if keep > 0 else []:
        if not p.is_symlink():  # a link is not this run's to delete
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


def read_config(path: Path) -> RunConfig:
    """The ``config.json`` of checkpoint folder ``path``; every problem is a CheckpointError."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing: cannot know the network's shape")
    try:
        return RunConfig.from_json(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not a readable config file: "
                              f"{_io_reason(e)}") from None
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None


def load_checkpoint(path: str | Path, with_trainer: bool = True) -> Checkpoint:
    """Read a checkpoint (or a run folder's newest); every problem is a CheckpointError."""
    path = find_checkpoint(path)
    config = read_config(path)
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


# ---- weights from elsewhere -----------------------------------------------------------------

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a ``.safetensors`` file or a torch ``.pt/.pth/.bin``.

    Pickle-based files are read with ``torch.load(weights_only=True)``: tensors, containers
    and numbers only, so a file that would run code when unpickled is refused (a
    CheckpointError) before any of that code runs. A ``{"state_dict": {...}}`` wrapper, as
    many training frameworks write, is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_tensors(path)
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weights format {suffix or '(no suffix)'!r}; use "
                              f".safetensors or one of {', '.join(PICKLE_SUFFIXES)}")
    try:
        with warnings.catch_warnings():  # torch's note on old pickle protocols is noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only's refusal: the file names a global outside the allow-list.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a plain weights file and was not loaded (it "
                              f"asks to run code when unpickled; only tensors are trusted): "
                              f"{first[:300]}") from None
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, TypeError,
            AttributeError, IndexError, UnicodeDecodeError) as e:
        # Corrupt or truncated archives fail inside torch's reader in many ways.
        raise CheckpointError(f"{path} is not a readable torch weights file (truncated or "
                              f"corrupt?): {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to "
                              f"tensors), but {type(obj).__name__}")
    return dict(obj)


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

