"""scikit-learn's 8x8 digits (1797 images, values 0..16, labels 0..9), read without importing
scikit-learn.

``sklearn.datasets.load_digits`` reads a 57 KB CSV that ships inside scikit-learn, but
importing ``sklearn.datasets`` first loads scipy.stats and pandas: 1.5 s on a quiet 2-core
machine, 5 s on a busy one, paid by every ``ddpmkit`` command on digits and by every test
that starts one. The same CSV is read here directly (located without importing the package)
and checked; if a scikit-learn release moves or changes it, ``load_digits`` is the fallback.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

N_DIGITS = 1797


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: uint8 ``[1797, 8, 8]`` with values 0..16 and int64 ``[1797]``,
    in load_digits' order. Read-only arrays (shared between callers)."""
    table = _read_csv()
    if table is None:
        from sklearn.datasets import load_digits  # the layout moved: ask scikit-learn

        bunch = load_digits()
        table = np.concatenate([bunch.data, bunch.target[:, None]], axis=1).astype(np.int64)
    images = table[:, :64].astype(np.uint8).reshape(N_DIGITS, 8, 8)
    labels = table[:, 64].copy()
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _read_csv() -> np.ndarray | None:
    """The ``[1797, 65]`` table (64 pixels, then the label) of scikit-learn's digits.csv.gz,
    or None when it is not where scikit-learn keeps it or does not look like the digits."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError):
        return None
    ok = (table.shape == (N_DIGITS, 65) and np.array_equal(table, np.round(table))
          and table[:, :64].min() >= 0 and table[:, :64].max() <= 16
          and set(np.unique(table[:, 64])) == set(range(10)))
    return table.astype(np.int64) if ok else None
