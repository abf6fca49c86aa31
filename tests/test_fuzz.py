"""A fuzzing sweep of the command line (issue 10): every command's flags, config files
(TOML/JSON), data files (.npy/.npz/images/tar shards, local and ``pipe:cat``) and checkpoint files (config.json, safetensors
headers, trainer state), each asserting: exit status 0 or 2, no traceback on stderr, nothing
outside ``--out`` changed.

Calls ``cli.main`` in-process. The default suite runs a few derandomised examples of each
(seconds); ``-m slow`` runs many more, randomised.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_reliability import STEP_FLAGS

from ddpmkit import config as C
from ddpmkit.cli import build_parser, main

FAST, SLOW = 4, 60
SIZES = [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)]
# Keeps every example small: one step of a tiny network, few samples, few sampler calls.
LAST = ["--max-steps", "1", "--max-minutes", "0", "--sample-num", "2", "--sample-steps", "2",
        "--no-progress"]


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=n == FAST, database=None,
                    suppress_health_check=list(HealthCheck))


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _outside(tree: dict[str, str], out: str) -> dict[str, str]:
    return {k: v for k, v in tree.items() if k != out and not k.startswith(out + "/")}


def run_cli(argv: list[str], roots: list[Path], out: str | None) -> int:
    """``main(argv)``; asserts exit 0/2, no traceback, and no change under ``roots`` outside
    ``out`` (a path relative to ``roots[0]``)."""
    before = [_tree(r) for r in roots]
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: usage errors exit 2, --help 0
            rc = e.code
    text = err.getvalue()
    assert rc in (0, 2), (argv, rc, text[-3000:])
    assert "Traceback" not in text, (argv, text[-3000:])
    if rc == 2:
        lines = [ln for ln in text.splitlines() if ln.strip() and
                 not ln.startswith("warning: ")]
        assert lines and ("error: " in lines[-1]), (argv, text[-2000:])
    after = [_tree(r) for r in roots]
    assert _outside(after[0], out or "\0") == _outside(before[0], out or "\0"), argv
    for b, a in zip(before[1:], after[1:], strict=True):
        assert a == b, argv
    return rc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fuzz") / "run"
    assert main(["train", "--out", str(run), "--max-steps", "2", "--checkpoint-every", "1",
                 *STEP_FLAGS]) == 0
    return run


def _flags(command: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(o for a in sub.choices[command]._actions for o in a.option_strings
                  if o.startswith("--") and o not in ("--help", "--debug", "--out",
                                                      "--checkpoint"))


_WORDS = ["0", "1", "2", "-1", "3", "40", "1,2", "true", "nan", "inf", "1e-3", "cosine", "v",
          "x0", "linear", "ddim", "heun", "dpm++3m", "ancestral", "digits", "moons", "toy2d",
          "cpu", "meta", "cuda:7", "test", "", "1_0", "4294967296", "10,10", "learned_range",
          "hybrid", "vlb", "fp16", "loss_aware", "none", "auto", "skip", "fail"]
_VALUES = st.one_of(st.sampled_from(_WORDS), st.integers(-3, 40).map(str),
                    st.text(max_size=6))


def _argv(command: str, draw_pairs) -> list[str]:
    return [x for flag, value in draw_pairs for x in
            ((flag,) if flag in ("--no-progress", "--json", "--force", "--raw-weights",
                                 "--overwrite", "--allow-changes") else (flag, value))]


# ---- every command's flags --------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_fuzzed_flags_of_every_command(n, trained):
    commands = {c: _flags(c) for c in ("sample", "eval", "show", "encode")}
    defaults = {"sample": ["--num", "2", "--steps", "2", "--no-progress"],
                "eval": ["--max-examples", "2", "--no-progress"],
                "show": ["--num", "1", "--frames", "2"], "encode": ["--num", "1", "--steps", "2"]}
    suffix = {"sample": ".npz", "eval": "", "show": "", "encode": ".png"}

    @_settings(n)
    @given(command=st.sampled_from(sorted(commands)), data=st.data())
    def check(command, data):
        pairs = data.draw(st.lists(st.tuples(st.sampled_from(commands[command]), _VALUES),
                                   max_size=4))
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            out = ["--out", str(root / f"out{suffix[command]}")] if command != "eval" else []
            run_cli([command, "--checkpoint", str(trained), *defaults[command],
                     *_argv(command, pairs), *out], [root, trained],
                    f"out{suffix[command]}")
    check()


@pytest.mark.parametrize("n", SIZES)
def test_fuzzed_train_flags(n, trained):
    flags = [f for f in _flags("train") if f not in ("--max-steps", "--max-minutes")]

    @_settings(n)
    @given(pairs=st.lists(st.tuples(st.sampled_from(flags), _VALUES), max_size=4),
           resume=st.booleans())
    def check(pairs, resume):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            if resume:  # a copy of a trained run, resumed with the fuzzed flags
                shutil.copytree(trained, root / "run")
            run_cli(["train", "--out", str(root / "run"), *STEP_FLAGS, *_argv("train", pairs),
                     *LAST], [root, trained], "run")
    check()


# ---- config files -------------------------------------------------------------------------------

_LEAF = st.one_of(st.booleans(), st.integers(-3, 64), st.floats(allow_nan=True),
                  st.sampled_from(_WORDS), st.text(max_size=5))
_FIELDS = {name: sorted(f.name for f in __import__("dataclasses").fields(cls))
           for name, cls in C.SECTIONS.items()}


@st.composite
def _config_dict(draw):
    d = {}
    for section in draw(st.lists(st.sampled_from([*C.SECTIONS, "extra"]), max_size=3,
                                 unique=True)):
        keys = _FIELDS.get(section, ["x"])
        d[section] = draw(st.dictionaries(st.sampled_from(keys) | st.text(max_size=4),
                                          _LEAF | st.lists(st.integers(0, 4), max_size=3),
                                          max_size=3))
    if draw(st.booleans()):
        d["version"] = draw(st.integers(-1, 3))
    return d


def _toml(d: dict) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)
    lines = [f"version = {d['version']}"] if "version" in d else []
    for section, table in d.items():
        if section != "version":
            lines.append(f"[{json.dumps(section)}]")
            lines += [f"{json.dumps(k)} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("n", SIZES)
def test_fuzzed_config_files(n):
    @_settings(n)
    @given(d=_config_dict(), kind=st.sampled_from(["toml", "json", "bytes"]),
           junk=st.binary(max_size=40))
    def check(d, kind, junk):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            path = root / f"c.{'json' if kind == 'json' else 'toml'}"
            text = {"toml": _toml(d), "json": json.dumps(d)}.get(kind)
            path.write_bytes(text.encode() if text is not None else junk)
            run_cli(["train", "--config", str(path), "--out", str(root / "run"), *STEP_FLAGS,
                     *LAST], [root], "run")
    check()


# ---- data files ---------------------------------------------------------------------------------

def _png_bytes(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _tar_bytes(n: int, draw) -> bytes:
    """A shard of ``n`` examples: 8x8 PNG (or .npy) members, .cls labels, a .json."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(n):
            img = np.full((8, 8), i * 9, np.uint8)
            ext = draw(st.sampled_from(["png", "npy", "jpg", "txt"]))
            if ext == "npy":
                b = io.BytesIO()
                np.save(b, img)
                data = b.getvalue()
            else:
                data = _png_bytes(img, "PNG" if ext != "jpg" else "JPEG")
            members = [(f"{i:03d}.{ext}", data), (f"{i:03d}.cls", draw(
                st.sampled_from([b"1", b"0\n", b"-1", b"x", b"99999999999"]))),
                (f"{i:03d}.json", b"{}")]
            for name, d in members:
                info = tarfile.TarInfo(name)
                info.size = len(d)
                tf.addfile(info, io.BytesIO(d))
    return buf.getvalue()


@st.composite
def _data_file(draw):
    """(name, bytes) of an array file or an image folder's files, possibly damaged."""
    kind = draw(st.sampled_from(["npy", "npz", "images", "shards", "pipe"]))
    n = draw(st.integers(0, 24))
    shape = draw(st.sampled_from([(n, 8, 8), (n, 8, 8, 3), (n, 1, 8, 8), (n, 8, 4), (n,),
                                  (n, 8, 8, 2)]))
    dtype = draw(st.sampled_from([np.uint8, np.float32, np.int64, np.float16, np.bool_]))
    arr = (np.random.default_rng(draw(st.integers(0, 9))).random(shape) *
           draw(st.sampled_from([1, 255, 300, -1]))).astype(dtype)
    if kind == "npy":
        buf = io.BytesIO()
        np.save(buf, arr)
        files = {"d.npy": buf.getvalue()}
    elif kind == "npz":
        buf = io.BytesIO()
        np.savez(buf, **{draw(st.sampled_from(["arr_0", "x", "y"])): arr})
        files = {"d.npz": buf.getvalue()}
    elif kind in ("shards", "pipe"):
        files = {"d.tar": _tar_bytes(n, draw)}
    else:
        fmts = draw(st.lists(st.sampled_from(["PNG", "JPEG", "WEBP", "BMP", "GIF"]),
                             min_size=1, max_size=4))
        files = {f"imgs/{i:02d}.{fmts[i % len(fmts)].lower()}":
                 _png_bytes(np.full((8, 8), i * 9, np.uint8), fmts[i % len(fmts)])
                 for i in range(n)}
    damage = draw(st.sampled_from(["none", "truncate", "flip", "junk", "header"]))
    if damage != "none" and files:
        name = draw(st.sampled_from(sorted(files)))
        b = bytearray(files[name])
        if damage == "header" and len(b) >= 1024:  # a byte of a tar header (or a member)
            b[512 * draw(st.integers(0, len(b) // 512 - 1)) + draw(st.integers(0, 511))] ^= 0x5A
        elif damage == "truncate":
            b = b[:draw(st.integers(0, max(0, len(b) - 1)))]
        elif damage == "flip" and b:
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= draw(st.integers(1, 255))
        else:
            b = bytearray(draw(st.binary(max_size=64)))
        files[name] = bytes(b)
    return kind, files


@pytest.mark.parametrize("n", SIZES)
def test_fuzzed_data_files(n):
    @_settings(n)
    @given(data=_data_file(), bad=st.sampled_from(["skip", "fail"]))
    def check(data, bad):
        kind, files = data
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "imgs").mkdir()
            for name, b in files.items():
                (root / name).write_bytes(b)
            target = str(root / {"images": "imgs", "shards": "d.tar", "pipe": "d.tar"}.get(
                kind, f"d.{kind}"))
            if kind == "pipe":
                target = f"pipe:cat {target}"
            run_cli(["train", "--config", "digits", "--data", target, "--bad-files", bad,
                     "--out", str(root / "run"), *STEP_FLAGS, "--batch-size", "2", *LAST],
                    [root], "run")
    check()


# ---- checkpoint files ---------------------------------------------------------------------------

def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


@st.composite
def _damage(draw):
    """A function damaging one checkpoint folder: config.json, a safetensors header, the
    trainer state."""
    what = draw(st.sampled_from(["config", "header", "state", "bytes"]))
    section = draw(st.sampled_from(sorted(_FIELDS)))
    key = draw(st.sampled_from(_FIELDS[section]) | st.text(max_size=4))
    value = draw(_LEAF | st.lists(st.integers(-1, 4), max_size=3) | st.none())
    name = draw(st.sampled_from(["model", "ema", "trainer"]))
    cut = draw(st.integers(0, 200))
    flip = draw(st.integers(0, 10_000)), draw(st.integers(1, 255))
    state_key = draw(st.sampled_from(["step", "images_seen", "skipped", "world_size",
                                      "global_batch", "optimizer", "log_window",
                                      "format_version"]))

    def damage(ckpt: Path) -> None:
        if what == "config":
            _edit_json(ckpt / "config.json",
                       lambda d: d.setdefault(section, {}).__setitem__(key, value))
        elif what == "header":
            p = ckpt / f"{name}.safetensors"
            raw = p.read_bytes()
            (size,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8:8 + size])
            k = sorted(k for k in header if k != "__metadata__")[cut % (len(header) - 1)]
            header[k][["dtype", "shape", "data_offsets"][flip[1] % 3]] = value
            new = json.dumps(header).encode()
            p.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + size:])
        elif what == "state":
            p = ckpt / "trainer.safetensors"
            raw = p.read_bytes()
            (size,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8:8 + size])
            state = json.loads(header["__metadata__"]["trainer_state"])
            state[state_key] = value
            header["__metadata__"]["trainer_state"] = json.dumps(state)
            new = json.dumps(header).encode()
            new += b" " * (-len(new) % 8)
            p.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + size:])
        else:
            p = ckpt / f"{name}.safetensors"
            b = bytearray(p.read_bytes())
            b[flip[0] % len(b)] ^= flip[1]
            p.write_bytes(bytes(b[:len(b) - cut]))
    return damage


@pytest.mark.parametrize("n", SIZES)
def test_fuzzed_checkpoint_files(n, trained):
    @_settings(n)
    @given(damage=_damage(), command=st.sampled_from(["sample", "train", "eval"]))
    def check(damage, command):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            run = root / "run"
            shutil.copytree(trained, run)
            damage(run / "checkpoints" / "step-0000002")
            argv = {"sample": ["sample", "--checkpoint", str(run), "--num", "2", "--steps", "2",
                               "--out", str(root / "out" / "s.png"), "--no-progress"],
                    "eval": ["eval", "--checkpoint", str(run), "--max-examples", "1",
                             "--no-progress"],
                    "train": ["train", "--out", str(run), "--max-steps", "3", "--no-progress"]}
            # train writes into its run folder: only that may change
            out = "run" if command == "train" else "out"
            run_cli(argv[command], [root], out)
    check()
