"""TensorBoard logging of a training run (``--log tensorboard``), beside metrics.csv.

Every metrics.csv row is written as scalars ``train/<column>`` at its step (the loss, its
parts ``mse`` / ``vb``, the per-quartile losses ``loss_q0..3`` with q0 the smallest t, the
learning rate, the gradient norm, steps/s and the FID when it is measured); every sample
grid (``--sample-every`` and the last one) as image ``samples``. Open it with
``tensorboard --logdir RUN``. The ``tensorboard`` package is an optional extra
(``pip install 'ddpmkit[tensorboard]'``), imported only here, when the option is used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError

SUBDIR = "tensorboard"  # inside the run folder
SKIPPED = ("step", "images", "elapsed_s")  # the x axis, or not a curve worth plotting


class TensorBoardLog:
    """A SummaryWriter on ``out/tensorboard``; ``purge_step``: a resumed run's first step, so
    events that a branch moved aside (steps after the checkpoint) are hidden."""

    def __init__(self, out: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--log tensorboard needs the tensorboard package: pip install "
                              "'ddpmkit[tensorboard]' (or pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(out / SUBDIR), purge_step=purge_step or None)

    def row(self, row: dict) -> None:
        """The numeric columns of one metrics.csv row (empty cells are skipped)."""
        step = int(row["step"])
        for key, value in row.items():
            if key in SKIPPED or value == "" or value is None:
                continue
            self.writer.add_scalar(f"train/{key}", float(value), step)
        self.writer.flush()

    def samples(self, x: torch.Tensor, step: int, nrow: int | None = None) -> None:
        """A grid of image samples ``x`` [N, C, H, W] in [-1, 1] (2-D points are skipped)."""
        if x.dim() != 4:
            return
        from ..viz import make_grid

        grid = make_grid(x.float().cpu(), nrow=nrow)  # uint8 [H', W', C], as samples.png
        self.writer.add_image("samples", grid, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
