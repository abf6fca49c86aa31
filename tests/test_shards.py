"""Tar shards (issue 11, item 2): names, labels, splitting across ranks x workers, exact resume,
bad shard data, prepare --format shards -> train. Local shards are read map-style through an
index; ``pipe:`` shards are streams (``data/stream.py``), tested with ``pipe:cat``."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import TINY_FLAGS

from ddpmkit.cli import main
from ddpmkit.config import DataConfig
from ddpmkit.data import Loader, load_data, rank_rows
from ddpmkit.data.shards import expand_braces, looks_like_shards, shard_urls
from ddpmkit.data.stream import StreamState, slot_shards
from ddpmkit.errors import DataError


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_shards(root: Path, n_shards: int, per: int, size: int = 8) -> list[Path]:
    """Example v (pixel value v, key ``vNNN``) in shard v // per, class v % 3 in ``.cls``,
    plus a ``.json`` member that is ignored."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(n_shards):
        members = []
        for v in range(s * per, (s + 1) * per):
            members += [(f"v{v:03d}.png", _png(v, size)), (f"v{v:03d}.cls", f"{v % 3}\n".encode()),
                        (f"v{v:03d}.json", b'{"label": 99}')]
        out.append(write_shard(root / f"train-{s:03d}.tar", members))
    return out


def _values(batch) -> list[int]:
    return ((batch.x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


# ---- names ------------------------------------------------------------------------------------

def test_shard_names_braces_globs_lists_and_pipes(tmp_path):
    assert expand_braces("t-{000008..000011}.tar") == [f"t-{i:06d}.tar" for i in range(8, 12)]
    assert expand_braces("t-{8..11}.tar") == ["t-8.tar", "t-9.tar", "t-10.tar", "t-11.tar"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    paths = make_shards(tmp_path / "s", 3, 2)
    assert shard_urls(str(tmp_path / "s" / "train-{000..002}.tar")) == [str(p) for p in paths]
    assert shard_urls(str(tmp_path / "s" / "*.tar")) == [str(p) for p in paths]
    lst = tmp_path / "s" / "list.txt"
    lst.write_text("# shards\ntrain-001.tar\n\npipe:cat train-{000..001}.tar\n")
    assert shard_urls(str(lst)) == [str(paths[1]), "pipe:cat train-000.tar",
                                    "pipe:cat train-001.tar"]
    for name in ("x.tar", "d/t-{0..9}.tar", "pipe:curl -s http://h/x", "list.txt"):
        assert looks_like_shards(name)
    for name in ("digits", "imgs", "a.npy"):
        assert not looks_like_shards(name)
    with pytest.raises(DataError, match="no shard matches"):
        shard_urls(str(tmp_path / "none-*.tar"))
    # the fingerprint a run saves (and checks at resume): same shards, same print
    from ddpmkit.data import fingerprint
    fp = fingerprint(str(tmp_path / "s" / "train-{000..002}.tar"))
    assert fp.startswith("shards=3 ") and fp == fingerprint(str(tmp_path / "s" / "*.tar"))
    write_shard(paths[2], [("v999.png", _png(1))])
    assert fingerprint(str(tmp_path / "s" / "*.tar")) != fp


# ---- local shards: labels, split, order ---------------------------------------------------------

def test_local_shards_carry_labels_and_the_per_shard_split(tmp_path):
    make_shards(tmp_path / "s", 2, 25)
    spec = str(tmp_path / "s" / "train-{000..001}.tar")
    train, test = load_data(DataConfig(name=spec)), load_data(DataConfig(name=spec), "test")
    assert train.shape == (1, 8, 8) and len(train) == 48 and len(test) == 2
    assert sorted(_values_of(test)) == [19, 44]  # example 19 of each 25-example shard
    assert torch.equal(train.labels, torch.tensor([v % 3 for v in range(50) if v not in (19, 44)]))
    assert train._x is None  # the labels came from the index: no image was decoded for them
    loader = Loader(train, 0, 0, 8, rank_rows(0, 1, 8, 1), workers=1, keys=True)
    for _ in range(3):
        b = loader.next()
        assert b.y.tolist() == [v % 3 for v in _values(b)]  # .cls, not the .json
        assert all(k == f"train-{v // 25:03d}.tar:v{v:03d}" for k, v in zip(b.keys, _values(b), strict=True))
    loader.close()


def _values_of(data) -> list[int]:
    return ((data.x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


def test_local_shards_two_ranks_two_workers_and_exact_resume(tmp_path):
    """Every training example once per epoch across 2 ranks x 2 workers; a resumed stream
    (other workers, then another rank count) continues the straight one."""
    make_shards(tmp_path / "s", 3, 10)
    data = load_data(DataConfig(name=str(tmp_path / "s" / "*.tar")))
    n = len(data)
    assert n == 30

    def run(start, steps, world, workers, batch=3):
        lds = [Loader(data, 5, start, batch * world, rank_rows(r, world, batch, 1),
                      workers=workers, keys=True) for r in range(world)]
        out = [[ld.next().keys for ld in lds] for _ in range(steps)]
        for ld in lds:
            ld.close()
        return out

    two = run(0, 5, world=2, workers=2)  # 5 steps x 2 ranks x 3 = one epoch
    epoch = [k for step in two for keys in step for k in keys]
    assert len(epoch) == n and len(set(epoch)) == n
    straight = [k for step in run(0, 8, 1, 0, batch=6) for keys in step for k in keys]
    assert epoch == straight[:30]
    resumed = [k for step in run(12, 6, 1, 2, batch=6) for keys in step for k in keys]
    assert resumed == straight[12:]


# ---- pipe: streams --------------------------------------------------------------------------

def _stream(tmp_path, n_shards, per):
    make_shards(tmp_path / "s", n_shards, per)
    spec = f"pipe:cat {tmp_path}/s/train-{{000..{n_shards - 1:03d}}}.tar"
    return load_data(DataConfig(name=spec))


def _take(data, steps, world, workers, batch, state=None):
    """Keys per rank per step, and the ranks' final positions."""
    lds = [Loader(data, 1, 0, batch * world, rank_rows(r, world, batch, 1), workers=workers,
                  keys=True, rank=r, world=world, stream_state=state) for r in range(world)]
    keys = [[ld.next().keys for _ in range(steps)] for ld in lds]
    pos = [ld.stream.to_dict() for ld in lds]
    for ld in lds:
        ld.close()
    return keys, pos


def test_stream_two_ranks_two_workers_read_each_example_once_per_epoch(tmp_path):
    data = _stream(tmp_path, 8, 10)  # 8 shards over 4 slots: 2 shards (4 batches) per slot
    keys, _ = _take(data, 8, world=2, workers=2, batch=5)
    flat = [k for rank in keys for step in rank for k in step]
    assert len(flat) == 80 and len(set(flat)) == 80
    # the ranks read disjoint shards
    shards = [{k.split(":")[0] for step in rank for k in step} for rank in keys]
    assert not shards[0] & shards[1]


def test_stream_rule_when_shards_do_not_divide_the_slots():
    """Shard g of the endless sequence goes to slot g mod S: each epoch's shards are dealt
    out once, for 6 shards over 4 slots and for 3 shards over 4 slots."""
    for n, slots in ((6, 4), (3, 4)):
        got = Counter()
        for slot in range(slots):
            for g, shard in slot_shards(1, n, slots, slot):
                if g >= 3 * n:
                    break
                got[(g // n, shard)] += 1
        assert got == Counter({(e, i): 1 for e in range(3) for i in range(n)})


def test_stream_resume_is_exact_with_the_same_slots_and_restarts_at_the_earliest_shard(tmp_path):
    data = _stream(tmp_path, 5, 10)
    straight, _ = _take(data, 9, world=1, workers=2, batch=4)
    first, pos = _take(data, 3, world=1, workers=2, batch=4)  # stop after 3 batches (odd)
    rest, _ = _take(data, 6, world=1, workers=2, batch=4, state=pos[0])
    assert first[0] + rest[0] == straight[0]
    # workers 2 -> 0 (2 slots -> 1): restart at the earliest shard any slot was reading
    st = StreamState(**{k: v for k, v in pos[0].items()})
    assert st.resumed(1).cursors == [(min(g for g, _ in pos[0]["cursors"]), 0)]
    other, _ = _take(data, 6, world=1, workers=0, batch=4, state=pos[0])
    seen = {k for step in first[0] for k in step}
    shard_of = {k.split(":")[0] for k in seen}
    # nothing skipped: the shards read so far are read again from their start
    assert {k.split(":")[0] for k in other[0][0]} <= shard_of
    assert seen <= {k for step in other[0] for k in step} | seen


def test_stream_labels_from_cls_and_class_count_from_a_manifest(tmp_path, capsys):
    src = make_shards(tmp_path / "s", 2, 20)
    out = tmp_path / "prep"
    assert main(["prepare", str(tmp_path / "s" / "*.tar"), "--out", str(out), "--format",
                 "shards", "--shard-size", "20", "--no-progress", "--workers", "0"]) == 0
    assert src  # the labelled source's classes are in the manifest
    m = json.loads((out / "manifest.json").read_text())
    assert m["label_counts"] == {"train": [13, 12, 13], "test": [1, 1, 0]} or \
        sum(map(sum, m["label_counts"].values())) == 40
    assert m["layout"] == "shards"
    (out / "list.txt").write_text("".join(f"pipe:cat {out}/{name}\n" for name in m["files"]))
    data = load_data(DataConfig(name=str(out / "list.txt")))
    assert len(data) == 38 and int(data.labels.max()) == 2
    loader = Loader(data, 0, 0, 2, rank_rows(0, 1, 2, 1), workers=0)
    epoch = []
    for _ in range(19):  # one slot: the epoch's 2 shards of 19 training examples each
        b = loader.next()
        assert b.y.tolist() == [v % 3 for v in _values(b)]
        epoch += _values(b)
    loader.close()
    # the split-keeping shuffle put source examples 19 and 39 at test positions
    assert sorted(epoch) == [v for v in range(40) if v not in (19, 39)]
    run = tmp_path / "run"
    assert main(["train", "--config", "digits", "--data", str(out / "list.txt"), "--out",
                 str(run), "--max-steps", "2", "--max-minutes", "0", *TINY_FLAGS,
                 "--class-cond", "true"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["num_classes"] == 3


# ---- bad data ------------------------------------------------------------------------------------

def _bad_shards(root: Path) -> str:
    """Shard 0: fine; shard 1: a garbled PNG member; shard 2: cut off inside a member."""
    make_shards(root, 3, 10)
    members = [(f"w{v:03d}.png", _png(v) if v != 13 else b"\x89PNG garbage") for v in
               range(10, 20)]
    write_shard(root / "train-001.tar", members)
    raw = (root / "train-002.tar").read_bytes()
    (root / "train-002.tar").write_bytes(raw[:len(raw) // 2 + 100])
    return str(root / "train-{000..002}.tar")


@pytest.mark.parametrize("kind", ["local", "pipe"])
def test_bad_shard_data_is_skipped_counted_and_named_or_fails_in_one_line(tmp_path, kind, capsys):
    spec = _bad_shards(tmp_path / "s")
    if kind == "pipe":
        spec = f"pipe:cat {spec}"
    flags = ["train", "--config", "digits", "--data", spec, "--max-minutes", "0",
             "--workers", "0", *TINY_FLAGS, "--batch-size", "5"]
    run = tmp_path / "run"
    assert main([*flags, "--out", str(run), "--max-steps", "8", "--log-every", "4"]) == 0
    err = capsys.readouterr().err
    assert "train-001.tar:w013" in err and "train-002.tar" in err, err
    with open(run / "metrics.csv") as f:
        bad = [int(r["bad_files"]) for r in csv.DictReader(f)]
    assert bad[-1] >= 2, bad  # the garbled image and the truncated shard
    rc = main([*flags, "--out", str(tmp_path / "r2"), "--max-steps", "4", "--bad-files", "fail"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "train-00" in lines[0]


def test_a_missing_shard_is_skipped_and_counted_or_named_in_one_line(tmp_path, capsys):
    make_shards(tmp_path / "s", 2, 10)
    spec = str(tmp_path / "s" / "train-{000..002}.tar")  # train-002.tar does not exist
    with pytest.warns(UserWarning, match="train-002.tar"):
        data = load_data(DataConfig(name=spec))
    assert len(data) == 20 and data.skipped == [str(tmp_path / "s" / "train-002.tar")]
    with pytest.raises(DataError, match="train-002.tar") as e:
        load_data(DataConfig(name=spec, bad_files="fail"))
    assert "\n" not in str(e.value)


def test_empty_or_mixed_size_shards_fail_before_any_network(tmp_path):
    write_shard(tmp_path / "empty.tar", [("a.txt", b"hello")])
    with pytest.raises(DataError, match="no example"):
        load_data(DataConfig(name=str(tmp_path / "empty.tar")))
    write_shard(tmp_path / "mixed.tar", [("a.png", _png(1, 6)), ("b.png", _png(2, 8))])
    with pytest.raises(DataError, match="--image-size"):
        load_data(DataConfig(name=str(tmp_path / "mixed.tar")))
    assert load_data(DataConfig(name=str(tmp_path / "mixed.tar"), image_size=4)).shape == (1, 4, 4)
    with pytest.raises(DataError, match="--image-size"):
        load_data(DataConfig(name=f"pipe:cat {tmp_path}/mixed.tar"))


# ---- prepare --format shards -> train ------------------------------------------------------------

def test_prepare_shards_round_trip_keeps_images_labels_and_split(tmp_path, capsys):
    from test_data_scale import _class_folder
    src = _class_folder(tmp_path / "imgs", n=45, size=8)
    out = tmp_path / "prep"
    assert main(["prepare", str(src), "--out", str(out), "--format", "shards",
                 "--shard-size", "20", "--workers", "2", "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == 45 and sorted(m["files"]) == [f"shard-{i:06d}.tar" for i in range(3)]
    assert [e["count"] for e in m["files"].values()] == [20, 20, 5]
    import hashlib
    for name, e in m["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == e["sha256"]
    for split in ("train", "test"):
        direct = load_data(DataConfig(name=str(src)), split)
        prepared = load_data(DataConfig(name=str(out)), split)
        pairs = sorted(zip(_values_of(prepared), prepared.labels.tolist(), strict=True))
        assert pairs == sorted(zip(_values_of(direct), direct.labels.tolist(), strict=True))
    assert prepared.class_names == ("class0", "class1", "class2")
    # shuffled: a shard is not one class after another
    first = load_data(DataConfig(name=str(out / "shard-000000.tar")))
    assert _values_of(first)[:10] != sorted(_values_of(first)[:10])
    # shards are also a prepare source
    assert main(["prepare", str(out / "*.tar"), "--out", str(tmp_path / "npy"), "--workers", "0",
                 "--no-progress"]) == 0
    assert sorted(_values_of(load_data(DataConfig(name=str(tmp_path / "npy")), "test"))) == \
        sorted(_values_of(load_data(DataConfig(name=str(out)), "test")))
    run = tmp_path / "run"
    assert main(["train", "--config", "digits", "--data", str(out), "--out", str(run),
                 "--max-steps", "1", "--max-minutes", "0", *TINY_FLAGS, "--class-cond",
                 "true"]) == 0
    # a shard of another size than its manifest says: one line, before any network
    with open(out / "shard-000001.tar", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(DataError, match="shard-000001.tar"):
        load_data(DataConfig(name=str(out)))


# ---- real processes (slow) ---------------------------------------------------------------------

@pytest.mark.slow  # ~20-40 s each: three training processes
@pytest.mark.parametrize("kind", ["local", "pipe"])
def test_sigkill_and_resume_over_shards_trains_on_the_same_examples(tmp_path, kind):
    """A straight run and one SIGKILLed mid-epoch and resumed log the same keys for every
    step: local shards resumed with other workers (2 -> 0), pipe: shards with the same (2)."""
    from test_data_scale import straight_and_killed_keys
    make_shards(tmp_path / "s", 3, 10)
    spec = str(tmp_path / "s" / "train-{000..002}.tar")
    spec, again = (spec, 0) if kind == "local" else (f"pipe:cat {spec}", 2)
    steps = 12  # 48 examples: more than an epoch of 30
    got, want = straight_and_killed_keys(tmp_path, spec, 5, again, steps)  # 20 of 30: mid-epoch
    assert sorted(want) == list(range(1, steps + 1)) and got == want


@pytest.mark.slow  # ~15 s: one 2-process torchrun
def test_torchrun_two_ranks_split_pipe_shards_and_cover_an_epoch(tmp_path, monkeypatch):
    """2 ranks x 1 worker over 4 pipe: shards of 10: after 4 steps of 5 per rank, the ranks
    have read disjoint shards holding every example exactly once."""
    from test_distributed import torchrun
    make_shards(tmp_path / "s", 4, 10)
    monkeypatch.setenv("DDPMKIT_KEY_LOG", str(tmp_path / "keys"))
    torchrun("train", "--config", "digits", "--data",
             f"pipe:cat {tmp_path}/s/train-{{000..003}}.tar", "--out", str(tmp_path / "run"),
             "--max-steps", "4", "--max-minutes", "0", "--workers", "1", *TINY_FLAGS,
             "--batch-size", "5")
    ranks = [[k for line in (tmp_path / name).read_text().splitlines()
              for k in line.split("\t")[1:]] for name in ("keys", "keys.rank1")]
    flat = ranks[0] + ranks[1]
    assert len(flat) == 40 and len(set(flat)) == 40
    assert not {k.split(":")[0] for k in ranks[0]} & {k.split(":")[0] for k in ranks[1]}
