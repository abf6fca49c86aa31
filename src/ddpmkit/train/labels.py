"""Class labels for class-conditional training and conditional likelihoods.

A stop-gap until the data package (data issue) carries labels with every batch: the labels
of a split come from the data set object itself where it has them (``data.y``), else from
the in-memory sources that have them: scikit-learn's digits targets, and a ``labels`` array
beside ``arr_0`` in an ``.npz`` (split like the images: every 20th example is test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError, DataError

__all__ = ["class_labels", "require_labels", "num_classes_of"]


def class_labels(cfg: DataConfig, split: str, data) -> torch.Tensor | None:
    """int64 labels [N] of ``split`` (aligned with ``data.x``), or None if the data has none."""
    y = getattr(data, "y", None)
    if y is None:
        y = _builtin_labels(cfg, split)
    if y is None:
        return None
    y = torch.as_tensor(np.asarray(y)).reshape(-1)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"class labels of {cfg.name!r} must be integers, got {y.dtype}")
    y = y.long()
    if len(y) != len(data):
        raise DataError(f"{cfg.name!r} has {len(y)} labels for {len(data)} examples")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"class labels of {cfg.name!r} must be >= 0, got {int(y.min())}")
    return y


def num_classes_of(labels: torch.Tensor) -> int:
    """Classes 0..max(labels): the count a conditional network is built for."""
    return int(labels.max()) + 1 if len(labels) else 0


def _builtin_labels(cfg: DataConfig, split: str) -> np.ndarray | None:
    from ..data import _DIGITS_TRAIN, _test_mask

    if cfg.name == "digits":
        from sklearn.datasets import load_digits  # ships with scikit-learn: no download
        target = load_digits().target
        return target[:_DIGITS_TRAIN] if split == "train" else target[_DIGITS_TRAIN:]
    path = Path(cfg.name).expanduser()
    if path.suffix.lower() == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if "labels" not in f.files:
                return None
            labels = f["labels"]
        test = _test_mask(len(labels))
        if split == "test" and not test.any():
            split = "train"  # as the images: a tiny array's test split is its training set
        return labels[test] if split == "test" else labels[~test]
    return None


def require_labels(cfg: DataConfig, split: str, data) -> torch.Tensor:
    """:func:`class_labels`, or a one-line error naming the data set when it has none."""
    labels = class_labels(cfg, split, data)
    if labels is None:
        raise ConfigError(f"a class-conditional model needs labels, and data {cfg.name!r} has "
                          "none (digits have them; an .npz can hold a 'labels' array beside "
                          "'arr_0')")
    return labels
