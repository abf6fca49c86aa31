"""Where ddpmkit writes, and how: output paths checked before any work, writes that never
follow a symbolic link.

Rules (README, "Your data is safe"):

* A file is written whole to a fresh temporary file beside it, named
  ``.NAME.<pid>-<random>.tmp`` and created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (so a file
  or link already there under that name is never opened), fsync'ed, then renamed over NAME.
  A rename replaces a link at NAME itself, never the file it points to.
* Files that are appended to or locked in place (``metrics.csv``, ``.lock``) are opened with
  ``O_NOFOLLOW``: a link there is an error, not a way to write somewhere else.
* An output path is refused before any work when it has the wrong suffix, lies in a
  folder that cannot be written, inside a checkpoint (or a run's ``checkpoints/``), or in
  the data folder.

Only the standard library and :mod:`ddpmkit.errors` are imported (``--help`` stays fast).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import ConfigError, DdpmkitError, OutputError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the OS has none (Windows): no links there
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "trainer.safetensors")


def temp_path(path: Path) -> Path:
    """A temporary name beside ``path``, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def open_new(path: Path) -> int:
    """A file descriptor of a file created now: never an existing file, never a link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o666)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a fresh temporary file and a rename; ``write`` fills the file.

    A failure (or Ctrl-C) part-way removes the temporary file and leaves ``path`` as it was;
    an I/O failure (a full disk, a read-only folder) is a one-line DdpmkitError.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        fd = open_new(tmp)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            hint = "; free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise OutputError(f"cannot write {path}: {e.strerror or e}{hint}") from None
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def open_nofollow(path: Path, flags: int, what: str) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` with a one-line error."""
    try:
        return os.open(path, flags | NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise DdpmkitError(f"{path} is a symbolic link; ddpmkit never writes {what} "
                               "through a link (remove it, or use another --out)") from None
        raise DdpmkitError(f"cannot open {path}: {e.strerror or e}") from None


def refuse_link(path: Path, what: str) -> None:
    """A folder that ddpmkit writes into must not be a link to somewhere else."""
    if path.is_symlink():
        raise DdpmkitError(f"{path} is a symbolic link; ddpmkit never writes {what} through a "
                           "link (remove it, or use another --out)")


def check_writable(folder: Path, what: str = "--out") -> None:
    """Create ``folder`` if needed and prove that a file can be made in it (then removed)."""
    make_folder(folder, what)
    probe = temp_path(folder / "write-test")
    try:
        os.close(open_new(probe))
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what}: cannot write in {folder}: {e.strerror or e}") from None


def make_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's words for "a file is in the way"
        raise ConfigError(f"{what}: {folder} is a file, not a folder") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot create {folder}: {e.strerror or e}") from None
    if not folder.is_dir():
        raise ConfigError(f"{what}: {folder} is a file, not a folder")


def checkpoint_holding(path: Path) -> Path | None:
    """The checkpoint folder (or a run's ``checkpoints/``) that ``path`` is or lies in."""
    p = Path(os.path.abspath(path))
    for folder in (p, *p.parents):
        if any((folder / name).exists() for name in CHECKPOINT_FILES):
            return folder
        if folder.name == "checkpoints" and (folder.parent / "config.json").is_file():
            return folder
    return None


def is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both made absolute, links resolved)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def check_output(path: str | Path, *, suffixes: tuple[str, ...] | None = None,
                 data: Path | None = None, flag: str = "--out", writable: bool = True) -> Path:
    """Validate an output file (``suffixes`` given) or folder (``suffixes=None``) up front.

    Refused: a wrong suffix, a folder that cannot be created or written, a place inside a
    checkpoint or a run's ``checkpoints/`` folder, the data folder (or anything in it).
    """
    out = Path(path)
    label = f"{flag} {out}"
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise ConfigError(f"{label}: use a {' or '.join(suffixes)} file name")
    holder = checkpoint_holding(out)
    if holder is not None:
        raise ConfigError(f"{label} lies inside the checkpoint folder {holder}; write "
                          "somewhere else (ddpmkit never writes into checkpoints)")
    if data is not None and is_within(out, data):
        raise ConfigError(f"{label} lies in the data folder {data}; outputs there would become "
                          "training data: write somewhere else")
    if writable:
        check_writable(out if suffixes is None else out.parent, label)
    if suffixes is not None and out.is_dir():
        raise ConfigError(f"{label} is a folder; give a file name")
    return out
