"""Reliability and security (issue 6): crashes, signals, full disks, NaNs, bad input, untrusted
files and paths. Every user-facing failure must be one ``error:`` line with exit status 2.

The subprocess tests run ``python -m ddpmkit train`` on a tiny array data set (no scikit-learn
import, so a process starts in ~2-3 s) with one thread, as the in-process tests do.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from test_train import TINY_FLAGS, tiny_config

from ddpmkit import config as C
from ddpmkit.cli import build_parser, config_from_args, default_run_dir, main
from ddpmkit.diffusion import GaussianDiffusion
from ddpmkit.errors import CheckpointError, DdpmkitError
from ddpmkit.train import checkpoint as ckpt_mod
from ddpmkit.train import trainer as trainer_mod
from ddpmkit.train.checkpoint import (
    find_checkpoint,
    incomplete_checkpoints,
    list_checkpoints,
    load_checkpoint,
    load_state_dict_file,
    save_checkpoint,
)
from ddpmkit.train.trainer import TrainingDiverged, train

STEP_FLAGS = ["--max-minutes", "0", *TINY_FLAGS]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one non-empty stderr line, ``error: ...``, holding every needle."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny_npy(tmp_path_factory) -> Path:
    """40 random 8x8 grey images (38 train, 2 test) as uint8."""
    path = tmp_path_factory.mktemp("data") / "tiny.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A one-step tiny digits run, to copy and damage."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--out", str(run), "--max-steps", "1", *STEP_FLAGS]) == 0
    return run


def _checksum_dirs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# ---- atomic checkpoints, keep-N, "newest complete" -----------------------------------------

def _fake_save(run: Path, step: int, keep: int = 3) -> Path:
    w = {"w": torch.full((3,), float(step))}
    return save_checkpoint(run, step, w, w, {"rng.generator": torch.zeros(4, dtype=torch.uint8)},
                           {}, tiny_config(), keep=keep)


def test_newest_complete_checkpoint_is_found_and_old_ones_pruned(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_save(tmp_path, step, keep=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    # A newer folder missing a file (damaged by hand) and a dead process's temporary folder
    # are both passed over: the run folder means its newest *complete* checkpoint.
    broken = root / "step-0000009"
    shutil.copytree(root / "step-0000004", broken)
    (broken / "ema.safetensors").unlink()
    (root / ".tmp-step-0000010-999999").mkdir()
    assert find_checkpoint(tmp_path) == root / "step-0000004"
    assert load_checkpoint(tmp_path).step == 4
    assert incomplete_checkpoints(tmp_path) == [broken]
    # The next save prunes the dead process's temporary folder.
    _fake_save(tmp_path, 5, keep=2)
    assert not (root / ".tmp-step-0000010-999999").exists()
    assert load_checkpoint(tmp_path).step == 5


def test_a_save_interrupted_mid_swap_gets_its_checkpoint_back(tmp_path, monkeypatch):
    """Re-saving a step swaps folders with two renames; between them step-N exists only as
    .old-step-N. A failure there puts it back, and so does the next save after a crash."""
    _fake_save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the second rename of the swap: tmp -> step-0000001
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(CheckpointError, match="Input/output error"):
        _fake_save(tmp_path, 1)
    monkeypatch.undo()
    assert [p.name for p in root.iterdir()] == ["step-0000001"]
    # A process killed between the renames leaves .old-step-N; the next save restores it.
    os.rename(root / "step-0000001", root / ".old-step-0000001-999999")
    _fake_save(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]
    assert torch.equal(load_checkpoint(root / "step-0000001").model["w"], torch.ones(3))


def test_resume_auto_reports_incomplete_checkpoints(tmp_path, capsys, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "checkpoints" / "step-0000001" / "model.safetensors").unlink()
    rc, out, _ = cli(capsys, "train", "--out", str(run), "--max-steps", "1", *STEP_FLAGS)
    assert rc == 0
    assert "starting a new run" in out and "ignoring 1 incomplete checkpoint folder" in out


def test_resume_between_log_steps_writes_the_rows_of_a_straight_run(tmp_path):
    """The metric row in progress travels in the checkpoint (log_every=2, resume at step 3)."""
    cfg = tiny_config(max_steps=4, checkpoint_every=3, log_every=2)
    train(cfg, tmp_path / "full", resume=None, progress=False)
    part = cfg.replace(train=C.section_from_dict(C.TrainConfig, {"max_steps": 3}, cfg.train))
    train(part, tmp_path / "part", resume=None, progress=False)
    train(cfg, tmp_path / "part", resume="auto", progress=False)
    assert _metric_rows(tmp_path / "full") == _metric_rows(tmp_path / "part")


def test_resuming_a_finished_run_does_not_rewrite_its_checkpoint(tmp_path):
    """Nothing to do: the checkpoint on disk stays as it is (no delete-and-replace window)."""
    cfg = tiny_config(max_steps=2, checkpoint_every=2)
    first = train(cfg, tmp_path, resume=None, progress=False)
    inode = first.checkpoint.stat().st_ino
    again = train(cfg, tmp_path, resume="auto", progress=False)
    assert again.step == 2 and again.checkpoint == first.checkpoint
    assert first.checkpoint.stat().st_ino == inode


def _metric_rows(run: Path) -> list[dict]:
    import csv
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("steps_per_s", "elapsed_s")}
                for r in csv.DictReader(f)]


# ---- SIGKILL at random moments; SIGTERM / SIGINT --------------------------------------------

def _train_cmd(run: Path, data: Path, max_steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ddpmkit", "train", "--config", "digits", "--data", str(data),
            "--out", str(run), "--max-steps", str(max_steps), *STEP_FLAGS, *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _newest_step(run: Path) -> int:
    found = list_checkpoints(run)
    return int(found[-1].name[5:]) if found else 0


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress in {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)


def _kill_resume_cycle(tmp_path: Path, data: Path, kills: int, max_steps: int,
                       seed: int) -> None:
    """SIGKILL a training process ``kills`` times at random moments, resuming each time."""
    # An uninterrupted run of the same config, on the other core meanwhile, to compare with.
    ref, ref_log = tmp_path / "reference", tmp_path / "reference.log"
    with open(ref_log, "wb") as f:
        ref_proc = subprocess.Popen(_train_cmd(ref, data, max_steps), stdout=f,
                                    stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    try:
        _kill_legs(tmp_path, data, kills, max_steps, seed)
        assert ref_proc.wait(timeout=120) == 0, ref_log.read_text()[-3000:]
    finally:
        if ref_proc.poll() is None:
            ref_proc.kill()
            ref_proc.wait()
    # Resumed after every kill, the run ends bit-identical to the one never interrupted.
    run = tmp_path / "run"
    for name in ("model.safetensors", "ema.safetensors", "trainer.safetensors"):
        a = load_file(run / "checkpoints" / f"step-{max_steps:07d}" / name)
        b = load_file(ref / "checkpoints" / f"step-{max_steps:07d}" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert _metric_rows(run) == _metric_rows(ref)


def _kill_legs(tmp_path: Path, data: Path, kills: int, max_steps: int, seed: int) -> None:
    rng = random.Random(seed)
    run = tmp_path / "run"
    cmd = _train_cmd(run, data, max_steps, "--checkpoint-every", "1", "--keep-checkpoints", "2")
    previous = 0
    for leg in range(kills):
        log = tmp_path / f"leg{leg}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(),
                                    cwd=tmp_path)
        try:
            # A random moment: 1-3 checkpoints into this leg, then 0-100 ms more, which lands
            # anywhere in a step or a save. Bounded, so the run never finishes before its kill.
            target = previous + rng.randint(1, 3)
            _wait_for(lambda t=target: _newest_step(run) >= t, proc, log)
            time.sleep(rng.uniform(0.0, 0.1))
            assert proc.poll() is None, "the run ended before its kill: raise max_steps"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        text = log.read_text()
        if leg > 0:  # resumed from the newest checkpoint the previous kill left
            assert f"step-{previous:07d} at step {previous}" in text, text[-2000:]
        # The newest complete checkpoint is always readable, and never older than progress.
        newest = load_checkpoint(run)
        assert newest.step >= target
        previous = newest.step
    assert previous < max_steps
    # Last leg: run to the end.
    log = tmp_path / "final.log"
    with open(log, "wb") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path,
                              timeout=120)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert f"step-{previous:07d} at step {previous}" in text
    found = list_checkpoints(run)
    assert found[-1].name == f"step-{max_steps:07d}" and len(found) == 2
    for path in found:
        assert load_checkpoint(path).step == int(path.name[5:])
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_sigkill_twice_then_resume_to_the_end(tmp_path, tiny_npy):
    _kill_resume_cycle(tmp_path, tiny_npy, kills=2, max_steps=18, seed=6)


@pytest.mark.slow
def test_sigkill_five_times_then_resume_to_the_end(tmp_path, tiny_npy):
    _kill_resume_cycle(tmp_path, tiny_npy, kills=5, max_steps=45, seed=2024)


def test_sigterm_and_sigint_save_a_checkpoint_then_exit_0(tmp_path, tiny_npy):
    """Both signals at once, in two processes: each saves its step, says so, exits 0."""
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        run, log = tmp_path / sig.name, tmp_path / f"{sig.name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(_train_cmd(run, tiny_npy, 100_000, "--checkpoint-every",
                                               "100000"),
                                    stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
        procs[sig] = (proc, run, log)
    try:
        for sig, (proc, run, log) in procs.items():
            # metrics.csv appears at step 2 (log_every=2): the loop, with its handler, is on.
            _wait_for(lambda r=run: (r / "metrics.csv").exists(), proc, log)
            proc.send_signal(sig)
        for sig, (proc, run, log) in procs.items():
            rc = proc.wait(timeout=60)
            text = log.read_text()
            assert rc == 0, text[-3000:]
            assert f"received {sig.name}: saving a checkpoint" in text
            m = re.search(r"stopped \(signal\) at step (\d+)", text)
            assert m, text[-3000:]
            step = int(m.group(1))
            assert step >= 2
            assert [p.name for p in list_checkpoints(run)] == [f"step-{step:07d}"]
            assert load_checkpoint(run).step == step
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---- full disk, unwritable folder -----------------------------------------------------------

def test_unwritable_output_folder_fails_at_once(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # --data is bad too: the output folder is checked first, before any data is read.
    rc, _, err = cli(capsys, "train", "--out", str(blocker / "run"), "--data", "nope",
                     *STEP_FLAGS)
    assert_one_error_line(rc, err, "cannot write to the output folder", "Not a directory")


def test_too_little_free_space_fails_before_training(tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(trainer_mod.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 4096))
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "3", *STEP_FLAGS)
    assert_one_error_line(rc, err, "MiB free", "one checkpoint", "--out")
    assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    # what safetensors itself raises when the OS refuses a write
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_full_disk_during_a_save_keeps_the_older_checkpoints(tmp_path, capsys, monkeypatch,
                                                            failure):
    real, calls = ckpt_mod.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 5:  # the second checkpoint's second file: a half-written folder
            raise failure
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", save_file)
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "6",
                     "--checkpoint-every", "2", *STEP_FLAGS)
    assert_one_error_line(rc, err, "cannot save checkpoint step-0000004", str(run / "checkpoints"),
                          "No space left on device", "free some disk space", "intact")
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]
    assert load_checkpoint(run).step == 2
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


# ---- numerical faults -----------------------------------------------------------------------

@pytest.fixture
def nan_steps(monkeypatch):
    """Arm NaNs for training steps ``first`` .. ``last`` (0-based, inclusive; None: forever),
    in the loss itself or only in its gradient (the loss stays finite)."""
    def arm(first: int, last: int | None = None, where: str = "loss") -> None:
        real, calls = GaussianDiffusion.training_losses, [0]

        def training_losses(self, *args, **kwargs):
            terms = real(self, *args, **kwargs)
            i = calls[0]
            calls[0] += 1
            if i >= first and (last is None or i <= last):
                if where == "loss":
                    terms = dict(terms, loss=terms["loss"] * float("nan"))
                else:
                    terms["loss"].register_hook(lambda g: g * float("nan"))
            return terms

        monkeypatch.setattr(GaussianDiffusion, "training_losses", training_losses)
    return arm


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_steps_are_skipped_and_counted(tmp_path, nan_steps, where):
    nan_steps(2, 3, where)  # steps 3 and 4 (1-based) go bad, then it recovers
    cfg = tiny_config(max_steps=6, checkpoint_every=3, log_every=1, max_bad_steps=3)
    res = train(cfg, tmp_path, resume=None, progress=False)
    assert res.step == 6 and np.isfinite(res.final_loss)
    rows = _metric_rows(tmp_path)
    assert [int(r["skipped"]) for r in rows] == [0, 0, 1, 2, 2, 2]
    assert rows[2]["loss"] == "" and rows[3]["loss"] == ""  # nothing finite to average
    for path in list_checkpoints(tmp_path):  # load_checkpoint refuses NaN weights
        assert load_checkpoint(path).trainer_state["skipped"] == (2 if int(path.name[5:]) > 3
                                                                  else 1)


def test_persistent_nans_stop_training_with_advice(tmp_path, capsys, nan_steps):
    nan_steps(4)  # from step 5 (1-based) on
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "20",
                     "--checkpoint-every", "2", "--max-bad-steps", "3", *STEP_FLAGS)
    line = assert_one_error_line(rc, err, "3 consecutive non-finite steps ending at step 7",
                                 "loss=nan", "mse=", "step-0000006", "untouched", "--lr")
    assert "3 skipped in all" in line
    # Step 6's checkpoint was written mid-streak: skipped steps never touch the weights.
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002", "step-0000004",
                                                       "step-0000006"]
    four, six = load_checkpoint(run / "checkpoints" / "step-0000004"), load_checkpoint(run)
    assert six.step == 6 and six.trainer_state["skipped"] == 2
    for k in four.model:
        assert torch.equal(four.model[k], six.model[k])
        assert torch.isfinite(six.model[k]).all() and torch.isfinite(six.ema[k]).all()
    # With --debug the same failure shows its traceback (raised, here).
    with pytest.raises(TrainingDiverged, match="consecutive non-finite steps"):
        main(["train", "--out", str(tmp_path / "dbg"), "--max-steps", "20",
              "--max-bad-steps", "3", "--debug", *STEP_FLAGS])


# ---- bad input: one line each ---------------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    import io
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def _grey(i: int, size: int = 8) -> bytes:
    return _png(Image.new("L", (size, size), i * 10))


GOOD = {f"{i:02d}.png": _grey(i) for i in range(20)}


@pytest.mark.parametrize("files,flags,needles", [
    ({**GOOD, "bad.png": _grey(1)[:40]}, ["--bad-files", "fail"], ["cannot read image", "bad.png",
                                                                   "--bad-files skip"]),
    ({**GOOD, "notes.jpg": b"just text"}, ["--bad-files", "fail"], ["cannot read image",
                                                                    "notes.jpg"]),
    ({**GOOD, "big.png": _grey(1, 16)}, [], ["differ in size", "--image-size"]),
    ({}, [], ["holds no image files"]),
    ({"only.png": _grey(1)}, [], ["batch_size=16 is larger than the data set (1 examples)"]),
    ({"a.png": b"x", "b.png": b"y"}, [], ["no readable image"]),
], ids=["truncated", "not-an-image", "mixed-sizes", "empty", "single-image", "all-unreadable"])
def test_bad_image_folders_give_one_line(tmp_path, capsys, files, flags, needles):
    data = _folder(tmp_path / "imgs", files)
    rc, _, err = cli(capsys, "train", "--data", str(data), "--config", "digits", "--out",
                     str(tmp_path / "run"), "--max-steps", "1", *flags, *STEP_FLAGS)
    err = "\n".join(ln for ln in err.splitlines() if not ln.startswith("warning: "))
    assert_one_error_line(rc, err, *needles)


def test_unreadable_images_are_skipped_with_a_count(tmp_path, capsys):
    data = _folder(tmp_path / "imgs", {**GOOD, "bad.png": _grey(1)[:40], "worse.png": b"??"})
    rc, out, err = cli(capsys, "train", "--data", str(data), "--config", "digits", "--out",
                       str(tmp_path / "run"), "--max-steps", "1", *STEP_FLAGS)
    assert rc == 0, err
    assert "skipped 2 unreadable file(s)" in out
    warned = [ln for ln in err.splitlines() if ln.strip()]
    assert len(warned) == 2 and all(ln.startswith("warning: skipping unreadable image")
                                    for ln in warned), err


def test_mixed_modes_and_16_bit_images_train(tmp_path, capsys):
    wide = Image.fromarray(np.full((8, 8), 40_000, dtype=np.uint16))
    files = {**GOOD, "colour.png": _png(Image.new("RGB", (8, 8), (200, 10, 10))),
             "deep.png": _png(wide)}
    data = _folder(tmp_path / "imgs", files)
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", "--data", str(data), "--config", "digits", "--out",
                       str(run), "--max-steps", "1", *STEP_FLAGS)
    assert rc == 0, err
    assert "shape (3, 8, 8)" in out  # one colour image makes the set RGB
    assert load_checkpoint(run).config.model.in_channels == 3


def _npy(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr, allow_pickle=True)
    return path


_NAN = np.zeros((20, 8, 8), np.float32)
_NAN[3, 2, 2] = np.nan


@pytest.mark.parametrize("arr,needles", [
    (np.zeros(10, np.uint8), ["has shape (10,)", "expected [N, H, W]"]),
    (np.zeros((20, 8, 8), np.complex64), ["dtype complex64", "expected uint8"]),
    (np.full((20, 8, 8), 300, np.int32), ["integers in [300, 300]", "[0, 255]"]),
    (np.full((20, 8, 8), 2.5, np.float32), ["out of range [2.5, 2.5]", "[-1, 1]"]),
    (_NAN, ["1 non-finite values"]),
    (np.array([{"a": 1}], dtype=object), ["holds Python objects", "refused"]),
], ids=["rank", "dtype", "int-range", "float-range", "nan", "pickled-objects"])
def test_bad_arrays_give_one_line(tmp_path, capsys, arr, needles):
    data = _npy(tmp_path / "data.npy", arr)
    rc, _, err = cli(capsys, "train", "--data", str(data), "--config", "digits", "--out",
                     str(tmp_path / "run"), "--max-steps", "1", *STEP_FLAGS)
    assert_one_error_line(rc, err, str(data), *needles)


@pytest.mark.parametrize("flags,needles", [
    (["--config", "{cfg}"], ["unknown key 'batchsize' in [train]", "did you mean 'batch_size'"]),
    (["--config", "{bin}"], ["is not UTF-8 text"]),
    (["--batch-size", "abc"], ["train.batch_size='abc' must be an integer"]),
    (["--lr", "1e999"], ["must be a finite number"]),
    (["--max-steps", "9" * 5000], ["must be an integer"]),
    (["--flip", "maybe"], ["must be true or false"]),
    (["--timesteps", "0"], ["timesteps=0 must be an integer >= 1"]),
    (["--timesteps", "10", "--schedule", "linear"], ["beta_T = 2 >= 1"]),
    (["--channel-mult", "1,2,2,2,2"], ["image_size=8 is not divisible"]),
    (["--attention-resolutions", "3"], ["attention_resolutions has 3", "feature maps are 8, 4"]),
    (["--batch-size", "5000"], ["batch_size=5000 is larger than the data set (1500 examples)"]),
    (["--max-steps", "-1"], ["max_steps=-1 must be >= 0"]),
    (["--keep-checkpoints", "-2"], ["keep_checkpoints=-2 must be > 0"]),
    (["--sample-num", "-3"], ["num=-3 must be > 0"]),
    (["--checkpoint-every", "0"], ["checkpoint_every=0 must be > 0"]),
    (["--groups", "5"], ["groups=5 does not divide"]),
    (["--sample-spacing", "1,²"], ["spacing='1,²' must be trailing"]),
    (["--device", "tpu"], ["device='tpu' is not a device name"]),
    (["--data", "digit"], ["unknown data set 'digit'", "did you mean 'digits'"]),
    (["--config", "digit"], ["neither a preset", "did you mean 'digits'"]),
], ids=lambda v: "-".join(v)[:40] if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_bad_configs_and_flags_give_one_line(tmp_path, capsys, flags, needles):
    cfg = tmp_path / "my.toml"
    cfg.write_text("[train]\nbatchsize = 3\n")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00[train]")
    flags = [f.format(cfg=cfg, bin=binary) for f in flags]
    rc, _, err = cli(capsys, "train", "--out", str(tmp_path / "run"), "--max-steps", "1",
                     *STEP_FLAGS, *flags)
    assert_one_error_line(rc, err, *needles)


@pytest.mark.parametrize("make,needle", [
    (lambda: C.RunConfig.from_dict({"train": {"max_steps": -(10 ** 5000)}}),
     "max_steps=<an integer of about 5000 digits> must be >= 0"),
    (lambda: C.RunConfig.from_dict({"train": {"lr": 10 ** 400}}), "must be a finite number"),
    (lambda: C.RunConfig.from_json('{"train": {"max_steps": ' + "9" * 5000 + "}}"),
     "not valid JSON"),
    (lambda: C.RunConfig.from_dict({"train": {"batch_size": "x" * 10_000}}), "..."),
])
def test_extreme_config_values_give_short_errors(make, needle):
    with pytest.raises(DdpmkitError) as e:
        make()
    assert needle in str(e.value) and len(str(e.value)) < 300


def test_unknown_flag_suggests_the_right_one(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--batchsize", "3"])
    assert e.value.code == 2
    assert "did you mean --batch-size?" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["eval", "--max-examples", "-1"], "--max-examples: must be an integer >= 1"),
    (["eval", "--levels", "1", "--force"], "--levels: must be an integer >= 2"),
    (["show", "--frames", "1"], "--frames: must be an integer >= 2"),
])
def test_bad_counts_for_eval_and_show_are_usage_errors(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--checkpoint", "x"])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def _edit_config(ckpt: Path, fn) -> None:
    d = json.loads((ckpt / "config.json").read_text())
    fn(d)
    (ckpt / "config.json").write_text(json.dumps(d))


def _truncate(ckpt: Path) -> None:
    p = ckpt / "ema.safetensors"
    p.write_bytes(p.read_bytes()[:1000])


def _nan_weight(ckpt: Path) -> None:
    t = load_file(ckpt / "ema.safetensors")
    t["conv_in.bias"] = torch.full_like(t["conv_in.bias"], float("nan"))
    save_file(t, ckpt / "ema.safetensors")


CHECKPOINT_DAMAGE = {
    "truncated": (_truncate, ["ema.safetensors is not a readable safetensors file",
                              "truncated or corrupt"]),
    "wrong-architecture": (lambda c: _edit_config(c, lambda d: d["model"].update(channels=32)),
                           ["do not fit the network", "size mismatch for conv_in.weight"]),
    "impossible-config": (lambda c: _edit_config(c, lambda d: d["model"].update(image_size=16)),
                          ["config.json: attention_resolutions has 4"]),
    "config-missing": (lambda c: (c / "config.json").unlink(), ["config.json is missing"]),
    "config-from-the-future": (lambda c: _edit_config(c, lambda d: d.update(version=99)),
                               ["config version 99 is newer", "upgrade ddpmkit"]),
    "config-not-json": (lambda c: (c / "config.json").write_text("{"), ["not valid JSON"]),
    "config-binary": (lambda c: (c / "config.json").write_bytes(b"\xff\xfe\x00"),
                      ["not a readable config file"]),
    "nan-weights": (_nan_weight, ["tensor 'conv_in.bias' contains NaN or infinite values"]),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoints_give_one_line(tmp_path, capsys, trained_run, damage):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints" / "step-0000001"
    fn, needles = CHECKPOINT_DAMAGE[damage]
    fn(ckpt)
    for argv in (["sample", "--checkpoint", str(ckpt), "--num", "2", "--steps", "2", "--out",
                  str(tmp_path / "s.png"), "--no-progress"],
                 ["eval", "--checkpoint", str(ckpt), "--max-examples", "1", "--no-progress"]):
        rc, _, err = cli(capsys, *argv)
        assert_one_error_line(rc, err, *needles)
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("flags,needles", [
    (["--timesteps", "50"], ["was trained with other settings", "diffusion.timesteps 40 -> 50",
                             "new --out"]),
    (["--model-channels", "32"], ["was trained with other settings", "model.channels 16 -> 32",
                                  "new --out"]),
])
def test_resume_into_another_config_is_one_line(tmp_path, capsys, trained_run, flags,
                                                needles):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "2", *STEP_FLAGS,
                     *flags)
    assert_one_error_line(rc, err, *needles)


def test_damaged_trainer_state_on_resume_is_one_line(tmp_path, capsys, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ema = run / "checkpoints" / "step-0000001" / "ema.safetensors"
    t = load_file(ema)
    del t["conv_in.bias"]
    save_file(t, ema)
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "2", *STEP_FLAGS)
    assert_one_error_line(rc, err, "trainer state", "cannot be restored", "conv_in.bias")


@pytest.mark.parametrize("extra,needles", [
    (["--sampler", "ancestral", "--spacing", "100"], ["section 0 has 40 steps, cannot keep 100"]),
    (["--out", "{tmp}/s.jpg"], ["use a .png or .npz file name"]),
    (["--out", "{tmp}/blocker/s.png"], ["blocker is a file, not a folder"]),
])
def test_bad_sampling_requests_give_one_line(tmp_path, capsys, trained_run, extra, needles):
    (tmp_path / "blocker").write_text("a file")
    extra = [e.format(tmp=tmp_path) for e in extra]
    rc, _, err = cli(capsys, "sample", "--checkpoint", str(trained_run), "--num", "2",
                     "--out", str(tmp_path / "s.png"), "--no-progress", *extra)
    assert_one_error_line(rc, err, *needles)


@pytest.mark.parametrize("argv,name,needle", [
    (["encode", "--steps", "2"], "e.png", "blocker is a file, not a folder"),
    (["show"], "show", "cannot create"),
])
def test_output_under_a_file_is_refused_before_any_work(tmp_path, capsys, trained_run, argv,
                                                        name, needle):
    (tmp_path / "blocker").write_text("a file")
    out = tmp_path / "blocker" / name
    rc, _, err = cli(capsys, *argv, "--checkpoint", str(trained_run), "--out", str(out))
    assert_one_error_line(rc, err, needle, "Not a directory" if argv[0] == "show" else "")


def test_eval_refuses_other_levels_unless_forced(capsys, trained_run):
    rc, _, err = cli(capsys, "eval", "--checkpoint", str(trained_run), "--levels", "256",
                     "--max-examples", "1", "--no-progress")
    assert_one_error_line(rc, err, "17 levels", "--force")
    rc, out, err = cli(capsys, "eval", "--checkpoint", str(trained_run), "--levels", "256",
                       "--force", "--max-examples", "1", "--no-progress", "--json")
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["levels"] == 256


# ---- untrusted files ------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates ``path``: a stand-in for code run by a malicious file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("suffix,writer", [
    (".pt", lambda obj, p: torch.save(obj, p)),
    (".bin", lambda obj, p: p.write_bytes(pickle.dumps(obj))),
    (".pth", lambda obj, p: p.write_bytes(pickle.dumps(obj, protocol=2))),
])
def test_malicious_pickles_are_refused_without_running(tmp_path, suffix, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / f"weights{suffix}"
    writer({"conv.weight": torch.zeros(2), "x": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="not loaded|not a readable"):
        load_state_dict_file(path)
    assert not marker.exists()
    # The payload is live: plain unpickling would have run it.
    if suffix != ".pt":
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_state_dict_files_that_are_fine_load(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "a.bias": torch.zeros(3)}
    torch.save(sd, tmp_path / "m.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    save_file(sd, tmp_path / "m.safetensors")
    for name in ("m.pt", "wrapped.pth", "m.safetensors"):
        got = load_state_dict_file(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:100])
    (tmp_path / "m.ckpt").write_bytes(b"")
    for name, match in (("list.pt", "does not hold a state dict"), ("cut.pt", "not a readable"),
                        ("m.ckpt", "unknown weights format"), ("none.pt", "does not exist")):
        with pytest.raises(CheckpointError, match=match):
            load_state_dict_file(tmp_path / name)


def test_checkpoints_hold_no_pickles(trained_run):
    for p in (trained_run / "checkpoints" / "step-0000001").iterdir():
        assert p.suffix in (".safetensors", ".json")
        assert b"\x80\x04\x95" not in p.read_bytes()[:16]


# ---- paths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,want", [
    ("../../evil", "runs/evil"), ("..", "runs/run"), ("foo/..", "runs/run"), (".", "runs/run"),
    ("", "runs/run"), ("/data/cifar/", "runs/cifar"), ("my images!", "runs/my_images_"),
    (".hidden", "runs/hidden"), ("digits", "runs/digits"), ("a/b.npz", "runs/b.npz"),
])
def test_default_run_folder_stays_under_runs(name, want):
    assert default_run_dir(name) == Path(want)


def test_escaping_data_name_writes_nothing_outside(tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    rc, _, err = cli(capsys, "train", "--data", "../../evil", "--max-steps", "1", *STEP_FLAGS)
    assert_one_error_line(rc, err, "unknown data set '../../evil'")
    # Only the run folder (with its lock file) exists, under ./runs.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == \
        ["a", "a/b", "a/b/runs", "a/b/runs/evil", "a/b/runs/evil/.lock"]


def test_dot_dot_data_name_is_refused_as_it_holds_the_run(tmp_path, capsys, monkeypatch):
    """``--data ../imgs/..`` is a real folder (read recursively) that holds ./runs/run: the
    run's pictures would become its own training data, so the start is refused, and nothing
    is written anywhere."""
    _folder(tmp_path / "imgs", GOOD)
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, _, err = cli(capsys, "train", "--data", "../imgs/..", "--config", "digits",
                     "--max-steps", "1", *STEP_FLAGS)
    assert_one_error_line(rc, err, "--out runs/run lies in the data folder")
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "work"]


# ---- fuzzing the config and flag parsers ----------------------------------------------------

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                     st.integers(-2, 300), st.sampled_from(
                         ["linear", "cosine", "eps", "v", "unet", "mlp", "1,2", "trailing",
                          "10,5", "learned_range", "hybrid", "skip", "cpu", "auto", "1e-4"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=2), max_leaves=6)
_FIELDS = sorted({f.name for cls in C.SECTIONS.values() for f in fields(cls)})
_SECTION = st.dictionaries(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=8)), _VALUES,
                           max_size=4)
_CONFIG = st.dictionaries(st.one_of(st.sampled_from([*C.SECTIONS, "version"]),
                                    st.text(max_size=8)),
                          st.one_of(_SECTION, _VALUES), max_size=4)


@settings(max_examples=150, deadline=None)
@given(d=_CONFIG)
def test_fuzzed_config_dicts_load_or_fail_in_one_line(d):
    try:
        cfg = C.RunConfig.from_dict(d)
    except DdpmkitError as e:
        assert "\n" not in str(e) and len(str(e)) < 400
        return
    assert C.RunConfig.from_json(cfg.to_json()) == cfg


def _train_flags() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    train_parser = sub.choices["train"]
    return sorted(o for a in train_parser._actions for o in a.option_strings
                  if o.startswith("--") and a.nargs != 0 and o not in ("--help", "--out",
                                                                        "--resume"))


_FLAG_VALUES = st.one_of(st.text(max_size=8), st.integers(-3, 400).map(str),
                         st.sampled_from(["0", "1", "1,2", "true", "nan", "1e-3", "cosine",
                                          "digits", "moons", "toy2d", "-1", "", "1_0"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(st.sampled_from(_train_flags()), _FLAG_VALUES), max_size=5))
def test_fuzzed_argv_parses_or_fails_cleanly(pairs):
    argv = [x for pair in pairs for x in pair]
    parser = build_parser()
    try:
        args = parser.parse_args(["train", *argv])
    except SystemExit:  # malformed argv: argparse's usage error
        return
    try:
        cfg = config_from_args(args)
        C.section_from_dict(C.SampleConfig, C.flags_to_dict(args, C.SampleConfig, "sample_"),
                            base=C.SampleConfig())
    except DdpmkitError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(cfg, C.RunConfig)
