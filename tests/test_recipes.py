"""Training recipes of issue 14: min-SNR-gamma weighting, stratified t, the thread count from
the load, the step-budget presets and TensorBoard logging."""

import csv
import math
from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from ddpmkit import config as C
from ddpmkit.errors import ConfigError
from ddpmkit.losses import min_snr_weight
from ddpmkit.runtime import threads_for_load
from ddpmkit.train.timesteps import TimestepSampler, stratify
from ddpmkit.train.trainer import _Trainer, build_diffusion, train

# ---- min-SNR-gamma ---------------------------------------------------------------------------


def test_min_snr_weight_is_the_papers_formula():
    snr = torch.tensor([0.01, 0.5, 4.999, 5.0, 7.0, 1e4], dtype=torch.float64)
    g = 5.0
    expect_eps = [min(s, g) / s for s in snr.tolist()]
    expect_v = [min(s, g) / (s + 1) for s in snr.tolist()]
    expect_x0 = [min(s, g) for s in snr.tolist()]
    assert min_snr_weight(snr, g, "eps").tolist() == pytest.approx(expect_eps, rel=1e-12)
    assert min_snr_weight(snr, g, "v").tolist() == pytest.approx(expect_v, rel=1e-12)
    assert min_snr_weight(snr, g, "x0").tolist() == pytest.approx(expect_x0, rel=1e-12)
    # below gamma the eps weight is exactly 1: only the clean (high-SNR) end is weighted down
    assert min_snr_weight(snr, g, "eps")[:4].tolist() == pytest.approx([1, 1, 1, 1])


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_loss_is_the_plain_loss_times_the_weight(prediction):
    base = C.RunConfig.from_dict({"diffusion": {"schedule": "cosine", "timesteps": 100,
                                                "prediction": prediction}})
    weighted = C.RunConfig.from_dict({"diffusion": {"schedule": "cosine", "timesteps": 100,
                                                    "prediction": prediction,
                                                    "min_snr_gamma": 5.0}})
    plain, snr5 = build_diffusion(base), build_diffusion(weighted)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(8, 1, 4, 4, generator=g)
    t = torch.tensor([0, 3, 10, 30, 50, 70, 90, 99])

    def model(x, t):  # a fixed, input-dependent "network"
        return 0.3 * x + 0.01 * t.float()[:, None, None, None]

    a = plain.training_losses(model, x0, t, noise)["loss"]
    b = snr5.training_losses(model, x0, t, noise)["loss"]
    ab = plain.alpha_bar[t]
    snr = ab / (1 - ab)
    w = {"eps": snr.clamp(max=5) / snr, "v": snr.clamp(max=5) / (snr + 1),
         "x0": snr.clamp(max=5)}[prediction]
    assert b.double().tolist() == pytest.approx((a.double() * w).tolist(), rel=1e-5)
    assert not torch.allclose(a, b)  # the high-SNR (small t) end is weighted down


def test_min_snr_gamma_is_validated():
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        C.DiffusionConfig(min_snr_gamma=-1.0)


# ---- stratified t ----------------------------------------------------------------------------


def test_stratified_uniforms_cover_each_stratum_once_per_batch():
    B = 128
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        u = torch.rand(B, generator=g).clamp_(max=1 - 2**-24)  # the trainer's largest value
        s = stratify(u, torch.randperm(B, generator=g), B)
        assert sorted((s * B).floor().long().tolist()) == list(range(B))
    # the trainer's extreme uniform stays in the last stratum (float32 would round it to 1)
    top = stratify(torch.tensor([1 - 2**-24]), torch.tensor([B - 1]), B)
    assert float(top) < 1.0


def test_stratified_timesteps_are_evenly_spread_and_uniform_in_law():
    T, B = 1000, 100
    sampler = TimestepSampler(T)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(T)
    for _ in range(200):
        t, w = sampler.from_uniform(stratify(torch.rand(B, generator=g), torch.arange(B), B))
        # one example in each block of T / B = 10 consecutive steps
        assert sorted((t // (T // B)).tolist()) == list(range(B))
        assert torch.all(w == 1)
        counts += torch.bincount(t, minlength=T)
    # marginal: 20,000 draws over 1000 steps, each count ~ Binomial(20000, 1/1000) or tighter
    n, p = 200 * B, 1.0 / T
    block = counts.reshape(10, 100).sum(1)  # 10 blocks of 100 steps: exactly 2,000 each
    assert block.tolist() == [n / 10] * 10
    assert abs(counts.mean().item() - n * p) < 1e-9
    assert counts.std().item() < 1.2 * math.sqrt(n * p * (1 - p))


# ---- threads ---------------------------------------------------------------------------------


def test_threads_follow_the_load(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert threads_for_load(2, 0.0) == 2      # quiet: PyTorch's default
    assert threads_for_load(2, 0.4) == 2
    assert threads_for_load(2, 1.0) == 1      # one core taken
    assert threads_for_load(2, 3.7) == 1      # never fewer than one
    assert threads_for_load(1, 0.0) == 1      # never more than the caller had
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert threads_for_load(16, 5.6) == 10


def test_busy_cores_from_proc_stat_and_the_fallback(monkeypatch):
    from ddpmkit import runtime
    readings = iter([(1000, 600, 2), (1100, 650, 2)])  # 100 jiffies, 50 idle, on 2 CPUs
    monkeypatch.setattr(runtime, "_cpu_times", lambda: next(readings))
    assert runtime.busy_cores(0.0) == (1.0, "measured over 0 s")

    def unreadable():
        raise OSError("no /proc")
    monkeypatch.setattr(runtime, "_cpu_times", unreadable)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.7, 1.0, 0.5))
    assert runtime.busy_cores(0.0) == (1.7, "1-minute load average")


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux /proc only")
def test_busy_cores_sees_a_busy_process_now():
    """A competitor that started a moment ago counts (the 1-minute load average would still
    be near 0); at least most of one core, whatever else runs."""
    import subprocess
    import sys
    import time

    from ddpmkit.runtime import busy_cores
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy, how = busy_cores(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert how == "measured over 0.5 s" and busy >= 0.7, busy


def test_threads_setting_is_validated():
    with pytest.raises(ConfigError, match="threads"):
        C.TrainConfig(threads=-1)


# ---- presets ---------------------------------------------------------------------------------


def test_digits_presets_stop_by_steps_not_by_the_clock():
    digits = C.RUN_PRESETS["digits"].train
    assert (digits.max_steps, digits.max_minutes) == (2200, 0.0)
    nll = C.RUN_PRESETS["digits-nll"]
    assert nll.train.max_minutes == 0.0 and nll.train.max_steps > 0
    assert (nll.diffusion.variance, nll.diffusion.loss) == ("learned_range", "hybrid")


def test_digits_presets_use_the_measured_schedule_prediction_and_sampler():
    """What the README's figures were measured with (issue 14's third sweep): sigmoid
    schedule and v-prediction for both presets, ancestral sampling with 100 steps."""
    for name in ("digits", "digits-nll"):
        p = C.RUN_PRESETS[name]
        assert (p.diffusion.schedule, p.diffusion.prediction) == ("sigmoid", "v"), name
        assert (p.sample.sampler, p.sample.steps) == ("ancestral", 100), name


# ---- a short run with every recipe on, logged to TensorBoard -----------------------------------


def _read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_log_equals_metrics_csv(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(max_steps=4, log_every=2, sample_every=2, checkpoint_every=4,
                      log="tensorboard", stratified_t=True)
    cfg = cfg.replace(diffusion=C.section_from_dict(C.DiffusionConfig, {"min_snr_gamma": 5.0},
                                                    cfg.diffusion))
    train(cfg, tmp_path, resume=None, progress=False)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    acc = _read_events(tmp_path / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    for column in ("loss", "mse", "lr", "grad_norm", "loss_q0", "loss_q3", "steps_per_s"):
        assert f"train/{column}" in tags, column
        events = acc.Scalars(f"train/{column}")
        assert [e.step for e in events] == [2, 4]
        expected = [float(r[column]) for r in rows if r[column] != ""]
        # float32 in the event file
        assert [e.value for e in events] == pytest.approx(expected, rel=1e-6), column
    assert "train/fid" not in tags  # empty cells are not logged as values
    images = acc.Images("samples")
    assert [e.step for e in images] == [2, 4, 4]  # --sample-every 2, then the last grid
    assert images[0].width > 8 and images[0].height > 8  # a grid, not one digit


def test_auto_threads_resume_with_the_runs_own_count(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cfg = tiny_config(max_steps=2, checkpoint_every=2, threads=2)
    train(cfg, tmp_path, resume=None, progress=False)
    assert torch.get_num_threads() == 1  # train() gives the caller's setting back
    seen = []
    monkeypatch.setattr(_Trainer, "step", _recording(seen, _Trainer.step))
    resumed = tiny_config(max_steps=3, checkpoint_every=2, threads=0)
    train(resumed, tmp_path, resume="auto", progress=False)
    assert "resuming with the run's 2 thread(s)" in capsys.readouterr().out
    assert seen == [2]  # the resumed step ran with the run's 2 threads, not auto's 1
    assert torch.get_num_threads() == 1


def _recording(seen, step):
    def wrapped(self):
        seen.append(torch.get_num_threads())
        return step(self)
    return wrapped


def test_tensorboard_missing_is_a_one_line_error(tmp_path, monkeypatch):
    import sys

    from ddpmkit.train.tb import TensorBoardLog
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match=r"ddpmkit\[tensorboard\]"):
        TensorBoardLog(tmp_path)
