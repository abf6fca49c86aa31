"""The run folder: what starting or resuming a run does to what is already in it.

Nothing a run wrote is ever deleted or overwritten by another start; it is moved aside, inside
the run folder, into a folder that is itself a run folder (``sample``, ``eval`` and
``--resume`` read it):

* ``--resume auto`` continues the newest complete checkpoint in ``RUN/checkpoints``.
* A fresh start (``--resume none``, or ``auto`` with nothing to resume) in a folder that holds
  complete checkpoints is refused, unless ``--overwrite``: then the old run (``checkpoints/``,
  ``config.json``, ``metrics.csv``, pictures) moves to ``RUN/replaced-<UTC time>/``. The
  leftovers of a run that never wrote a complete checkpoint move there without asking.
* Resuming ``RUN/checkpoints/step-K`` while newer checkpoints exist starts a branch: the newer
  checkpoints, the metric rows after step K and the pictures move to
  ``RUN/branch-<UTC time>-after-step-K/``. ``keep_checkpoints`` then counts only the branch
  being trained, and the next ``--resume auto`` continues it.
* Resuming a checkpoint from outside RUN into a RUN that holds another run's checkpoints is
  refused unless ``--overwrite`` (the old run moves aside as above).
* Metric rows after the resumed step (a run killed between a log row and its checkpoint) move
  to ``RUN/metrics.cut.csv``.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

from ..errors import ConfigError, DdpmkitError
from ..outputs import atomic_write, open_nofollow, refuse_link
from .checkpoint import incomplete_checkpoints, list_checkpoints

# What a run writes at the top of its folder; anything else there (a user's notes, earlier
# replaced-*/branch-* folders) is left where it is.
RUN_ENTRIES = ("checkpoints", "config.json", "metrics.csv", "metrics.cut.csv", "loss.png",
               "samples.png")


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _new_folder(out: Path, name: str) -> Path:
    """``out/name`` made now (``name-2``, ``-3``, ... when taken): never an existing one."""
    for i in range(1, 1000):
        dest = out / (name if i == 1 else f"{name}-{i}")
        try:
            dest.mkdir()
            return dest
        except FileExistsError:
            continue
    raise DdpmkitError(f"cannot find a free folder name like {out / name}")


def run_entries(out: Path) -> list[Path]:
    """The files and folders of an earlier run at the top of ``out``."""
    found = [out / n for n in RUN_ENTRIES if os.path.lexists(out / n)]
    found += sorted(p for p in out.glob("samples-*.png"))
    return found


def check_start(out: Path, resume: str | Path | None, overwrite: bool) -> None:
    """Refuse, before any work, a start that would bury a run with checkpoints."""
    refuse_link(out / "checkpoints", "checkpoints")
    done = list_checkpoints(out)
    if not done or overwrite:
        return
    if resume is None:
        raise ConfigError(
            f"{out} already holds a run (checkpoints up to {done[-1].name}); to continue it "
            f"use --resume auto, to start another pass --out NEW, or pass --resume none "
            f"--overwrite to move the old run aside into {out}/replaced-<time>/")
    if resume != "auto" and not _inside(Path(resume), out / "checkpoints"):
        raise ConfigError(
            f"{out} already holds another run (checkpoints up to {done[-1].name}); resume "
            f"{resume} into a new --out, or pass --overwrite to move the old run aside into "
            f"{out}/replaced-<time>/")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def move_old_run_aside(out: Path) -> Path | None:
    """Move an earlier run's files into ``out/replaced-<time>/``; returns it (None: none)."""
    entries = run_entries(out)
    if not entries:
        return None
    dest = _new_folder(out, f"replaced-{_stamp()}")
    for p in entries:
        os.replace(p, dest / p.name)
    return dest


def branch_aside(out: Path, step: int, metric_fields: list[str]) -> Path | None:
    """Move checkpoints newer than ``step`` (a branch left behind) and what belongs to them
    into ``out/branch-<time>-after-step-<step>/``; returns it (None: nothing newer)."""
    newer = [p for p in list_checkpoints(out) + incomplete_checkpoints(out)
             if int(p.name[5:]) > step]
    if not newer:
        return None
    dest = _new_folder(out, f"branch-{_stamp()}-after-step-{step}")
    (dest / "checkpoints").mkdir()
    for p in newer:
        os.replace(p, dest / "checkpoints" / p.name)
    if (out / "config.json").is_file() and not (out / "config.json").is_symlink():
        atomic_write(dest / "config.json", lambda f: f.write((out / "config.json").read_bytes()))
    for p in [out / "samples.png", out / "loss.png", *out.glob("samples-*.png")]:
        tail = p.stem.rpartition("-")[2]
        if os.path.lexists(p) and (not tail.isdigit() or int(tail) > step):
            os.replace(p, dest / p.name)
    trim_metrics(out / "metrics.csv", step, metric_fields, dest / "metrics.csv")
    return dest


def trim_metrics(path: Path, step: int, metric_fields: list[str], cut_to: Path) -> int:
    """Keep the rows of ``path`` up to ``step``; append the others to ``cut_to``.

    A row cut short by a kill (fewer fields than the header) is moved too. A header other
    than ``metric_fields`` (an older version's columns) is rewritten. Both files are written
    through a temporary file and a rename; returns the number of rows moved.
    """
    if not os.path.lexists(path):
        return 0
    refuse_link(path, "metrics")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames
        keep = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step
                and None not in r.values() and None not in r]
        cut = [r for r in rows if not any(r is k for k in keep)]
        if cut:
            earlier = []
            if os.path.lexists(cut_to):
                with open(cut_to, newline="") as f:
                    earlier = list(csv.DictReader(f))
            _write_rows(cut_to, earlier + cut, metric_fields)
        if cut or header != metric_fields:
            # also when an older ddpmkit wrote fewer columns (bad_files): appended rows
            # must line up with the header
            _write_rows(path, keep, metric_fields)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DdpmkitError(f"cannot rewrite {path} on resume: {e}; move it away to start a "
                           "fresh metrics file") from None
    return len(cut)


def _write_rows(path: Path, rows: list[dict], metric_fields: list[str]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=metric_fields, extrasaction="ignore", restval="")
    w.writeheader()
    w.writerows({k: v for k, v in r.items() if k is not None} for r in rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def append_row(path: Path, row: dict, metric_fields: list[str]) -> None:
    """One row onto ``metrics.csv`` (header first), never through a link."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "metrics")
    with os.fdopen(fd, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=metric_fields)
        if f.tell() == 0:
            w.writeheader()
        w.writerow(row)
