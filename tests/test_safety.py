"""Reliability II (issue 10): never lose a user's images, checkpoints or files.

Each test reproduces a case of the issue's probe (it failed before the fix): image formats
dropped on first use, fresh starts and branches that deleted checkpoints, writes through
symbolic links, outputs written over checkpoints or into the data, silent setting switches on
resume, and sizes refused only after allocating them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_reliability import STEP_FLAGS, assert_one_error_line, cli
from test_train import tiny_config

from ddpmkit import config as C
from ddpmkit import outputs
from ddpmkit.data import fingerprint
from ddpmkit.errors import ConfigError
from ddpmkit.train.checkpoint import list_checkpoints, load_checkpoint
from ddpmkit.train.trainer import train

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """{relative path: sha256 or '-> link target'} of everything under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _steps(run: Path) -> list[int]:
    return [int(p.name[5:]) for p in list_checkpoints(run)]


def _cfg(**train):
    return tiny_config(**{"checkpoint_every": 2, "keep_checkpoints": 3, **train})


def _rows(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


# ---- 1. image folders: no valid image dropped -----------------------------------------------

def test_first_image_of_each_format_is_read_in_a_fresh_process(tmp_path):
    """Pillow registers its decoders lazily: the first open of each format used to get
    ``formats=[]`` and report the file unreadable (4 of 24 in the probe)."""
    rng = np.random.default_rng(0)
    for i, ext in enumerate(["png", "jpg", "webp", "bmp"] * 6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            tmp_path / f"img{i:03d}.{ext}")
    code = textwrap.dedent(f"""
        from ddpmkit.config import DataConfig
        from ddpmkit.data import load_data
        cfg = DataConfig(name={str(tmp_path)!r}, bad_files="fail")
        print(len(load_data(cfg, "train")), len(load_data(cfg, "test")))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=SRC), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["23", "1"]  # every 20th image is a test image
    assert "warning" not in done.stderr.lower() and "skipping" not in done.stderr


# ---- 2. fresh start in a folder holding checkpoints -----------------------------------------

def test_fresh_start_over_a_run_is_refused_and_changes_nothing(tmp_path, capsys, trained):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _tree(run)
    rc, _, err = cli(capsys, "train", "--out", str(run), "--resume", "none", "--max-steps", "1",
                     *STEP_FLAGS)
    assert_one_error_line(rc, err, "already holds a run", "step-0000002", "--out NEW",
                          "--resume none --overwrite", "--resume auto")
    assert _tree(run) == before


def test_overwrite_moves_the_old_run_aside_and_keeps_the_new_checkpoint(tmp_path, capsys,
                                                                       trained):
    """The probe: RUN holds step 2 (keep 1); a fresh run writing step 1 deleted it at once
    (pruning keeps the highest steps), overwrote config.json and samples.png, and
    `sample --checkpoint RUN` used the old model. Now the old run moves whole into
    RUN/replaced-<time>/."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _tree(run, skip=run / ".lock")
    rc, out, err = cli(capsys, "train", "--out", str(run), "--resume", "none", "--overwrite",
                       "--max-steps", "1", "--keep-checkpoints", "1", *STEP_FLAGS)
    assert rc == 0, err
    aside = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and f"to {aside[0]}" in out
    assert _tree(aside[0]) == before  # every file of the old run, byte for byte
    assert _steps(run) == [1] and _steps(aside[0]) == [2]
    assert f"checkpoint: {run / 'checkpoints' / 'step-0000001'}" in out
    assert load_checkpoint(run).step == 1
    assert not (run / "metrics.csv").exists()  # the old rows went with the old run


def test_leftovers_without_a_checkpoint_move_aside_on_a_fresh_start(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{\"from\": \"an earlier run\"}")
    (run / "metrics.csv").write_text("step,loss\n7,0.5\n")
    (run / "notes.txt").write_text("mine")
    rc, out, err = cli(capsys, "train", "--out", str(run), "--max-steps", "1", *STEP_FLAGS)
    assert rc == 0, err
    aside = next(p for p in run.iterdir() if p.name.startswith("replaced-"))
    assert (aside / "config.json").read_text() == "{\"from\": \"an earlier run\"}"
    assert (aside / "metrics.csv").read_text() == "step,loss\n7,0.5\n"
    assert (run / "notes.txt").read_text() == "mine"  # not a run file: left where it was
    assert not (run / "metrics.csv").exists()  # one step, no log row: no row of the old run


# ---- 3. resuming an older checkpoint starts a branch -----------------------------------------

def test_resuming_an_older_checkpoint_branches_and_prunes_only_the_branch(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(max_steps=4), run, resume=None, progress=False)
    assert _steps(run) == [2, 4]
    old = _tree(run / "checkpoints")
    # A real branch: another learning rate from step 2 on; keep 2 within it.
    rc, out, err = cli(capsys, "train", "--out", str(run), "--resume",
                       str(run / "checkpoints" / "step-0000002"), "--max-steps", "4",
                       "--checkpoint-every", "1", "--keep-checkpoints", "2", "--lr", "5e-4",
                       *STEP_FLAGS)
    assert rc == 0, err
    branch = next(p for p in run.iterdir() if p.name.startswith("branch-"))
    assert branch.name.endswith("-after-step-2") and f"moved to {branch}" in out
    # The abandoned branch, whole: its checkpoint byte for byte, its metric rows, its config.
    assert _steps(branch) == [4]
    assert {k: v for k, v in old.items() if k.startswith("step-0000004")} == \
        _tree(branch / "checkpoints")
    assert _rows(branch / "metrics.csv") == [4]
    assert json.loads((branch / "config.json").read_text())["train"]["lr"] == 1e-3
    # keep=2 counted within the new branch (steps 3 and 4), not against the abandoned one.
    assert _steps(run) == [3, 4]
    assert _rows(run / "metrics.csv") == [2, 4]
    assert not torch.equal(load_checkpoint(run).model["conv_in.weight"],
                           load_checkpoint(branch).model["conv_in.weight"])
    # The next --resume auto continues the branch just trained.
    new4 = _tree(run / "checkpoints" / "step-0000004")
    rc, out, err = cli(capsys, "train", "--out", str(run), "--max-steps", "5", *STEP_FLAGS)
    assert rc == 0, err
    assert "step-0000004 at step 4" in out and _steps(run) == [4, 5]
    assert _tree(run / "checkpoints" / "step-0000004") == new4
    assert _steps(branch) == [4]


def test_metric_rows_past_the_checkpoint_move_to_a_side_file(tmp_path, capsys, trained):
    """A run killed between a log row and its checkpoint: the rows are not silently cut."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert _rows(run / "metrics.csv") == [2]
    with open(run / "metrics.csv", "a") as f:  # as if steps 3, 4 were logged, then a kill
        f.write("3,48,0.5\n4,64,0.4\n")
    rc, out, err = cli(capsys, "train", "--out", str(run), "--max-steps", "3", "--no-progress")
    assert rc == 0, err
    assert "moved 2 metric row(s) after step 2" in out
    assert _rows(run / "metrics.csv") == [2]
    assert _rows(run / "metrics.cut.csv") == [3, 4]


# ---- 4. writes never follow a symbolic link -------------------------------------------------

@pytest.fixture
def victim(tmp_path) -> Path:
    p = tmp_path / "victim.txt"
    p.write_text("precious")
    return p


def test_a_linked_lock_or_metrics_file_is_refused_and_its_target_kept(tmp_path, capsys, victim,
                                                                      trained):
    import shutil
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "2", *STEP_FLAGS)
    assert_one_error_line(rc, err, str(run / ".lock"), "symbolic link")
    # A run to resume whose metrics.csv links elsewhere: refused, not appended to.
    run = tmp_path / "resumed"
    shutil.copytree(trained, run)
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").symlink_to(victim)
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "4", "--no-progress")
    assert_one_error_line(rc, err, str(run / "metrics.csv"), "symbolic link")
    assert victim.read_text() == "precious"
    # A fresh start moves a linked metrics.csv aside with the rest: its target is untouched.
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "metrics.csv").symlink_to(victim)
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "2", *STEP_FLAGS)
    assert rc == 0, err
    assert victim.read_text() == "precious" and not (run / "metrics.csv").is_symlink()


def test_linked_config_and_pictures_are_replaced_not_followed(tmp_path, capsys, victim):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "samples.png", "loss.png"):
        (run / name).symlink_to(victim)
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "2", *STEP_FLAGS)
    assert rc == 0, err
    assert victim.read_text() == "precious"
    for name in ("config.json", "samples.png", "loss.png"):
        assert not (run / name).is_symlink() and (run / name).stat().st_size > 0


def test_a_linked_checkpoints_folder_is_refused(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "1", *STEP_FLAGS)
    assert_one_error_line(rc, err, "checkpoints is a symbolic link")
    assert list(elsewhere.iterdir()) == []


def test_sample_npz_never_writes_through_planted_links(tmp_path, capsys, victim, trained):
    out = tmp_path / "s.npz"
    (tmp_path / ".s.npz.tmp.npz").symlink_to(victim)  # the old fixed temporary name
    rc, _, err = cli(capsys, "sample", "--checkpoint", str(trained), "--num", "2", "--steps",
                     "2", "--out", str(out), "--no-progress")
    assert rc == 0, err
    assert victim.read_text() == "precious" and np.load(out)["arr_0"].shape == (2, 8, 8, 1)
    out.unlink()
    out.symlink_to(victim)  # --out itself a link: the link is replaced, its target kept
    rc, _, err = cli(capsys, "sample", "--checkpoint", str(trained), "--num", "2", "--steps",
                     "2", "--out", str(out), "--no-progress")
    assert rc == 0, err
    assert victim.read_text() == "precious" and not out.is_symlink()


def test_temporary_names_are_unique_per_process_and_call(tmp_path):
    names = {outputs.temp_path(tmp_path / "x.png").name for _ in range(50)}
    assert len(names) == 50 and all(f".x.png.{os.getpid()}-" in n for n in names)
    (tmp_path / "x.png").write_text("old")
    with pytest.raises(ZeroDivisionError):  # a failed write leaves the file and no temporary
        outputs.atomic_write(tmp_path / "x.png", lambda f: (f.write(b"new"), 1 / 0))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    assert (tmp_path / "x.png").read_text() == "old"


def test_a_full_disk_while_writing_samples_is_one_line_and_leaves_nothing(tmp_path, capsys,
                                                                          monkeypatch, trained):
    import errno

    def full(f, **arrays):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", full)
    (tmp_path / "s.npz").write_bytes(b"an older file")
    rc, _, err = cli(capsys, "sample", "--checkpoint", str(trained), "--num", "2", "--steps",
                     "2", "--out", str(tmp_path / "s.npz"), "--no-progress")
    assert_one_error_line(rc, err, "cannot write", "s.npz", "No space left", "free some disk")
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary left behind
    assert (tmp_path / "s.npz").read_bytes() == b"an older file"


# ---- 5. every --out checked before any work -------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step tiny digits run."""
    from ddpmkit.cli import main
    run = tmp_path_factory.mktemp("safety") / "run"
    assert main(["train", "--out", str(run), "--max-steps", "2", *STEP_FLAGS]) == 0
    return run


def _no_sampling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("sampling ran before --out was checked")
    import ddpmkit.sampling
    monkeypatch.setattr(ddpmkit.sampling, "sample", refuse)
    monkeypatch.setattr(ddpmkit.sampling, "ddim_reconstruct", refuse)


@pytest.mark.parametrize("argv,name,needles", [
    (["encode"], "checkpoints/step-0000002/ema.safetensors", ["use a .png or .npz"]),
    (["encode"], "checkpoints/step-0000002/x.png", ["inside the checkpoint folder"]),
    (["sample"], "checkpoints/step-0000002/s.npz", ["inside the checkpoint folder"]),
    (["sample"], "checkpoints/s.png", ["inside the checkpoint folder"]),
    (["show"], "checkpoints/step-0000002/show", ["inside the checkpoint folder"]),
    (["sample"], "s.jpg", ["use a .png or .npz"]),
    (["encode"], "e.jpg", ["use a .png or .npz"]),
], ids=["encode-over-weights", "encode-in-ckpt", "sample-in-ckpt", "sample-in-ckpts",
        "show-in-ckpt", "sample-suffix", "encode-suffix"])
def test_outputs_are_checked_before_any_work(tmp_path, capsys, monkeypatch, trained, argv,
                                             name, needles):
    _no_sampling(monkeypatch)
    before = _tree(trained, skip=trained / ".lock")
    rc, _, err = cli(capsys, *argv, "--checkpoint", str(trained), "--out", str(trained / name))
    assert_one_error_line(rc, err, *needles)
    assert _tree(trained, skip=trained / ".lock") == before


def test_unwritable_output_folder_is_reported_before_sampling(tmp_path, capsys, monkeypatch,
                                                              trained):
    _no_sampling(monkeypatch)

    def denied(path):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(outputs, "open_new", denied)
    for argv in (["sample", "--out", str(tmp_path / "s.png")],
                 ["encode", "--out", str(tmp_path / "e.npz")],
                 ["show", "--out", str(tmp_path / "show")]):
        rc, _, err = cli(capsys, argv[0], "--checkpoint", str(trained), *argv[1:])
        assert_one_error_line(rc, err, "cannot write in", "Permission denied")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 1-step run on a folder of 20 grey PNGs: (data folder, run folder)."""
    from ddpmkit.cli import main
    root = tmp_path_factory.mktemp("imgrun")
    data = root / "imgs"
    data.mkdir()
    for i in range(20):
        Image.new("L", (8, 8), i * 10).save(data / f"{i:02d}.png")
    run = root / "run"
    assert main(["train", "--data", str(data), "--config", "digits", "--out", str(run),
                 "--max-steps", "1", *STEP_FLAGS]) == 0
    return data, run


def test_outputs_into_the_data_folder_are_refused(tmp_path, capsys, monkeypatch, image_run):
    data, run = image_run
    _no_sampling(monkeypatch)
    before = _tree(data)
    for argv in (["train", "--data", str(data), "--config", "digits", "--out", str(data),
                  "--max-steps", "1", *STEP_FLAGS],
                 ["train", "--data", str(data), "--config", "digits", "--out",
                  str(data / "run"), "--max-steps", "1", *STEP_FLAGS],
                 ["sample", "--checkpoint", str(run), "--out", str(data / "s.png")],
                 ["encode", "--checkpoint", str(run), "--out", str(data / "e.png")],
                 ["show", "--checkpoint", str(run), "--out", str(data / "show")]):
        rc, _, err = cli(capsys, *argv)
        assert_one_error_line(rc, err, "lies in the data folder")
    assert _tree(data) == before


# ---- 6. resuming with other settings ------------------------------------------------------

def test_resume_with_another_diffusion_is_one_line_naming_the_fields(tmp_path, capsys, trained):
    run = tmp_path / "run"
    import shutil
    shutil.copytree(trained, run)
    before = _tree(run, skip=run / ".lock")
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "3",
                     "--prediction", "eps", "--schedule", "linear", "--allow-changes",
                     "--no-progress")
    assert_one_error_line(rc, err, "diffusion.schedule 'sigmoid' -> 'linear'",
                          "diffusion.prediction 'v' -> 'eps'", "new --out")
    assert _tree(run, skip=run / ".lock") == before


def test_resume_takes_the_runs_own_settings_and_prints_free_changes(tmp_path, capsys, trained):
    """No flags repeated: the checkpoint's config is the base; lr and budgets may change."""
    run = tmp_path / "run"
    import shutil
    shutil.copytree(trained, run)
    rc, out, err = cli(capsys, "train", "--out", str(run), "--max-steps", "3", "--lr", "5e-4",
                       "--no-progress")
    assert rc == 0, err
    assert "resuming with changed settings: train.lr 0.001 -> 0.0005, train.max_steps 2 -> 3" \
        in out
    assert load_checkpoint(run).step == 3


def test_resume_on_other_data_needs_allow_changes(tmp_path, capsys, image_run):
    data, trained_run = image_run
    run = tmp_path / "run"
    import shutil
    shutil.copytree(trained_run, run)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    Image.new("L", (8, 8), 255).save(other / "00.png")
    rc, _, err = cli(capsys, "train", "--out", str(run), "--data", str(other), "--max-steps",
                     "2", "--no-progress")
    assert_one_error_line(rc, err, "data.name", "data.fingerprint", "--allow-changes")
    rc, out, err = cli(capsys, "train", "--out", str(run), "--data", str(other), "--max-steps",
                       "2", "--allow-changes", "--no-progress")
    assert rc == 0, err
    assert "resuming with changed settings: data.name" in out


def test_config_json_holds_the_absolute_data_path_and_a_fingerprint(tmp_path, capsys,
                                                                    monkeypatch, image_run):
    data, run = image_run
    saved = json.loads((run / "config.json").read_text())["data"]
    assert saved["name"] == str(data) and Path(saved["name"]).is_absolute()
    assert saved["fingerprint"] == fingerprint(str(data))
    assert saved["fingerprint"].startswith("files=20 sha256=")
    # eval from another folder reads the same data, silently.
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "eval", "--checkpoint", str(run), "--max-examples", "1",
                     "--no-progress", "--json")
    assert rc == 0 and "warning" not in err, err


def test_eval_warns_when_the_data_changed(tmp_path, capsys, image_run):
    data, trained_run = image_run
    import shutil
    moved = tmp_path / "imgs"
    shutil.copytree(data, moved)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for cfg_path in [run / "config.json", *run.glob("checkpoints/*/config.json")]:
        d = json.loads(cfg_path.read_text())
        d["data"]["name"] = str(moved)
        cfg_path.write_text(json.dumps(d))
    Image.new("L", (8, 8), 255).save(moved / "05.png")  # one image replaced
    rc, _, err = cli(capsys, "eval", "--checkpoint", str(run), "--max-examples", "1",
                     "--no-progress", "--json")
    assert rc == 0, err
    assert f"warning: the data at {moved} has changed since this model was trained" in err


def test_fingerprint_sees_count_and_content(tmp_path):
    arr = np.zeros((40, 8, 8), np.uint8)
    np.save(tmp_path / "a.npy", arr)
    first = fingerprint(str(tmp_path / "a.npy"))
    arr[39, 7, 7] = 1
    np.save(tmp_path / "a.npy", arr)
    assert fingerprint(str(tmp_path / "a.npy")) != first
    assert fingerprint("digits") == "" and fingerprint("moons") == ""


# ---- 7. sizes bounded before allocation; hostile input; no raw tracebacks ----------------------

@pytest.mark.parametrize("section,key,value,needle", [
    ("diffusion", "timesteps", 10**8, "timesteps=100000000 is above ddpmkit's limit"),
    ("model", "channels", 100_000, "channels=100000 is above"),
    ("model", "num_res_blocks", 10**6, "num_res_blocks=1000000 is above"),
    ("model", "channel_mult", [1] * 50, "number of levels in channel_mult=50 is above"),
    ("data", "image_size", 10**5, "image_size=100000 is above"),
    ("data", "num_points", 10**10, "num_points=10000000000 is above"),
    ("data", "workers", 10**5, "workers=100000 is above ddpmkit's limit of 256"),
    ("sample", "num", 10**9, "num=1000000000 is above"),
    ("train", "seed", -1, "seed=-1 must be in [0, 4294967295]"),
    ("train", "seed", 2**70, "seed=1180591620717411303424 must be in"),
])
def test_config_sizes_are_bounded(section, key, value, needle):
    with pytest.raises(ConfigError, match=None) as e:
        C.RunConfig.from_dict({section: {key: value}})
    assert needle in str(e.value)


def test_a_hostile_config_json_is_refused_before_allocating(tmp_path, capsys, trained):
    """A checkpoint whose config.json asks for a ~27B-parameter network (>100 GB of float32):
    refused from the config alone, in well under a second, before any weight exists."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = run / "checkpoints" / "step-0000002"
    d = json.loads((ckpt / "config.json").read_text())
    d["model"].update(channels=2048, num_res_blocks=8, attention_resolutions=[])
    (ckpt / "config.json").write_text(json.dumps(d))
    t0 = time.perf_counter()
    rc, _, err = cli(capsys, "sample", "--checkpoint", str(ckpt), "--out",
                     str(tmp_path / "s.png"), "--no-progress")
    assert time.perf_counter() - t0 < 5
    assert_one_error_line(rc, err, "config.json", "B parameters, above ddpmkit's limit of 2B")


@pytest.mark.parametrize("text,suffix", [
    ("[" * 100_000, ".json"), ("{\"a\":" * 100_000, ".json"), ("a = " + "[" * 100_000, ".toml"),
    ("x = {" * 5000, ".toml"), ("\x00\x01", ".toml"), ("[data]\nname = 1e999", ".toml"),
])
def test_deeply_nested_or_garbled_config_files_are_one_line(tmp_path, capsys, text, suffix):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    rc, _, err = cli(capsys, "train", "--config", str(path), "--out", str(tmp_path / "run"),
                     "--no-progress")
    assert_one_error_line(rc, err, str(path))


@pytest.mark.parametrize("argv,needle", [
    (["sample", "--seed", "-1"], "must be in [0, 4294967295]"),
    (["sample", "--seed", "99999999999999999999"], "must be in [0, 4294967295]"),
    (["sample", "--device", "meta"], "device='meta' cannot run"),
    (["sample", "--device", "cuda:0"], "CUDA is not available"),
    (["sample", "--device", "mps"], "device='mps'"),
    (["sample", "--device", "xla"], "device='xla' cannot run ddpmkit"),
    (["sample", "--num", "1000000000"], "num=1000000000 is above"),
])
def test_hostile_sample_flags_are_one_line(tmp_path, capsys, trained, argv, needle):
    rc, _, err = cli(capsys, *argv, "--checkpoint", str(trained), "--out",
                     str(tmp_path / "s.png"), "--no-progress")
    assert_one_error_line(rc, err, needle)
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("argv", [["eval", "--seed", "-5"], ["show", "--seed", "2" * 30]])
def test_out_of_range_seeds_are_usage_errors(capsys, trained, argv):
    with pytest.raises(SystemExit) as e:
        cli(capsys, *argv, "--checkpoint", str(trained))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "must be in [0, 4294967295]" in err and "Traceback" not in err


def test_one_step_diffusion_trains_and_samples_with_the_default_sampler(tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "1", *STEP_FLAGS,
                     "--timesteps", "1")
    assert rc == 0, err
    rc, _, err = cli(capsys, "sample", "--checkpoint", str(run), "--num", "2", "--out",
                     str(tmp_path / "s.npz"), "--no-progress")
    assert rc == 0, err
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 8, 8, 1)


def _tamper(run: Path, edit) -> None:
    path = run / "checkpoints" / "step-0000002" / "trainer.safetensors"
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    state = json.loads(meta["trainer_state"])
    edit(state, tensors)
    save_file(tensors, path, metadata={"trainer_state": json.dumps(state)})


@pytest.mark.parametrize("edit,needle", [
    (lambda s, t: s.update(images_seen="lots"), "images_seen=lots is not a count"),
    (lambda s, t: s.update(step=-4), "step=-4 is not a count"),
    (lambda s, t: s.update(world_size=[1]), "world_size=[1] is not a count"),
    (lambda s, t: s.update(optimizer=7), "cannot be restored"),
    (lambda s, t: t.update({"rng.torch.rank0": torch.zeros(3, dtype=torch.uint8)}),
     "cannot be restored"),
    (lambda s, t: s.update(overflow=2.5), "overflow=2.5 is not a count"),
], ids=["images-seen", "negative-step", "world-size", "optimizer", "rng-rank", "overflow"])
def test_tampered_trainer_state_is_one_line(tmp_path, capsys, trained, edit, needle):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _tamper(run, edit)
    rc, _, err = cli(capsys, "train", "--out", str(run), "--max-steps", "3", "--no-progress")
    assert_one_error_line(rc, err, "trainer state", needle)


def test_the_command_entry_point_loads_without_torch():
    """The console script's module and ``import ddpmkit`` stay light, so the entry point is
    running (and catching Ctrl-C) within milliseconds, before torch loads."""
    code = "import sys, ddpmkit.console; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=SRC), check=True).stdout
    assert out.strip() == "False"


def test_every_public_name_loads_and_load_stays_the_function():
    """The lazily loaded package gives every name of ``__all__``, and importing a submodule
    never rebinds a public name (``ddpmkit.load`` is the function, whatever ran before)."""
    code = ("import ddpmkit, ddpmkit.loading, ddpmkit.cli, ddpmkit.sampling\n"
            "missing = [n for n in ddpmkit.__all__ if getattr(ddpmkit, n, None) is None]\n"
            "print(missing, callable(ddpmkit.load), ddpmkit.load is ddpmkit.loading.load)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=SRC), check=True).stdout
    assert out.split() == ["[]", "True", "True"]


def test_ctrl_c_in_the_first_second_exits_130_without_a_traceback(tmp_path):
    """SIGINT while the command imports torch and its parts, builds its parser, loads data,
    builds the network or starts the loop: "interrupted" (130) or a saved checkpoint (0),
    never a traceback. Signalled from the moment the entry point's module is imported (what
    the ``ddpmkit`` console script does first)."""
    argv = ["train", "--out", str(tmp_path / "run"), "--max-steps", "1", *STEP_FLAGS]
    code = ("import sys; from ddpmkit.console import main; print('up', flush=True); "
            f"sys.exit(main({argv!r}))")
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=tmp_path,
                                env=dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1"))
        assert proc.stdout.readline() == b"up\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        text = err.decode()
        assert "Traceback" not in text, (delay, text[-2000:])
        assert proc.returncode in (0, 130), (delay, proc.returncode, text)
