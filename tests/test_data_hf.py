"""Hugging Face sources: ``save_to_disk`` folders and parquet files, read lazily (data/hf.py).

Tiny data sets are built here with ``datasets`` (a dev dependency); nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import TINY_FLAGS

from ddpmkit.config import DataConfig
from ddpmkit.data import Loader, fingerprint, load_data, rank_rows, u8_to_float
from ddpmkit.errors import DataError

datasets = pytest.importorskip("datasets")

N, SIZE, NAMES = 45, 8, ["cat", "dog", "eel"]


def _pixels(n: int = N, seed: int = 0) -> np.ndarray:
    """uint8 [n, 8, 8, 3]: random values, so a shifted row, a swapped channel or a wrong
    rounding cannot pass as equal."""
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _features():
    return datasets.Features({"image": datasets.Image(),
                              "label": datasets.ClassLabel(names=NAMES)})


def _dataset(pix: np.ndarray, labels: list[int]):
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(a), "path": None} for a in pix], "label": labels},
        features=_features())


def _as_float(u8: np.ndarray) -> torch.Tensor:
    return u8_to_float(torch.from_numpy(u8).permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def hf_sources(tmp_path_factory) -> dict:
    """The same 45 labelled images as a Dataset folder, a DatasetDict (40 train / 5 test), one
    parquet file, and a Hub-layout parquet folder (2 train shards + 1 test file)."""
    root = tmp_path_factory.mktemp("hf")
    pix, labels = _pixels(), [(7 * i) % 3 for i in range(N)]
    ds = _dataset(pix, labels)
    ds.save_to_disk(str(root / "folder"))
    datasets.DatasetDict({"train": ds.select(range(40)), "test": ds.select(range(40, N))}
                         ).save_to_disk(str(root / "dict"))
    ds.to_parquet(str(root / "one.parquet"))
    (root / "hub" / "data").mkdir(parents=True)
    ds.select(range(20)).to_parquet(str(root / "hub/data/train-00000-of-00002.parquet"))
    ds.select(range(20, 40)).to_parquet(str(root / "hub/data/train-00001-of-00002.parquet"))
    ds.select(range(40, N)).to_parquet(str(root / "hub/data/test-00000-of-00001.parquet"))
    return {"root": root, "pix": pix, "labels": np.asarray(labels)}


def _load(name, split="train", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_data(DataConfig(name=str(name), **kw), split)


@pytest.mark.parametrize("src", ["folder", "one.parquet"])
def test_single_split_sources_give_the_written_pixels_and_labels_by_the_split_rule(
        hf_sources, src):
    pix, labels = hf_sources["pix"], hf_sources["labels"]
    test_idx = np.arange(19, N, 20)  # every 20th example is a test example
    train_idx = np.setdiff1d(np.arange(N), test_idx)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        ds = _load(hf_sources["root"] / src, split)
        assert ds.levels == 256 and ds.shape == (3, SIZE, SIZE) and len(ds) == len(idx)
        assert torch.equal(ds.x, _as_float(pix[idx]))
        assert torch.equal(ds.labels, torch.from_numpy(labels[idx]))
        assert ds.class_names == tuple(NAMES)


@pytest.mark.parametrize("src", ["dict", "hub", "hub/data/*.parquet"])
def test_train_and_test_splits_of_the_source_are_used_as_they_are(hf_sources, src):
    pix, labels = hf_sources["pix"], hf_sources["labels"]
    for split, idx in (("train", np.arange(40)), ("test", np.arange(40, N))):
        ds = _load(hf_sources["root"] / src, split)
        assert torch.equal(ds.x, _as_float(pix[idx]))
        assert torch.equal(ds.labels, torch.from_numpy(labels[idx]))
        assert ds.class_names == tuple(NAMES)


def test_grey_and_resized_reads_match_the_folder_decoder(hf_sources, tmp_path):
    """--channels 1 and --image-size go through the same decoder as image folders."""
    pix = hf_sources["pix"]
    for i, a in enumerate(pix):
        Image.fromarray(a).save(tmp_path / f"{i:03d}.png")
    for kw in ({"channels": 1}, {"image_size": 4}):
        hf = _load(hf_sources["root"] / "folder", **kw)
        folder = _load(tmp_path, **kw)
        assert hf.shape == folder.shape and torch.equal(hf.x, folder.x)


def test_loader_workers_and_resume_read_the_same_batches_as_the_main_process(hf_sources):
    ds = _load(hf_sources["root"] / "folder")
    rows = rank_rows(0, 1, 16, 1)
    batches = []
    for workers in (0, 2):
        loader = Loader(ds, seed=3, start=5, global_batch=16, rows=rows, workers=workers,
                        keys=True)
        batches.append([loader.next() for _ in range(4)])  # 64 > 43: crosses an epoch
        loader.close()
    # a loader resumed 2 batches in (another worker count) reads what the straight one read
    resumed = Loader(ds, seed=3, start=5 + 32, global_batch=16, rows=rows, workers=1, keys=True)
    batches.append([None, None] + [resumed.next() for _ in range(2)])
    resumed.close()
    for a, b, c in zip(*batches, strict=True):
        assert a.keys == b.keys and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert c is None or (c.keys == a.keys and torch.equal(c.x, a.x))
    # each key names its row, and the row's pixels and label are the ones written
    pix, labels = hf_sources["pix"], hf_sources["labels"]
    for batch in batches[1]:
        rows_ = [int(k.rsplit("[", 1)[1][:-1]) for k in batch.keys]
        assert torch.equal(batch.x, _as_float(pix[rows_]))
        assert batch.y.tolist() == labels[rows_].tolist()


def test_prepare_then_train_round_trip_and_class_cond_training_directly(hf_sources, tmp_path,
                                                                        capsys):
    from ddpmkit.cli import main
    src, out = hf_sources["root"] / "dict", tmp_path / "prepared"
    assert main(["prepare", str(src), "--out", str(out), "--workers", "0",
                 "--no-progress"]) == 0
    assert f"prepared 40 images of 3x{SIZE}x{SIZE}, 3 classes" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["class_names"] == NAMES and m["skipped"] == []
    assert np.array_equal(np.load(out / "images.npy"), hf_sources["pix"][:40])
    assert np.array_equal(np.load(out / "labels.npy"), hf_sources["labels"][:40])
    run = tmp_path / "run"
    assert main(["train", "--config", "digits", "--data", str(src), "--out", str(run),
                 "--class-cond", "--workers", "0", "--max-steps", "2", "--max-minutes", "0",
                 *TINY_FLAGS]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["num_classes"] == 3
    assert config["data"]["fingerprint"] == fingerprint(str(src)) != ""


def _with_bad_rows(root: Path) -> tuple[Path, np.ndarray]:
    """20 images; row 3 is not an image at all, row 11 a PNG cut short (its header reads),
    row 15 null (no bytes, no path)."""
    pix = _pixels(20, seed=1)
    raw = [_png(a) for a in pix]
    raw[3], raw[11] = b"not an image", raw[11][:-40]
    datasets.Dataset.from_dict(
        {"image": [None if i == 15 else {"bytes": b, "path": None} for i, b in enumerate(raw)],
         "label": [i % 3 for i in range(20)]},
        features=_features()).save_to_disk(str(root / "bad"))
    return root / "bad", pix


def test_unreadable_rows_are_skipped_and_counted_or_fail_naming_the_row(tmp_path, capsys):
    src, pix = _with_bad_rows(tmp_path)
    with pytest.warns(UserWarning) as caught:
        ds = load_data(DataConfig(name=str(src)), "train")
        x = ds.x
    said = " ".join(str(w.message) for w in caught)
    assert f"{src}[3]" in said and f"{src}[11]" in said and f"{src}[15]: the row has" in said
    # rows 3 and 15 fail the header pass; the 18 left are too few for a test example
    keep = [i for i in range(20) if i not in (3, 11, 15)]
    assert torch.equal(x, _as_float(pix[keep])) and ds.labels.tolist() == [i % 3 for i in keep]
    assert sorted(ds.skipped) == [f"{src}[11]", f"{src}[15]", f"{src}[3]"]
    with pytest.raises(DataError, match=r"cannot read image .*bad\[3\]"):
        load_data(DataConfig(name=str(src), bad_files="fail"), "train")
    # in training, the row that passed the header pass is replaced, counted and named
    from ddpmkit.cli import main
    run = tmp_path / "run"
    assert main(["train", "--config", "digits", "--data", str(src), "--out", str(run),
                 "--max-steps", "2", "--max-minutes", "0", "--workers", "0",
                 *TINY_FLAGS]) == 0
    metrics = (run / "metrics.csv").read_text().splitlines()
    col = metrics[0].split(",").index("bad_files")
    assert sum(int(float(r.split(",")[col] or 0)) for r in metrics[1:]) >= 1
    assert f"{src}[11]" in capsys.readouterr().err


def test_no_image_column_no_rows_and_no_pyarrow_are_one_line_errors(tmp_path, monkeypatch):
    datasets.Dataset.from_dict({"text": ["a", "b"], "n": [1, 2]}).save_to_disk(
        str(tmp_path / "text"))
    datasets.Dataset.from_dict({"text": ["a"]}).to_parquet(str(tmp_path / "text.parquet"))
    for src in ("text", "text.parquet"):
        with pytest.raises(DataError, match=r"no image column among text \(string\), n "
                           if src == "text" else r"no image column among text"):
            load_data(DataConfig(name=str(tmp_path / src)))
    datasets.Dataset.from_dict({"image": [], "label": []}, features=_features()).save_to_disk(
        str(tmp_path / "empty"))
    with pytest.raises(DataError, match="holds no rows"):
        load_data(DataConfig(name=str(tmp_path / "empty")))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(DataError, match=r"needs pyarrow.*pip install 'ddpmkit\[hf\]'"):
        load_data(DataConfig(name=str(tmp_path / "text")))


def test_path_only_rows_are_read_from_their_files(tmp_path):
    """to_parquet keeps images that came from files as paths (no bytes): read from there."""
    pix = _pixels(3, seed=2)
    paths = []
    for i, a in enumerate(pix):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    ds = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "paths.parquet"))
    got = _load(tmp_path / "paths.parquet")
    assert got.labels is None and torch.equal(got.x, _as_float(pix))


def test_reading_other_sources_imports_neither_datasets_nor_pyarrow(tmp_path):
    np.save(tmp_path / "x.npy", _pixels(4))
    code = ("import sys, ddpmkit\n"
            "from ddpmkit.config import DataConfig\n"
            "from ddpmkit.data import load_data, fingerprint\n"
            f"load_data(DataConfig(name={str(tmp_path / 'x.npy')!r})).x\n"
            f"fingerprint({str(tmp_path / 'x.npy')!r})\n"
            "print(sorted(m for m in ('datasets', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"
