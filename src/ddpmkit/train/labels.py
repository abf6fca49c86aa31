"""Class labels for class-conditional training and conditional likelihoods.

The labels of a split come from the data set itself (``data.labels``: class subfolders, a
``labels`` array in an ``.npz``, ``NAME.labels.npy``, the digits targets). The trainer takes
each batch's labels from the loader; these are for the class count and for ``eval``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError, DataError

__all__ = ["class_labels", "require_labels", "num_classes_of"]


def class_labels(cfg: DataConfig, split: str, data) -> torch.Tensor | None:
    """int64 labels [N] of ``split`` (aligned with ``data.x``), or None if the data has none."""
    y = getattr(data, "labels", None)  # the data package carries labels from every source
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


def require_labels(cfg: DataConfig, split: str, data) -> torch.Tensor:
    """:func:`class_labels`, or a one-line error naming the data set when it has none."""
    labels = class_labels(cfg, split, data)
    if labels is None:
        raise ConfigError(f"a class-conditional model needs labels, and data {cfg.name!r} has "
                          "none (digits have them; class subfolders, an .npz 'labels' array, "
                          "NAME.labels.npy or .cls shard members give them; a pipe: stream "
                          "needs the prepared manifest.json beside its list file)")
    return labels
