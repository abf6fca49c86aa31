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
                                    "quality_vs_steps.py", "guidance.py", "data.py",
                                    "busy_machine.py", "time_to_quality.py"])
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
                          "--npy-images", "300", "--jpeg-images", "12", "--workers", "0,1",
                          "--cifar-steps", "1", "--cifar-threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()

    def rate(line: str) -> float:
        return float(line.split(":")[1].split()[0].replace(",", ""))

    pipeline = [ln for ln in lines if " workers " in ln and "images/s" in ln]
    assert len(pipeline) == 6 and all(rate(r) > 0 for r in pipeline), out.stdout  # 3 x 2
    others = [ln for ln in lines if ln.startswith(("PIL raw", "CIFAR-10 net"))]
    assert len(others) == 2 and all(rate(r) > 0 for r in others), out.stdout
    assert any(ln.startswith("an 8-accelerator node needs 2,688 images/s") for ln in lines)


def test_every_time_to_quality_recipe_is_a_valid_one_change_config():
    sys.path.insert(0, str(BENCH))
    try:
        import time_to_quality as ttq
    finally:
        sys.path.remove(str(BENCH))
    from ddpmkit import config as C
    base = C.RUN_PRESETS["digits"]
    for name, change in ttq.RECIPES.items():
        cfg = ttq.recipe_config(name)  # validated by the dataclasses
        assert (cfg.train.threads, cfg.train.max_steps, cfg.train.max_minutes) == (1, 0, 0.0)
        for section, values in change.items():
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert got == (tuple(value) if isinstance(value, list) else value), (name, key)
                assert got != getattr(getattr(base, section), key), (name, key)


@pytest.mark.slow  # ~1-2 min: two recipes train a few seconds each, then are measured
def test_time_to_quality_runs_briefly(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "time_to_quality.py"), "--recipes",
                          "baseline", "stratified", "--minutes", "0.04", "--every", "0.02",
                          "--num", "20", "--bound-t", "5", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["baseline"] * 2 + ["stratified"] * 2
    for r in rows:
        assert r["step"] > 0 and 0 <= r["recognisable"] <= 1 and r["fd"] > 0
        assert 0 < r["bound"] < 20
    assert rows[1]["minutes"] >= 0.04 and rows[1]["step"] > rows[0]["step"]
    assert (tmp_path / "quality.png").stat().st_size > 0
