"""diffusers folders on disk: find the parts of one, and write a DDPMPipeline folder.

Two layouts are read:

* a pipeline folder: ``model_index.json``, ``unet/config.json`` +
  ``unet/diffusion_pytorch_model.safetensors`` (older repositories: ``.bin``),
  ``scheduler/scheduler_config.json``;
* a bare ``UNet2DModel`` folder: ``config.json`` + the weights file, with an optional
  ``scheduler_config.json`` beside it (or the pipeline's, when the folder is its ``unet/``).

Only JSON is parsed here; the weights file is read by the caller (``ddpmkit.load``), safely.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError

__all__ = ["DiffusersFolder", "is_diffusers_folder", "find_diffusers", "looks_like_hub_id",
           "hub_id_error", "write_pipeline", "check_export_target", "PIPELINES"]

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PIPELINES = ("DDPMPipeline", "DDIMPipeline")
# What model_index.json files name our writer's version as (the format, not a dependency).
DIFFUSERS_FORMAT_VERSION = "0.27.0"


@dataclass(frozen=True)
class DiffusersFolder:
    """The parts of a diffusers folder that ddpmkit reads."""

    path: Path
    unet_config: dict
    weights: Path
    scheduler_config: dict | None  # None: the folder has none


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") \
            from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} holds {type(d).__name__}, not a JSON object")
    return d


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers pipeline or model folder (not a ddpmkit run)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        d = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False  # ddpmkit's loader reports a broken config.json in its own words
    return isinstance(d, dict) and "_class_name" in d


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` as on the Hugging Face Hub (and not an existing path)."""
    return (not Path(text).exists()
            and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", text) is not None)


def hub_id_error(text: str) -> CheckpointError:
    local = text.split("/")[-1]
    return CheckpointError(
        f"{text} does not exist here; if it is a Hugging Face Hub id, download it first "
        f"(ddpmkit never downloads), e.g. `huggingface-cli download {text} --local-dir "
        f"{local}`, and pass that folder ({local})")


def _weights_in(folder: Path) -> Path:
    for name in WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} has no {' or '.join(WEIGHTS)} (sharded or fp16-only "
                          "weights are not read)")


def _pipeline(path: Path) -> DiffusersFolder:
    index = _read_json(path / "model_index.json")
    cls = index.get("_class_name")
    if cls not in PIPELINES:
        raise ConfigError(f"{path / 'model_index.json'}: pipeline {cls!r} is not supported; "
                          f"ddpmkit reads {' and '.join(PIPELINES)} folders (an unconditional "
                          "pixel-space UNet2DModel and its scheduler)")
    unet = index.get("unet")
    if not (isinstance(unet, list) and unet[-1:] == ["UNet2DModel"]):
        raise ConfigError(f"{path / 'model_index.json'}: unet is {unet!r}, not a UNet2DModel")
    config = _read_json(_need(path / "unet" / "config.json"))
    scheduler = path / "scheduler" / "scheduler_config.json"
    return DiffusersFolder(path, config, _weights_in(path / "unet"),
                           _read_json(scheduler) if scheduler.is_file() else None)


def _need(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    return path


def find_diffusers(path: str | Path) -> DiffusersFolder:
    """The parts of a pipeline or bare-UNet folder (see the module docstring)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return _pipeline(path)
    config = _read_json(_need(path / "config.json"))
    if config.get("_class_name") != "UNet2DModel":
        raise ConfigError(f"{path / 'config.json'} describes a {config.get('_class_name')!r}; "
                          "ddpmkit reads UNet2DModel folders")
    for scheduler in (path / "scheduler_config.json",
                      path.parent / "scheduler" / "scheduler_config.json"):
        if scheduler.is_file():
            return DiffusersFolder(path, config, _weights_in(path), _read_json(scheduler))
    return DiffusersFolder(path, config, _weights_in(path), None)


# ---- writing ------------------------------------------------------------------------------

def check_export_target(out: str | Path, source: str | Path, force: bool = False) -> Path:
    """Refuse an --out that would cost data, before any work is done.

    Rules: ``out`` may not be, contain or lie inside ``source`` (the run or checkpoint being
    exported); a file there is refused; an existing non-empty folder is replaced only with
    ``force`` and only when it is itself a diffusers pipeline folder (an earlier export).
    """
    out, src = Path(out).resolve(), Path(source).resolve()
    if out == src or src in out.parents or out in src.parents:
        raise ConfigError(f"--out {out} overlaps the checkpoint {src}; export to a folder "
                          "outside it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder name")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"--out {out} exists and is not empty (add --force to replace an "
                              "earlier export)")
        if not (out / "model_index.json").is_file():
            raise ConfigError(f"--out {out} is not a diffusers pipeline folder; --force only "
                              "replaces an earlier export, never other files")
    return out


def _save_json(d: dict, path: Path) -> None:
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_pipeline(out: str | Path, unet_config: dict, state: dict[str, torch.Tensor],
                   scheduler_config: dict) -> Path:
    """Write a DDPMPipeline folder atomically: built beside ``out``, then renamed into place.

    ``state`` is already in diffusers' names (float tensors). An existing ``out`` is replaced
    only after the new folder is complete.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "unet").mkdir(parents=True)
        (tmp / "scheduler").mkdir()
        version = {"_diffusers_version": DIFFUSERS_FORMAT_VERSION}
        _save_json({"_class_name": "DDPMPipeline", **version,
                    "scheduler": ["diffusers", "DDPMScheduler"],
                    "unet": ["diffusers", "UNet2DModel"]}, tmp / "model_index.json")
        _save_json({"_class_name": "UNet2DModel", **version, **unet_config},
                   tmp / "unet" / "config.json")
        _save_json({**version, **scheduler_config},
                   tmp / "scheduler" / "scheduler_config.json")
        save_file({k: v.float().contiguous() for k, v in state.items()},
                  tmp / "unet" / WEIGHTS[0], metadata={"format": "pt"})
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from None
    shutil.rmtree(old, ignore_errors=True)
    return out
