"""Data at scale: flat memory, the loader's order (resume, workers, ranks), labels, bad files.

The subprocess tests run ``ddpmkit train`` on the tiny U-Net of test_train, so what they
measure is the data path, not the network.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import TINY_FLAGS

from ddpmkit.config import DataConfig
from ddpmkit.data import Loader, load_data, rank_rows

MIB = 1 << 20


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                **extra)


# ---- memory flat in the data set's size --------------------------------------------------------

_PEAK_RSS = """
import resource, sys
from ddpmkit.cli import main
rc = main(sys.argv[1:])
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # DataLoader workers, reaped
print("PEAK_RSS_KB", own, kids)
sys.exit(rc)
"""


def _write_npy(path: Path, n: int) -> None:
    """``n`` 32x32 RGB uint8 images, written in blocks (the test itself stays small)."""
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    for lo in range(0, n, len(block)):
        arr[lo:lo + len(block)] = block[:n - lo]
    arr.flush()
    del arr


def _peak_rss_mib(tmp_path: Path, data: Path, workers: int) -> tuple[float, float]:
    cmd = [sys.executable, "-c", _PEAK_RSS, "train", "--config", "digits", "--data", str(data),
           "--out", str(tmp_path / f"run-{data.stem}"), "--max-steps", "3", "--max-minutes", "0",
           "--sample-every", "0", "--workers", str(workers), *TINY_FLAGS,
           "--checkpoint-every", "1000", "--attention-resolutions", "16"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_RSS_KB"))
    own, kids = (int(v) / 1024 for v in line.split()[1:])
    return own, kids


def test_peak_memory_is_flat_in_the_data_sets_size(tmp_path):
    """3 steps on 2,000 vs 100,000 32x32 RGB images (a 6 MB vs a 307 MB .npy), 1 worker.

    Loading the images would cost 1,200 MB more as float32 (300 MB as uint8), so a margin of
    48 MiB catches any whole-array copy, in the trainer or in its worker, while leaving room
    for the run-to-run noise of the allocator (a few MiB here).
    """
    small, large = tmp_path / "small.npy", tmp_path / "large.npy"
    _write_npy(small, 2_000)
    _write_npy(large, 100_000)
    own_s, kids_s = _peak_rss_mib(tmp_path, small, workers=1)
    own_l, kids_l = _peak_rss_mib(tmp_path, large, workers=1)
    print(f"peak RSS MiB, trainer / worker: 2k images {own_s:.0f} / {kids_s:.0f}, "
          f"100k images {own_l:.0f} / {kids_l:.0f}")
    assert own_l - own_s < 48, (own_s, own_l)
    assert kids_s > 0 and kids_l - kids_s < 48, (kids_s, kids_l)


# ---- the order: resume, worker count, rank count ----------------------------------------------

def _class_folder(root: Path, n: int = 45, size: int = 6) -> Path:
    """``n`` grey images in 3 class subfolders; image i has value i (its key tells it)."""
    for i in range(n):
        sub = root / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.new("L", (size, size), i).save(sub / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same 45 images as a class folder, a .npy + labels and a .npz (cached as uint8)."""
    root = tmp_path_factory.mktemp("sources")
    folder = _class_folder(root / "folder")
    images = np.stack([np.full((6, 6), i, np.uint8) for i in range(45)])
    labels = np.arange(45) % 3
    np.save(root / "images.npy", images)
    np.save(root / "images.labels.npy", labels)
    np.savez_compressed(root / "packed.npz", images=images.astype(np.float32) / 255.0,
                        labels=labels)
    return {"folder": folder, "npy": root / "images.npy", "npz": root / "packed.npz"}


def _stream(data, start: int, steps: int, world: int = 1, workers: int = 0,
            batch: int = 4, seed: int = 3) -> list[list[str]]:
    """Keys of ``steps`` global batches from stream position ``start`` (all ranks, in rank
    order within each batch)."""
    loaders = [Loader(data, seed, start, batch * world, rank_rows(r, world, batch, 1),
                      workers=workers, keys=True) for r in range(world)]
    out = [sum((ld.next().keys for ld in loaders), []) for _ in range(steps)]
    for ld in loaders:
        ld.close()
    return out


@pytest.mark.parametrize("kind", ["folder", "npy", "npz"])
def test_resumed_stream_equals_straight_stream_with_other_workers(sources, kind):
    data = load_data(DataConfig(name=str(sources[kind])))
    assert len(data) == 43  # 45 minus test examples 19 and 39
    straight = _stream(data, 0, 25, workers=0)  # > 2 epochs of 43 in batches of 4
    # resume after 9 batches (36 examples, mid-epoch) with 2 workers instead of none
    resumed = _stream(data, 36, 16, workers=2)
    assert resumed == straight[9:]
    flat = sum(straight, [])
    epoch = flat[:43]
    assert len(set(epoch)) == 43  # an epoch is a permutation: every example once
    assert flat[43:86] != epoch and sorted(flat[43:86]) == sorted(epoch)  # a fresh one


def test_workers_refill_shared_memory_slots_without_touching_batches_handed_out(
        tmp_path, monkeypatch):
    """Large images travel in shared-memory slots that each worker fills again and again
    (loader._SlotPool). Every batch handed out stays what was read, even when all are kept
    while the workers refill their slots; and the slots are reused, not one per batch."""
    from ddpmkit.data import loader as loader_module
    rng = np.random.default_rng(0)
    for i in range(24):  # 96x96 RGB: 27,648 values per image, over _STACK_IN_PLACE
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
            tmp_path / f"{i:02d}.png")
    data = load_data(DataConfig(name=str(tmp_path)))
    released: list[tuple[int, int]] = []
    release = loader_module._SlotPool.release
    monkeypatch.setattr(loader_module._SlotPool, "release",
                        lambda self, slot: (released.append(slot), release(self, slot))[1])

    def batches(workers: int) -> list[torch.Tensor]:
        ld = Loader(data, 5, 0, 4, rank_rows(0, 1, 4, 1), workers=workers)
        out = [ld.next().data for _ in range(30)]  # 5 epochs; all kept until the end
        ld.close()
        return out

    want = batches(0)
    assert not released  # no workers, no slots
    got = batches(2)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert len(released) == 30  # every batch came in a slot ...
    assert len(set(released)) <= 2 * 6 < 30  # ... of at most prefetch + 2 per worker


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no process priorities here")
def test_workers_run_at_a_lower_priority_than_the_trainer(sources):
    from ddpmkit.data.loader import WORKER_NICENESS
    data = load_data(DataConfig(name=str(sources["folder"])))
    ld = Loader(data, 0, 0, 4, rank_rows(0, 1, 4, 1), workers=2)
    ld.next()
    pids = [w.pid for w in ld._it._workers]
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert [os.getpriority(os.PRIO_PROCESS, p) for p in pids] == \
        [min(mine + WORKER_NICENESS, 19)] * 2
    ld.close()


def test_a_different_rank_count_continues_the_epochs_remaining_examples(sources):
    """2 ranks train 5 global batches of 8 (40 of the epoch's 43 examples), then the run
    resumes on 1 rank: its first batch holds the epoch's 3 remaining examples, then the next
    epoch begins; across the switch every example of the epoch is read exactly once."""
    data = load_data(DataConfig(name=str(sources["folder"])))
    two = _stream(data, 0, 5, world=2)                 # 5 x (2 ranks x 4)
    one = _stream(data, 40, 3, world=1, batch=8)      # resumed at images_seen = 40
    epoch = sum(two, []) + one[0][:3]
    assert sorted(epoch) == sorted(set(epoch)) and len(epoch) == 43
    # the same stream as a run on 1 rank all along, cut differently
    assert sum(two, []) + sum(one, []) == sum(_stream(data, 0, 8, world=1, batch=8), [])
    # and each rank of the 2-rank run read its own rows: no example read by both
    halves = [set(sum((b[r * 4:(r + 1) * 4] for b in two), [])) for r in range(2)]
    assert not halves[0] & halves[1]


def test_labels_travel_with_images_from_every_source(sources):
    """Class subfolders, NAME.labels.npy and a .npz 'labels' array give the same labels,
    batch by batch; image i (pixel value i) has class i % 3."""
    for kind in ("folder", "npy", "npz"):
        data = load_data(DataConfig(name=str(sources[kind])))
        loader = Loader(data, 0, 0, 8, rank_rows(0, 1, 8, 1), workers=0)
        for _ in range(6):
            b = loader.next()
            value = ((b.x[:, 0, 0, 0] + 1) * 127.5).round().long()
            assert torch.equal(b.y, value % 3), kind
        assert torch.equal(data.labels, (((data.x[:, 0, 0, 0] + 1) * 127.5).round().long() % 3))
    assert load_data(DataConfig(name=str(sources["folder"]))).class_names == (
        "class0", "class1", "class2")
    digits = load_data(DataConfig(name="digits"))
    from sklearn.datasets import load_digits
    assert torch.equal(digits.labels, torch.from_numpy(load_digits().target[:1500]))


# ---- SIGKILL and resume: the keys the model trains on --------------------------------------

def _train_cmd(run: Path, data: Path, workers: int, max_steps: int) -> list[str]:
    return [sys.executable, "-m", "ddpmkit", "train", "--config", "digits", "--data", str(data),
            "--out", str(run), "--max-steps", str(max_steps), "--max-minutes", "0",
            "--workers", str(workers), "--checkpoint-every", "1", "--keep-checkpoints", "2",
            *TINY_FLAGS, "--batch-size", "4", "--flip", "true"]


def _keys_by_step(log: Path) -> dict[int, str]:
    """The last line written for each step (a killed leg may have logged steps past its
    checkpoint, which the resumed leg trains again)."""
    out = {}
    for line in log.read_text().splitlines():
        step, _, keys = line.partition("\t")
        out[int(step)] = keys
    return out


def straight_and_killed_keys(tmp_path: Path, data: str, kill_after: int, again: int,
                             steps: int = 12) -> tuple[dict[int, str], dict[int, str]]:
    """Example keys per step of a run SIGKILLed once checkpoint ``kill_after`` exists and
    resumed with ``again`` workers, and of a straight run (2 workers each at first), started
    side by side: ``(resumed, straight)``."""
    ref = subprocess.Popen(_train_cmd(tmp_path / "ref", data, 2, steps), cwd=tmp_path,
                           env=_env(DDPMKIT_KEY_LOG=str(tmp_path / "ref.keys")),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run, log = tmp_path / "run", tmp_path / "run.keys"
    leg = subprocess.Popen(_train_cmd(run, data, 2, steps), cwd=tmp_path,
                           env=_env(DDPMKIT_KEY_LOG=str(log)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / f"step-{kill_after:07d}").is_dir():
        assert leg.poll() is None and time.monotonic() < deadline, "first leg did not get far"
        time.sleep(0.05)
    leg.send_signal(signal.SIGKILL)
    leg.wait(timeout=30)
    resumed = subprocess.run(_train_cmd(run, data, again, steps), cwd=tmp_path,
                             env=_env(DDPMKIT_KEY_LOG=str(log)), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    return _keys_by_step(log), _keys_by_step(tmp_path / "ref.keys")


@pytest.mark.slow  # ~15 s alone, ~60 s on a busy machine; the loader tests above are fast
def test_sigkill_and_resume_with_other_workers_trains_on_the_same_examples(tmp_path):
    """A straight run (2 workers) and one SIGKILLed after step 4 (mid-epoch: 16 of 29) and
    resumed with no workers log the same keys for every step."""
    data = _class_folder(tmp_path / "imgs", n=30, size=8)
    steps = 12  # 48 examples: more than the 29-example epoch
    got, want = straight_and_killed_keys(tmp_path, str(data), 4, 0, steps)
    assert sorted(want) == list(range(1, steps + 1))
    assert got == want
    first_epoch = "\t".join(want[s] for s in range(1, 9)).split("\t")[:29]
    assert len(set(first_epoch)) == 29  # one epoch: every training image once


# ---- unreadable images met while training ------------------------------------------------------

def _truncated_png(path: Path) -> None:
    """A PNG whose header reads (so the listing keeps it) but whose pixels are cut off."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), np.uint8))
    img.save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 40])


def test_unreadable_image_met_in_training_is_skipped_counted_and_named(tmp_path, capsys):
    from ddpmkit.cli import main
    data = _class_folder(tmp_path / "imgs", n=20, size=8)
    _truncated_png(data / "class1" / "bad.png")
    run = tmp_path / "run"
    flags = ["train", "--config", "digits", "--data", str(data), "--out", str(run),
             "--max-minutes", "0", "--workers", "0", *TINY_FLAGS, "--batch-size", "10"]
    assert main([*flags, "--max-steps", "4"]) == 0  # 40 examples: 2 epochs of 20
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "bad.png" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: skipping unreadable image")
    import csv
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["bad_files"]) for r in rows] == [1, 2]  # met once per epoch, counted each time
    rc = main([*flags, "--max-steps", "2", "--bad-files", "fail", "--out", str(tmp_path / "r2")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: cannot read image") and "bad.png" in lines[0]


# ---- ddpmkit prepare -> train ---------------------------------------------------------------

def test_prepare_then_train_round_trip(tmp_path, capsys):
    import hashlib
    import json

    from ddpmkit.cli import main
    src = _class_folder(tmp_path / "imgs", n=42, size=12)
    _truncated_png(src / "class2" / "zz_bad.png")
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out), "--image-size", "8", "--workers", "2",
                 "--no-progress"]) == 0
    assert "prepared 42 images of 1x8x8, 3 classes" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == 42 and m["shape"] == [1, 8, 8] and m["levels"] == 256
    assert m["class_names"] == ["class0", "class1", "class2"]
    assert [Path(p).name for p in m["skipped"]] == ["zz_bad.png"]
    for name, entry in m["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    # the prepared split is the source's split, pixel for pixel and label for label
    with pytest.warns(UserWarning, match="zz_bad.png"):
        direct = load_data(DataConfig(name=str(src), image_size=8))
        direct_x = direct.x
    prepared = load_data(DataConfig(name=str(out)))
    assert torch.equal(prepared.x, direct_x) and torch.equal(prepared.labels, direct.labels)
    run = tmp_path / "run"
    assert main(["train", "--config", "digits", "--data", str(out), "--out", str(run),
                 "--max-steps", "1", "--max-minutes", "0", *TINY_FLAGS]) == 0
    assert "3 classes" in capsys.readouterr().out
    # a damaged prepared folder: a one-line error naming the problem, before any network
    with open(out / "images.npy", "r+b") as f:
        f.truncate(200)
    rc = main(["train", "--config", "digits", "--data", str(out), "--out", str(tmp_path / "r2"),
               "--max-steps", "1", "--max-minutes", "0", *TINY_FLAGS])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "images.npy" in err[0] and "truncated" in err[0], err


def test_prepare_out_is_checked_and_never_written_through_links(tmp_path, capsys):
    from ddpmkit.cli import main
    src = _class_folder(tmp_path / "imgs", n=6, size=8)
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    # inside the source folder: its output would become part of the source
    rc = main(["prepare", str(src), "--out", str(src / "prepared"), "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "lies in the data folder" in err[0], err
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*")) == before
    # links already in --out are replaced, the files they point to are left alone
    out = tmp_path / "prepared"
    out.mkdir()
    victims = {}
    for name in ("images.npy", "labels.npy", "manifest.json"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("keep me")
        (out / name).symlink_to(victims[name])
    assert main(["prepare", str(src), "--out", str(out), "--workers", "0",
                 "--no-progress"]) == 0
    for name, victim in victims.items():
        assert victim.read_text() == "keep me"
        assert not (out / name).is_symlink()
    assert load_data(DataConfig(name=str(out))).x.shape[1:] == (1, 8, 8)
    # --out itself a link: refused
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere")
    rc = main(["prepare", str(src), "--out", str(tmp_path / "linked"), "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "symbolic link" in err[0], err
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_resume_rewrites_an_older_metrics_header_with_the_bad_files_column(tmp_path):
    import csv

    from ddpmkit.train import run_dir
    from ddpmkit.train.trainer import METRIC_FIELDS
    old_fields = [f for f in METRIC_FIELDS if f != "bad_files"]
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerows({k: str(s) if k == "step" else "0.5" for k in old_fields} for s in (1, 2))
    assert run_dir.trim_metrics(path, 2, METRIC_FIELDS, tmp_path / "cut.csv") == 0
    run_dir.append_row(path, {**{k: "0.25" for k in METRIC_FIELDS}, "step": 3,
                              "bad_files": 7}, METRIC_FIELDS)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and not (tmp_path / "cut.csv").exists()
    assert [r["bad_files"] for r in rows] == ["", "", "7"] and rows[0]["loss"] == "0.5"
    assert all(None not in r and None not in r.values() for r in rows)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_failing_in_a_worker_is_a_one_line_data_error(tmp_path, workers):
    """A .npy that shrinks after it was opened fails inside the DataLoader worker: the
    trainer sees one DataError line naming the file, not the worker's traceback."""
    from ddpmkit.errors import DataError
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((40, 4, 4, 1), np.uint8))
    data = load_data(DataConfig(name=str(path)))
    with open(path, "r+b") as f:
        f.truncate(200)
    loader = Loader(data, 0, 0, 8, torch.arange(8), workers)
    try:
        with pytest.raises(DataError) as e:
            loader.next()
    finally:
        loader.close()
    msg = str(e.value)
    assert "\n" not in msg and "x.npy" in msg and "truncated" in msg, msg
