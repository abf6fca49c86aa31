"""The benchmark scripts keep working: their --help, and a tiny grad-checkpointing run.

The benchmarks themselves are not tests (they time things); these only catch a script that no
longer starts after a change to the library it drives.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", ["speed.py", "ablate.py", "grad_checkpointing.py",
                                    "quality_vs_steps.py", "guidance.py", "data.py"])
def test_benchmark_help(script):
    out = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_grad_checkpointing_benchmark_runs_on_a_tiny_net():
    out = subprocess.run([sys.executable, str(BENCH / "grad_checkpointing.py"), "--preset",
                          "tiny", "--batch", "2", "--steps", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert [r["grad_checkpointing"] for r in rows] == [False, True]
    assert all(r["step_s"] > 0 for r in rows)


@pytest.mark.slow  # a few seconds alone; its workers crawl on a busy machine
def test_data_benchmark_runs_briefly():
    out = subprocess.run([sys.executable, str(BENCH / "data.py"), "--seconds", "0.2",
                          "--npy-images", "300", "--jpeg-images", "12", "--workers", "0,1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln for ln in out.stdout.splitlines() if "images/s" in ln]
    assert len(rows) == 5 and all(float(r.split(":")[1].split()[0].replace(",", "")) > 0
                                  for r in rows), out.stdout
