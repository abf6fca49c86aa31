"""What the training loop tracks between two log rows, kept on the device.

Reading a GPU value on the host (``float(loss)``, ``.tolist()``, ``if bool(ok)``) makes the
host wait until the GPU has finished all queued work, so the next step cannot be queued in the
meantime. The loop therefore adds each step's figures into device tensors here, and reads them
once per log row (:meth:`LogWindow.row`, :meth:`StepHealth.read`) and at checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

TERMS = ("loss", "mse", "vb", "grad_norm")


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A float64 scalar made on the device by a fill kernel (no host-to-device copy)."""
    return torch.full((), value, dtype=torch.float64, device=device)


class LogWindow:
    """The metric row in progress: sums of per-step values and of per-example losses by
    timestep quartile, over the finished (not skipped) steps since the last row. Saved in
    checkpoints, so that a resume between two log steps writes the rows of a straight run."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(len(TERMS), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(TERMS), dtype=torch.float64, device=device)
        self.quartile_sum = torch.zeros(4, dtype=torch.float64, device=device)
        self.quartile_n = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, ok: torch.Tensor, values: dict[str, torch.Tensor], t: torch.Tensor,
            per_example: torch.Tensor, num_timesteps: int) -> None:
        """One step's values (device scalars; absent terms stay empty), if ``ok``."""
        device = self.sums.device
        ok = ok.to(device)
        # absent terms are NaN, and not counted (a fill kernel: torch.tensor would copy from
        # the host, which waits for the GPU)
        vals = torch.stack([values[k].to(device, torch.float64) if k in values else
                            _scalar(math.nan, device) for k in TERMS])
        use = ok & ~vals.isnan()
        self.sums += torch.where(use, vals, 0.0)
        self.counts += use.double()
        q = (t.to(device) * 4 // num_timesteps).clamp(max=3)
        self.quartile_sum.index_add_(0, q, torch.where(ok, per_example.to(device).double(), 0.0))
        self.quartile_n.index_add_(0, q, ok.double().expand(q.shape))

    def state(self) -> dict:
        return {"sums": self.sums.tolist(), "counts": self.counts.tolist(),
                "quartile_sum": self.quartile_sum.tolist(),
                "quartile_n": self.quartile_n.tolist()}

    def load(self, saved: dict | None) -> None:
        # Metrics are not worth failing a resume over: bad ones are reset.
        with contextlib.suppress(KeyError, TypeError, ValueError, RuntimeError, AttributeError):
            if "window" in saved:  # older checkpoints: lists of per-step values
                lists = [[float(v) for v in saved["window"][k]] for k in TERMS]
                sums, counts = [sum(v) for v in lists], [len(v) for v in lists]
            else:
                sums, counts = saved["sums"], saved["counts"]
            new = [torch.tensor(v, dtype=torch.float64, device=self.sums.device).reshape(n)
                   for v, n in ((sums, len(TERMS)), (counts, len(TERMS)),
                                (saved["quartile_sum"], 4), (saved["quartile_n"], 4))]
            self.sums, self.counts, self.quartile_sum, self.quartile_n = new

    def row(self) -> dict:
        """The means since the last row (then cleared); one host read."""
        host = torch.cat([self.sums, self.counts, self.quartile_sum, self.quartile_n]).cpu()
        sums, counts, q_sum, q_n = host.split([len(TERMS), len(TERMS), 4, 4])
        row = {k: float(s / n) if n > 0 else "" for k, s, n in zip(TERMS, sums, counts,
                                                                      strict=True)}
        for i in range(4):
            row[f"loss_q{i}"] = float(q_sum[i] / q_n[i]) if q_n[i] > 0 else ""
        for t in (self.sums, self.counts, self.quartile_sum, self.quartile_n):
            t.zero_()
        return row


@dataclass
class Trip:
    """The step at which the run had ``max_bad_steps`` bad steps in a row, as read back."""

    step: int
    skipped: int
    values: dict[str, float]  # loss, grad_norm and the loss terms of that step


class StepHealth:
    """Skipped-step accounting on the device.

    A step is skipped when its loss or its gradient is not finite. Under fp16's GradScaler a
    finite loss with a non-finite gradient is an overflow: the scaler lowers its scale and
    skips the step, which is routine; such steps count as ``overflow`` (and in ``skipped``),
    never toward ``max_bad_steps``. Every other skipped step is bad: ``max_bad_steps`` of them
    in a row mark the run as diverged (:attr:`Trip`, read at the next log row or checkpoint).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        # bad steps in a row, skipped in all, overflow-skipped in all
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)
        self.names: list[str] = []
        self.trip = torch.full((2 + len(TERMS),), math.nan, dtype=torch.float64, device=device)

    def load(self, skipped: int, overflow: int) -> None:
        self.counts = torch.tensor([0, skipped, overflow], dtype=torch.int64,
                                   device=self.counts.device)

    def update(self, step: int, ok: torch.Tensor, finite_loss: torch.Tensor, scaled: bool,
               max_bad: int, values: dict[str, torch.Tensor]) -> None:
        """Count step ``step`` (1-based); ``values`` as for :meth:`LogWindow.add`."""
        device = self.counts.device
        ok, finite_loss = ok.to(device), finite_loss.to(device)
        overflow = ~ok & finite_loss if scaled else torch.zeros_like(ok)
        bad = ~ok & ~overflow
        run = torch.where(bad, self.counts[0] + 1, torch.where(ok, 0, self.counts[0]))
        self.counts = torch.stack([run, self.counts[1] + (~ok).long(),
                                   self.counts[2] + overflow.long()])
        self.names = [k for k in TERMS if k in values]
        tripped = (run >= max_bad) & self.trip[0].isnan()
        record = torch.stack([_scalar(float(step), device), self.counts[1].double(),
                              *[values[k].to(device, torch.float64) if k in values else
                                _scalar(math.nan, device) for k in TERMS]])
        self.trip = torch.where(tripped, record, self.trip)

    def read(self) -> tuple[int, int, Trip | None]:
        """(skipped, overflow, the trip or None): one host read."""
        host = torch.cat([self.counts.double(), self.trip]).cpu().tolist()
        skipped, overflow, trip = int(host[1]), int(host[2]), host[3:]
        if math.isnan(trip[0]):
            return skipped, overflow, None
        values = dict(zip(TERMS, trip[2:], strict=True))
        return skipped, overflow, Trip(int(trip[0]), int(trip[1]),
                                       {k: values[k] for k in self.names})
