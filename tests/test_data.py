"""Tests for ddpmkit.data: built-in sets, image folders, array files and the helpers."""

from __future__ import annotations

import io
import math
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from ddpmkit.config import POINT_SETS, DataConfig
from ddpmkit.data import (
    Batch,
    Dataset,
    DataWarning,
    load_data,
    random_flip,
    sample_points,
    to_uint8,
)
from ddpmkit.data.loader import batch_chw
from ddpmkit.errors import DataError


def load(name: Path | str, split: str = "train", **kw) -> Dataset:
    return load_data(DataConfig(name=str(name), **kw), split)


def as_u8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] values -> the 8-bit level they sit on, asserting they sit on one."""
    v = (x.double() + 1.0) * 127.5
    assert torch.all((v - v.round()).abs() < 1e-4), "values are off the 8-bit grid"
    return v.round().to(torch.int64).numpy()


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def check_valid(ds: Dataset) -> None:
    """Invariants every loaded image Dataset must satisfy."""
    assert isinstance(ds, Dataset)
    assert ds.x.dtype == torch.float32 and ds.x.ndim == 4 and len(ds) > 0
    assert ds.x.shape[1] in (1, 3) and ds.x.shape[2] == ds.x.shape[3] > 0
    assert torch.isfinite(ds.x).all() and ds.x.abs().max() <= 1.0
    assert ds.levels == 256 and ds.kind == "image"
    as_u8(ds.x)


# ---- digits ------------------------------------------------------------------------------

def test_digits_shapes_levels_and_split():
    from sklearn.datasets import load_digits

    train, test = load("digits"), load("digits", "test")
    assert train.x.shape == (1500, 1, 8, 8) and test.x.shape == (297, 1, 8, 8)
    assert train.shape == (1, 8, 8) and len(train) == 1500
    assert train.x.dtype == torch.float32 and train.levels == test.levels == 17
    assert train.kind == "image" and train.skipped == []
    values = torch.cat([train.x.flatten(), test.x.flatten()]).unique()
    grid = torch.tensor([-1 + 2 * k / 16 for k in range(17)], dtype=torch.float32)
    assert torch.equal(values, grid)  # exactly the 17 bin centres, every one used
    raw = load_digits().images
    # train is the first 1500 images and test the last 297, so they do not overlap
    assert torch.equal(train.x[-1, 0], torch.tensor(raw[1499] / 16 * 2 - 1).float())
    assert torch.equal(test.x[0, 0], torch.tensor(raw[1500] / 16 * 2 - 1).float())
    assert not torch.equal(train.x[0], test.x[0])
    assert torch.equal(load("digits").x, train.x)


def test_digits_read_without_scikit_learn_equal_load_digits(monkeypatch):
    """data/digits.py reads scikit-learn's CSV directly, without importing scikit-learn; the
    arrays equal load_digits' exactly, and so does the fallback when the CSV is not found."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from ddpmkit.data import digits

    bunch = load_digits()
    for found in (True, False):
        digits.digits_arrays.cache_clear()
        if not found:
            monkeypatch.setattr(digits, "_read_csv", lambda: None)
        images, labels = digits.digits_arrays()
        assert images.dtype == np.uint8 and np.array_equal(images, bunch.images)
        assert labels.dtype == np.int64 and np.array_equal(labels, bunch.target)
    digits.digits_arrays.cache_clear()
    code = ("import sys; from ddpmkit.data.digits import digits_arrays; digits_arrays(); "
            "print(sorted(m for m in ('sklearn', 'scipy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_digits_size_and_channels():
    base = load("digits").x
    big = load("digits", image_size=16, channels=3)
    assert big.x.shape == (1500, 3, 16, 16)
    assert torch.equal(big.x[:, 0], big.x[:, 2])
    assert torch.equal(big.x[:, 0, ::2, ::2], base[:, 0])  # pixel replication keeps levels
    assert big.x.unique().numel() == 17
    with pytest.raises(DataError, match="image_size=12"):
        load("digits", image_size=12)


# ---- 2-D point sets ----------------------------------------------------------------------

@pytest.mark.parametrize("name", POINT_SETS)
def test_point_sets(name):
    train = load(name, num_points=3000)
    test = load(name, "test", num_points=3000)
    assert train.x.shape == (3000, 2) and test.x.shape == (5000, 2)
    assert train.shape == (2,) and train.kind == "points" and train.levels is None
    assert train.x.dtype == torch.float32
    assert torch.isfinite(train.x).all() and torch.isfinite(test.x).all()
    assert torch.equal(load(name, num_points=3000).x, train.x)
    assert not torch.equal(train.x, test.x[:3000])
    # centred and unit RMS per coordinate (the documented scale), within a few percent
    x = test.x.double()
    assert x.mean(0).abs().max() < 0.06
    assert 0.9 < math.sqrt(x.pow(2).mean().item()) < 1.1
    assert x.abs().max() < 2.8


@pytest.mark.parametrize("name", POINT_SETS)
def test_sample_points_follows_generator(name):
    a = sample_points(name, 500, torch.Generator().manual_seed(1))
    b = sample_points(name, 500, torch.Generator().manual_seed(1))
    c = sample_points(name, 500, torch.Generator().manual_seed(2))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sample_points(name, 0).shape == (0, 2)
    assert sample_points(name, 7).shape == (7, 2)  # global RNG when no generator


def test_point_set_structure():
    g = torch.Generator().manual_seed(0)
    # 8gaussians: every point near one of 8 centres on a circle of radius ~sqrt(2)
    x = sample_points("8gaussians", 4000, g)
    angles = torch.arange(8) * math.pi / 4
    centres = math.sqrt(2 - 0.02) * torch.stack([angles.cos(), angles.sin()], 1)
    nearest = torch.cdist(x, centres).min(1)
    assert nearest.values.max() < 0.6
    assert torch.bincount(nearest.indices, minlength=8).min() > 300
    # checkerboard: back on the unit-cell board, every point is in a filled cell
    x = sample_points("checkerboard", 4000, g) / (math.sqrt(3) / 2)
    cells = torch.floor(x).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in cells.tolist()}) == 8
    # circles: two rings with radius ratio 2
    r = sample_points("circles", 4000, g).norm(dim=1)
    inner, outer = r[r < 1.34], r[r >= 1.34]
    assert 0.4 < len(inner) / len(r) < 0.6
    assert abs(outer.mean() / inner.mean() - 2.0) < 0.05
    # moons: undo the scaling; every point lies near the upper half of the unit circle or
    # near the lower half of the unit circle around (1, 1/2), about half on each
    p = sample_points("moons", 4000, g) / 2**0.5 + torch.tensor([0.5, 0.25])

    def to_upper_arc(q: torch.Tensor) -> torch.Tensor:
        ends = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        return torch.where(q[:, 1] >= 0, (q.norm(dim=1) - 1).abs(), torch.cdist(q, ends).min(1)[0])

    upper, lower = to_upper_arc(p), to_upper_arc(torch.tensor([1.0, 0.5]) - p)
    assert torch.minimum(upper, lower).max() < 0.25
    assert 0.4 < (upper < lower).float().mean() < 0.6


def test_unknown_names():
    with pytest.raises(DataError, match="did you mean 'moons'"):
        load("moon")
    with pytest.raises(DataError, match="did you mean 'digits'"):
        load("digit")
    with pytest.raises(DataError, match="'checkerbord'.*did you mean 'checkerboard'"):
        sample_points("checkerbord", 10)
    with pytest.raises(DataError, match="n=-1"):
        sample_points("moons", -1)
    with pytest.raises(DataError, match="split"):
        load("digits", "valid")
    with pytest.raises(DataError, match="empty"):
        load("")


# ---- image folders -----------------------------------------------------------------------

def make_mixed_folder(d: Path) -> None:
    d.mkdir(exist_ok=True)
    Image.new("L", (8, 8), 51).save(d / "a_grey.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(d / "b_red.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(d / "c_clear.png")  # -> white
    Image.new("RGBA", (8, 8), (0, 0, 0, 128)).save(d / "d_half.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255])
    pal.save(d / "e_palette.png")
    Image.fromarray(np.full((8, 8), 25700, np.uint16)).save(d / "f_16bit.png")
    (d / "notes.txt").write_text("not an image, ignored silently")
    (d / "meta.json").write_text("{}")


def test_folder_mixed_modes_and_exact_values(tmp_path):
    make_mixed_folder(tmp_path)
    assert Image.open(tmp_path / "f_16bit.png").mode == "I;16"  # the 16-bit path is tested
    assert Image.open(tmp_path / "e_palette.png").mode == "P"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean folder loads without any warning
        ds = load(tmp_path)
    check_valid(ds)
    assert ds.x.shape == (6, 3, 8, 8) and ds.skipped == []
    assert ds.name == str(tmp_path)
    pixels = as_u8(ds.x[:, :, 3, 3])
    half = (255 * 127 + 127) // 255  # black at alpha 128 over white
    assert pixels.tolist() == [
        [51, 51, 51], [255, 0, 0], [255, 255, 255], [half] * 3, [0, 0, 255], [100] * 3]
    assert ds.x[1, :, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert (as_u8(ds.x) == pixels[:, :, None, None]).all()  # uniform images stay uniform


def test_folder_grey_detection_and_channel_options(tmp_path):
    Image.new("L", (8, 8), 10).save(tmp_path / "a.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "b.png")
    grey_pal = Image.new("P", (8, 8), 1)
    grey_pal.putpalette([0, 0, 0, 90, 90, 90])
    grey_pal.save(tmp_path / "c.gif")
    deep = np.full((8, 8), 65535, np.uint16)
    deep[1, :4] = [200, 32767, 32896, 65278]  # 16 -> 8 bits rounds (v * 255 / 65535)
    Image.fromarray(deep).save(tmp_path / "d.png")
    ds = load(tmp_path)
    assert ds.x.shape == (4, 1, 8, 8)
    assert as_u8(ds.x[:, 0, 0, 0]).tolist() == [10, 255, 90, 255]
    assert as_u8(ds.x[3, 0, 1, :4]).tolist() == [1, 127, 128, 254]
    rgb = load(tmp_path, channels=3)
    assert rgb.x.shape == (4, 3, 8, 8) and torch.equal(rgb.x[:, 0], rgb.x[:, 2])
    assert torch.equal(rgb.x[:, :1], ds.x)

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "e_red.png")
    assert load(tmp_path).x.shape == (5, 3, 8, 8)  # one colour image makes it RGB
    luma = load(tmp_path, channels=1)
    assert luma.x.shape == (5, 1, 8, 8)
    assert as_u8(luma.x[4, 0, 0, 0]).item() == round(0.299 * 255)  # ITU-R 601 red


def test_folder_resize_and_centre_crop(tmp_path):
    wide = np.zeros((8, 24, 3), np.uint8)
    wide[:, 8:16] = 255  # only the centre square is white
    Image.fromarray(wide).save(tmp_path / "a_wide.png")
    tall = np.zeros((40, 20), np.uint8)
    tall[4:36] = 200  # covers the centre 20x20 plus the bicubic kernel's reach around it
    Image.fromarray(tall).save(tmp_path / "b_tall.png")
    Image.new("RGB", (64, 64), (0, 128, 255)).save(tmp_path / "c_big.png")
    Image.new("RGB", (5, 5), (7, 7, 7)).save(tmp_path / "d_small.bmp")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), np.uint8)).save(tmp_path / "e_noise.png")
    ds = load(tmp_path, image_size=8)
    check_valid(ds)
    assert ds.x.shape == (5, 3, 8, 8)
    u8 = as_u8(ds.x)
    assert (u8[0] == 255).all()  # 24x8 -> its centre 8x8, no scaling needed
    assert (u8[1] == 200).all()  # 20x40 -> centre 20x20 (the grey band) scaled to 8x8
    assert (u8[2] == np.array([0, 128, 255])[:, None, None]).all()
    assert (u8[3] == 7).all()
    assert len(np.unique(u8[4])) > 50  # the noise image is resampled, not blanked


def test_folder_sizes_must_match_without_image_size(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (16, 16)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match=r"8x8.*16x16.*--image-size"):
        load(tmp_path)
    assert load(tmp_path, image_size=4).x.shape == (2, 1, 4, 4)


def test_folder_non_square_without_image_size(tmp_path):
    Image.new("L", (8, 6)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"8x6.*not square.*--image-size"):
        load(tmp_path)


def test_folder_bad_files_skip_and_fail(tmp_path):
    make_mixed_folder(tmp_path)
    rng = np.random.default_rng(0)
    data = png_bytes(Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)))
    (tmp_path / "g_truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "h_text.png").write_text("this is text with a .png name")
    with pytest.warns(DataWarning) as record:
        ds = load(tmp_path)
        # h_text.png fails its header read at load; g_truncated.png has a good header, so it
        # is found when decoded (here by .x; in training, by a DataLoader worker)
        assert len(ds) == 7
        assert ds.x.shape[0] == 6
    assert len(ds) == 6
    assert [Path(p).name for p in ds.skipped] == ["g_truncated.png", "h_text.png"]
    messages = [str(w.message) for w in record]
    assert sum("g_truncated.png" in m for m in messages) == 1
    assert sum("h_text.png" in m for m in messages) == 1
    with pytest.raises(DataError, match="h_text.png"):  # at load: its header is unreadable
        load(tmp_path, bad_files="fail")
    (tmp_path / "h_text.png").unlink()
    lazy = load(tmp_path, bad_files="fail")
    with pytest.raises(DataError, match="g_truncated.png"):  # when its pixels are decoded
        lazy.x  # noqa: B018


def test_folder_empty_or_unreadable(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        load(tmp_path)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no image files"):
        load(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.warns(DataWarning), pytest.raises(DataError, match="no readable image"):
        load(tmp_path)


def test_folder_single_image_serves_both_splits(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "only.webp", lossless=True)
    train = load(tmp_path)
    with pytest.warns(DataWarning, match="fewer than 20"):
        test = load(tmp_path, "test")
    assert train.x.shape == test.x.shape == (1, 3, 4, 4)
    assert torch.equal(train.x, test.x)
    assert as_u8(train.x[0, :, 0, 0]).tolist() == [1, 2, 3]


def test_folder_split_recursion_and_formats(tmp_path):
    # 41 grey images whose value is their sorted index, spread over nested folders
    # and several formats; hidden files and folders are ignored.
    formats = [".png", ".bmp", ".gif", ".tif"]  # (WebP decodes as RGB: tested elsewhere)
    for i in range(41):
        sub = tmp_path / f"part{i // 10}"
        sub.mkdir(exist_ok=True)
        Image.new("L", (6, 6), i).save(sub / f"img{i:02d}{formats[i % len(formats)]}")
    (tmp_path / ".hidden").mkdir()
    Image.new("L", (6, 6), 250).save(tmp_path / ".hidden" / "x.png")
    Image.new("L", (6, 6), 250).save(tmp_path / ".dotfile.png")
    train, test = load(tmp_path), load(tmp_path, "test")
    assert as_u8(test.x[:, 0, 0, 0]).tolist() == [19, 39]
    assert as_u8(train.x[:, 0, 0, 0]).tolist() == [i for i in range(41) if i not in (19, 39)]
    assert train.x.shape == (39, 1, 6, 6)


def test_folder_jpeg_draft_downscale(tmp_path):
    Image.new("RGB", (400, 300), (30, 160, 90)).save(tmp_path / "big.jpg", quality=95)
    ds = load(tmp_path, image_size=16)
    assert ds.x.shape == (1, 3, 16, 16)
    assert np.abs(as_u8(ds.x)[0, :, 8, 8] - [30, 160, 90]).max() <= 3


# ---- arrays ------------------------------------------------------------------------------

def test_array_layouts_agree(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (25, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "nhwc.npy", a)
    np.save(tmp_path / "nchw.npy", a.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "packed.npz", a)
    np.savez(tmp_path / "named.npz", images=a)
    nhwc, nchw = load(tmp_path / "nhwc.npy"), load(tmp_path / "nchw.npy")
    check_valid(nhwc)
    assert nhwc.x.shape == (24, 3, 6, 6)
    assert torch.equal(nhwc.x, nchw.x)
    expected = np.delete(a, 19, axis=0).transpose(0, 3, 1, 2)
    assert (as_u8(nhwc.x) == expected).all()
    assert (as_u8(load(tmp_path / "nchw.npy", "test").x) == a[19:20].transpose(0, 3, 1, 2)).all()
    assert torch.equal(load(tmp_path / "packed.npz").x, nhwc.x)
    assert torch.equal(load(tmp_path / "named.npz").x, nhwc.x)


def test_array_grey_floats_and_conversions(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (3, 5, 5), dtype=np.uint8)
    np.save(tmp_path / "grey.npy", a)
    np.save(tmp_path / "unit.npy", (a / 255.0).astype(np.float32))
    np.save(tmp_path / "signed.npy", a / 127.5 - 1.0)
    grey = load(tmp_path / "grey.npy")
    assert grey.x.shape == (3, 1, 5, 5)
    assert (as_u8(grey.x)[:, 0] == a).all()
    assert torch.equal(load(tmp_path / "unit.npy").x, grey.x)
    assert torch.equal(load(tmp_path / "signed.npy").x, grey.x)
    rgb = load(tmp_path / "grey.npy", channels=3)
    assert rgb.x.shape == (3, 3, 5, 5) and torch.equal(rgb.x[:, 1:2], grey.x)

    red = np.zeros((2, 4, 4, 3), np.uint8)
    red[..., 0] = 255
    np.save(tmp_path / "red.npy", red)
    assert (as_u8(load(tmp_path / "red.npy", channels=1).x) == round(0.299 * 255)).all()
    resized = load(tmp_path / "red.npy", image_size=8)
    assert resized.x.shape == (2, 3, 8, 8)
    assert (as_u8(resized.x)[:, :, 0, 0] == [255, 0, 0]).all()


def test_array_non_square(tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((2, 4, 6), np.uint8))
    with pytest.raises(DataError, match="not square.*--image-size"):
        load(tmp_path / "wide.npy")
    assert load(tmp_path / "wide.npy", image_size=4).x.shape == (2, 1, 4, 4)


@pytest.mark.parametrize("array, match", [
    (np.zeros((4, 4), np.uint8), "shape"),
    (np.zeros((2, 1, 4, 4, 1), np.uint8), "shape"),
    (np.zeros((2, 4, 4, 4), np.uint8), "C = 1 or 3"),
    (np.zeros((0, 4, 4), np.uint8), "no pixels"),
    (np.array([[[np.nan, 0.5], [np.inf, 0.1]]]), "2 non-finite"),
    (np.full((1, 2, 2), 255.0), r"out of range \[255, 255\]"),
    (np.array([[[-2.0, 0.5], [0.0, 1.0]]]), r"out of range \[-2, 1\]"),
    (np.full((1, 2, 2), 300, np.int64), r"integers in \[300, 300\]"),
    (np.zeros((1, 2, 2), bool), "dtype bool"),
    (np.full((1, 2, 2), "ab"), "dtype <U2"),
    (np.zeros((1, 2, 2), np.complex64), "dtype complex64"),
])
def test_array_errors(tmp_path, array, match):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=match) as info:
        load(path)
    assert "bad.npy" in str(info.value)


def test_array_file_errors(tmp_path):
    obj = np.empty((1, 2, 2), dtype=object)
    obj[...] = 1
    np.save(tmp_path / "objects.npy", obj, allow_pickle=True)
    with pytest.raises(DataError, match="objects.npy"):
        load(tmp_path / "objects.npy")
    np.savez(tmp_path / "several.npz", a=np.zeros((1, 2, 2)), b=np.zeros((1, 2, 2)))
    with pytest.raises(DataError, match="'a', 'b'"):
        load(tmp_path / "several.npz")
    np.savez(tmp_path / "float_labels.npz", images=np.zeros((1, 2, 2)), labels=np.zeros(1))
    with pytest.raises(DataError, match="'labels' array of .*float_labels.npz must be integers"):
        load(tmp_path / "float_labels.npz")
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="garbage.npy"):
        load(tmp_path / "garbage.npy")
    (tmp_path / "table.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="table.csv"):
        load(tmp_path / "table.csv")


# ---- helpers -----------------------------------------------------------------------------

def test_to_uint8_round_trip(tmp_path):
    a = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    a[..., 1] = a[..., 1][:, ::-1]
    np.save(tmp_path / "levels.npy", a)
    x = load(tmp_path / "levels.npy").x
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 16, 16, 3)
    assert np.array_equal(out, a)
    edge = torch.tensor([-3.0, -1.0, 0.999, 1.5, float("nan")]).view(1, 1, 1, 5)
    assert to_uint8(edge)[0, 0, :, 0].tolist() == [0, 0, 255, 255, 128]
    with pytest.raises(DataError):
        to_uint8(torch.zeros(3, 4, 4))


def test_random_flip():
    x = torch.arange(64 * 2 * 3 * 4, dtype=torch.float32).view(64, 2, 3, 4)
    before = x.clone()
    y = random_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(x, before)  # input untouched
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert (flipped ^ kept).all()  # each image is either mirrored or unchanged
    assert 16 < flipped.sum() < 48
    assert torch.equal(y, random_flip(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(y, random_flip(x, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("shape", [(5, 3, 4, 6), (5, 3, 80, 72), (5, 1, 128, 130)])
def test_to_float_mirrors_exactly_the_chosen_rows(shape):
    # small images go batched, large ones row by row (>= 2**14 values): both are exact
    u8 = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    before = u8.clone()
    mirror = torch.tensor([True, False, False, True, True])
    ref = torch.where(mirror[:, None, None, None], u8.flip(-1), u8).float() / 127.5 - 1
    out = Batch.to_float(u8, mirror)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, ref)
    assert torch.equal(u8, before)  # the batch as read is left alone
    assert torch.equal(Batch.to_float(u8), u8.float() / 127.5 - 1)
    f = Batch.to_float(u8)  # float data (in-memory sets): only the mirroring
    assert torch.equal(Batch.to_float(f, mirror), ref)
    assert Batch.to_float(f) is f


def _jpeg(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    exif = save.pop("orientation", None)
    if exif is not None:
        e = Image.Exif()
        e[0x0112] = exif
        save["exif"] = e.tobytes()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def test_jpeg_fast_path_gives_the_same_pixels_as_pil(tmp_path, monkeypatch):
    pytest.importorskip("simplejpeg")
    from ddpmkit.data import images
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
                        .resize((45, 37), Image.Resampling.BICUBIC))
    cases = {
        "420": _jpeg(smooth, quality=90),
        "444": _jpeg(smooth, quality=95, subsampling=0),
        "progressive": _jpeg(smooth, quality=80, progressive=True),
        "grey": _jpeg(smooth[..., 0]),
        "rotated": _jpeg(smooth, orientation=6),  # PIL's path turns it upright
        "cmyk": (lambda b: (Image.fromarray(smooth).convert("CMYK").save(b, "JPEG"),
                            b.getvalue())[1])(io.BytesIO()),
    }
    calls = []
    real = images._jpeg_fast
    monkeypatch.setattr(images, "_jpeg_fast",
                        lambda img, data: calls.append(real(img, data)) or calls[-1])
    for name, blob in cases.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(blob)
        for size, ch in ((0, 3), (0, 1), (32, 3)):
            calls.clear()
            fast = images.decode(path, size, ch)
            with monkeypatch.context() as m:
                m.setattr(images, "_simplejpeg", lambda: None)
                slow = images.decode(path, size, ch)
            assert np.array_equal(fast, slow), (name, size, ch)
            # the fast decoder ran on the plain ones and stood aside for the others
            assert (calls[0] is not None) == (name not in ("rotated", "cmyk")), name
            assert np.array_equal(images.decode(io.BytesIO(blob), size, ch), slow)
    assert images.decode(tmp_path / "rotated.jpg", 0, 3).shape == (45, 37, 3)  # upright
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(cases["420"][: len(cases["420"]) // 2])
    with pytest.raises(Exception) as fast_error:
        images.decode(truncated, 0, 3)
    with monkeypatch.context() as m, pytest.raises(Exception) as pil_error:
        m.setattr(images, "_simplejpeg", lambda: None)
        images.decode(truncated, 0, 3)
    assert str(fast_error.value) == str(pil_error.value)  # PIL's own words, either way


@pytest.mark.parametrize("shape", [(4, 5, 3), (130, 128, 1), (90, 100, 3)])  # stack / rows
def test_batch_chw_is_the_transposed_stack(shape):
    imgs = [np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8) for i in range(3)]
    want = np.stack(imgs).transpose(0, 3, 1, 2)
    for batch in (imgs, np.stack(imgs)):  # a list of images, or one array of them
        out = batch_chw(batch)
        assert out.dtype == torch.uint8 and out.is_contiguous()
        assert np.array_equal(out.numpy(), want)
        # into a given buffer (a worker's reused shared-memory slot), which it returns
        buf = torch.full(want.shape, 7, dtype=torch.uint8)
        assert batch_chw(batch, buf) is buf and np.array_equal(buf.numpy(), want)


# ---- property tests: bad input is a DataError, never anything else -----------------------

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP",
           ".tif": "TIFF"}


@st.composite
def image_file_bytes(draw) -> tuple[str, bytes]:
    ext = draw(st.sampled_from(sorted(FORMATS)))
    if draw(st.booleans()):
        return ext, draw(st.binary(max_size=400))
    # A real image, then truncated and with a few bytes overwritten: reaches deep into
    # the decoders instead of failing at the signature.
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P"]))
    if FORMATS[ext] == "JPEG" and mode in ("RGBA", "P"):
        mode = "RGB"
    side = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 4), np.uint8)
    img = Image.fromarray(pixels, "RGBA").convert(mode)
    data = bytearray(png_bytes(img, FORMATS[ext]))
    cut = draw(st.integers(0, len(data)))
    data = data[:cut] if draw(st.booleans()) else data
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return ext, bytes(data)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(file=image_file_bytes(), image_size=st.sampled_from([0, 8]),
       bad_files=st.sampled_from(["skip", "fail"]), split=st.sampled_from(["train", "test"]))
def test_fuzzed_image_folder(file, image_size, bad_files, split):
    ext, data = file
    # A corrupted header can claim a huge image; keep PIL's bomb limit small so the test
    # never allocates much (above it PIL refuses, which must read as an unreadable file).
    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch.object(Image, "MAX_IMAGE_PIXELS", 1 << 16), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = Path(tmp)
        Image.new("RGB", (8, 8), (9, 99, 199)).save(d / "good.png")
        (d / f"fuzz{ext}").write_bytes(data)
        try:
            ds = load(d, split, image_size=image_size, bad_files=bad_files)
            ds.x  # noqa: B018 - pixels are decoded lazily: a bad one may fail only here
        except DataError as e:
            assert str(e)
            return
        check_valid(ds)
        assert len(ds) in (1, 2) and ds.x.shape[1:] == (3, 8, 8)
        assert len(ds) + len(ds.skipped) == 2
        # the good image is always there (with < 20 files, test = train)
        assert [9, 99, 199] in as_u8(ds.x[:, :, 0, 0]).tolist()


ARRAY_DTYPES = st.sampled_from([np.uint8, np.int8, np.int16, np.uint16, np.int64, np.float16,
                                np.float32, np.float64, np.bool_, np.complex64, "<U2", "S2"])


@st.composite
def array_files(draw) -> np.ndarray:
    dtype = draw(ARRAY_DTYPES)
    if draw(st.booleans()):
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5))
    else:  # a plausible image layout, so that most examples get past the shape check
        n, h, w, c = (draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6)),
                      draw(st.sampled_from([1, 3])))
        shape = draw(st.sampled_from([(n, h, w), (n, h, w, c), (n, c, h, w)]))
    if draw(st.booleans()) and np.dtype(dtype).kind in "fiu":
        # values that pass the range checks, so the layout/resize path is exercised too
        elements = (st.floats(0, 1, width=16) if np.dtype(dtype).kind == "f"
                    else st.integers(0, 127))
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(array=array_files(), container=st.sampled_from(["npy", "npz", "npz2", "object"]),
       image_size=st.sampled_from([0, 4]), channels=st.sampled_from([0, 1, 3]),
       split=st.sampled_from(["train", "test"]))
def test_fuzzed_arrays(array, container, image_size, channels, split):
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = Path(tmp)
        if container == "npy":
            path = d / "a.npy"
            np.save(path, array)
        elif container == "npz":
            path = d / "a.npz"
            np.savez(path, data=array)
        elif container == "npz2":
            path = d / "a.npz"
            np.savez(path, x=array, y=array)
        else:
            path = d / "a.npy"
            np.save(path, array.astype(object), allow_pickle=True)
        try:
            ds = load(path, split, image_size=image_size, channels=channels)
        except DataError as e:
            assert str(e)
            return
        check_valid(ds)
        assert container in ("npy", "npz")
        if channels:
            assert ds.x.shape[1] == channels
        if image_size:
            assert ds.x.shape[2] == image_size
