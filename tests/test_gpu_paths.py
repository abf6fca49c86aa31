"""The GPU-shaped paths of issue 16, reached on the CPU: channels_last + fused AdamW resume,
optimizer flags, GradScaler state and fp16 overflow accounting, CUDA RNG state, device
resolution under torchrun, explicit --resume on rank 0, the signal rule, uint8 gathering,
TF32, per-example device noise and host syncs. (2-process torchrun checks: test_distributed.)
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY_FLAGS, tiny_config

from ddpmkit import config as C
from ddpmkit import dist
from ddpmkit.cli import main
from ddpmkit.errors import CheckpointError, ConfigError
from ddpmkit.train import randomness
from ddpmkit.train import trainer as T
from ddpmkit.train.checkpoint import list_checkpoints, load_checkpoint
from ddpmkit.train.timesteps import HISTORY, TimestepSampler

REPO = Path(__file__).resolve().parent.parent


def _tensors(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(ckpt / n) for n in
            ("model.safetensors", "ema.safetensors", "trainer.safetensors")}


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    for name in ta:
        assert ta[name].keys() == tb[name].keys(), name
        for k in ta[name]:
            assert torch.equal(ta[name][k], tb[name][k]), (name, k)


def _straight_and_resumed(tmp_path: Path, cfg: C.RunConfig) -> tuple:
    """A straight run of max_steps and one stopped at checkpoint_every and resumed."""
    full = T.train(cfg, tmp_path / "full", resume=None, progress=False)
    part_cfg = cfg.replace(train=C.section_from_dict(
        C.TrainConfig, {"max_steps": cfg.train.checkpoint_every}, cfg.train))
    T.train(part_cfg, tmp_path / "part", resume=None, progress=False)
    resumed = T.train(cfg, tmp_path / "part", resume="auto", progress=False)
    return full, resumed


# ---- 1: channels_last weights + fused AdamW resume ------------------------------------------

def test_channels_last_resume_with_fused_adamw_is_bit_exact(tmp_path, monkeypatch):
    built = []
    real_init = T._Trainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        built.append(self)
    monkeypatch.setattr(T._Trainer, "__init__", init)
    cfg = tiny_config(max_steps=6, checkpoint_every=3, log_every=1, channels_last="on")
    full, resumed = _straight_and_resumed(tmp_path, cfg)
    _assert_same_checkpoint(full.checkpoint, resumed.checkpoint)
    # the path under test was taken: 4-D weights channels_last, fused AdamW
    tr = built[-1]
    convs = [p for p in tr.model.parameters() if p.dim() == 4 and p.shape[1] > 1 and
             p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and
                         not p.is_contiguous() for p in convs)
    assert tr.optimizer.param_groups[0]["fused"] is True
    for p in convs:  # the moments follow their parameter's layout after the resume
        assert tr.optimizer.state[p]["exp_avg"].stride() == p.stride()


def test_channels_last_setting_defaults_by_device():
    assert T.use_channels_last("auto", torch.device("cuda", 0))
    assert not T.use_channels_last("auto", torch.device("cpu"))
    assert T.use_channels_last("on", torch.device("cpu"))
    assert not T.use_channels_last("off", torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="channels_last"):
        C.TrainConfig(channels_last="yes")


# ---- 5: optimizer implementation flags survive load_state_dict --------------------------------

def _one_adamw_step(opt, params):
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


def test_optimizer_flags_are_kept_from_the_new_optimizer():
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    old = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    _one_adamw_step(old, params)
    saved = old.state_dict()

    def resumed(loader):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)
        loader(opt, saved)
        return opt, ps

    # PyTorch's own load takes the file's flags; GradScaler then fails on the fused optimizer
    plain, ps = resumed(lambda o, s: o.load_state_dict(s))
    assert plain.param_groups[0]["fused"] is None
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(AssertionError, match="grad_scale and found_inf"):
        for p in ps:
            p.grad = scaler.scale(torch.ones_like(p))
        scaler.step(plain)
    opt, ps = resumed(T.load_optimizer_state)
    assert opt.param_groups[0]["fused"] is True and not opt.param_groups[0]["foreach"]
    scaler = torch.amp.GradScaler("cpu")
    for p in ps:
        p.grad = scaler.scale(torch.ones_like(p))
    before = [p.detach().clone() for p in ps]
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(a, p) for a, p in zip(before, ps, strict=True))
    assert int(opt.state[ps[0]]["step"]) == 2  # the saved step count carried over


def test_moments_take_their_parameters_layout():
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()
    state["state"][0] = {k: v.contiguous() if v.dim() else v for k, v in
                         state["state"][0].items()}  # as a checkpoint stores them
    opt2 = torch.optim.AdamW([p], lr=1e-3, fused=True)
    T.load_optimizer_state(opt2, state)
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt2.state[p][k].stride() == p.stride()
        assert torch.equal(opt2.state[p][k], opt.state[p][k])


# ---- 6: GradScaler state; overflow-skipped steps are not "bad" ----------------------------

def _cpu_scaler(monkeypatch, init_scale: float) -> None:
    """Make the trainer use an enabled GradScaler on the CPU (fp16's path, minus fp16)."""
    monkeypatch.setattr(T, "make_grad_scaler", lambda device, enabled: torch.amp.GradScaler(
        "cpu", init_scale=init_scale, growth_interval=2))


def _overflow_on_calls(monkeypatch, calls: set[int]) -> None:
    """An fp16 overflow on these training_losses calls: the loss stays finite, its scaled
    gradient turns infinite (what the GradScaler's found_inf catches)."""
    from ddpmkit.diffusion import GaussianDiffusion
    real, count = GaussianDiffusion.training_losses, [0]

    def training_losses(self, *a, **k):
        terms = real(self, *a, **k)
        if count[0] in calls:
            terms["loss"].register_hook(lambda g: g * float("inf"))
        count[0] += 1
        return terms
    monkeypatch.setattr(GaussianDiffusion, "training_losses", training_losses)


def test_grad_scaler_state_is_checkpointed_and_overflows_are_counted_apart(tmp_path,
                                                                           monkeypatch):
    _cpu_scaler(monkeypatch, 2.0**16)
    # steps 2, 3, 4 overflow in the straight run (calls 1-3), the first leg (calls 7, 8) and
    # the resumed leg (call 9): three in a row, more than max_bad_steps = 2
    _overflow_on_calls(monkeypatch, {1, 2, 3, 7, 8, 9})
    cfg = tiny_config(max_steps=6, checkpoint_every=3, log_every=1, max_bad_steps=2)
    full, resumed = _straight_and_resumed(tmp_path, cfg)
    rows = _metric_rows(tmp_path / "full")
    assert [int(r["overflow"]) for r in rows] == [0, 1, 2, 3, 3, 3]
    assert [int(r["skipped"]) for r in rows] == [0, 1, 2, 3, 3, 3]
    assert [r["loss"] == "" for r in rows] == [False, True, True, True, False, False]
    # 2**16 halved three times, then doubled once after two good steps
    state = load_checkpoint(full.checkpoint).trainer_state
    assert state["grad_scaler"]["scale"] == 2.0**14 and state["overflow"] == 3
    assert load_checkpoint(list_checkpoints(tmp_path / "part")[0]).trainer_state[
        "grad_scaler"]["scale"] == 2.0**14  # after steps 2, 3
    # the resumed leg continued the scale (a fresh scaler would end at 2**16)
    assert load_checkpoint(resumed.checkpoint).trainer_state["grad_scaler"] == \
        state["grad_scaler"]
    _assert_same_checkpoint(full.checkpoint, resumed.checkpoint)
    assert [_no_time(r) for r in _metric_rows(tmp_path / "part")] == \
        [_no_time(r) for r in rows]


def _metric_rows(run: Path) -> list[dict]:
    import csv
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _no_time(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("steps_per_s", "elapsed_s")}


def test_non_finite_loss_under_a_scaler_is_still_bad(tmp_path, monkeypatch):
    from ddpmkit.diffusion import GaussianDiffusion
    _cpu_scaler(monkeypatch, 2.0**8)
    real = GaussianDiffusion.training_losses

    def nan_loss(self, *a, **k):
        terms = real(self, *a, **k)
        return dict(terms, loss=terms["loss"] * float("nan"))
    monkeypatch.setattr(GaussianDiffusion, "training_losses", nan_loss)
    cfg = tiny_config(max_steps=10, checkpoint_every=100, log_every=1, max_bad_steps=3)
    with pytest.raises(T.TrainingDiverged, match="3 consecutive non-finite steps ending at "
                       "step 3 .*3 skipped in all"):
        T.train(cfg, tmp_path, resume=None, progress=False)


def test_non_fused_adamw_skips_non_finite_steps_too(tmp_path, monkeypatch):
    """Where PyTorch has no fused AdamW (the one-read-per-step fallback), a NaN step is still
    skipped: weights, moments and step count untouched."""
    _overflow_on_calls(monkeypatch, {1})  # step 2's gradient is infinite (no scaler here)
    monkeypatch.setattr(T, "make_optimizer", lambda model, lr, weight_decay=0.0:
                        torch.optim.AdamW(model.parameters(), lr=lr, foreach=True))
    cfg = tiny_config(max_steps=3, checkpoint_every=1, log_every=1, keep_checkpoints=5)
    T.train(cfg, tmp_path, resume=None, progress=False)
    one, two = (load_checkpoint(tmp_path / "checkpoints" / f"step-000000{i}") for i in (1, 2))
    assert two.trainer_state["skipped"] == 1 and two.trainer_state["overflow"] == 0
    for k in one.model:
        assert torch.equal(one.model[k], two.model[k])
    assert one.trainer_tensors["optim.0.step"] == two.trainer_tensors["optim.0.step"] == 1
    assert [int(r["skipped"]) for r in _metric_rows(tmp_path)] == [0, 1, 1]


# ---- 4: CUDA RNG state -----------------------------------------------------------------------

def test_rng_state_includes_cuda_on_a_cuda_device(monkeypatch):
    fake = torch.arange(16, dtype=torch.uint8)
    got = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": fake.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": got.update(state=state, device=device))
    cuda = torch.device("cuda", 1)
    states = randomness.rng_state(cuda)
    assert set(states) == {"torch", "cuda"} and torch.equal(states["cuda"], fake)
    assert set(randomness.rng_state(torch.device("cpu"))) == {"torch"}
    assert randomness.set_rng_state(cuda, states)
    assert torch.equal(got["state"], fake) and got["device"] == cuda
    assert not randomness.set_rng_state(cuda, {"torch": states["torch"]})  # cuda missing


def test_trainer_saves_and_restores_every_rng_state_of_its_device(tmp_path, monkeypatch):
    fake = torch.arange(8, dtype=torch.uint8)
    restored = []
    real_state, real_set = randomness.rng_state, randomness.set_rng_state
    monkeypatch.setattr(T, "rng_state", lambda device: {**real_state(device), "cuda": fake})

    def set_state(device, states):
        restored.append(dict(states))
        return real_set(device, states)
    monkeypatch.setattr(T, "set_rng_state", set_state)
    cfg = tiny_config(max_steps=2, checkpoint_every=2)
    res = T.train(cfg, tmp_path, resume=None, progress=False)
    saved = load_file(res.checkpoint / "trainer.safetensors")
    assert torch.equal(saved["rng.cuda.rank0"], fake) and "rng.torch.rank0" in saved
    cfg4 = cfg.replace(train=C.section_from_dict(C.TrainConfig, {"max_steps": 4}, cfg.train))
    T.train(cfg4, tmp_path, resume="auto", progress=False)
    assert torch.equal(restored[-1]["cuda"], fake)
    assert torch.equal(restored[-1]["torch"], saved["rng.torch.rank0"])


# ---- 3: device names under torchrun ----------------------------------------------------------

@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)

    def under_torchrun(local_rank: int, local_world: int) -> None:
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return under_torchrun


def test_device_names_single_process(four_gpus):
    assert dist.resolve_device("cuda") == torch.device("cuda", 0)
    assert dist.resolve_device("auto") == torch.device("cuda", 0)
    assert dist.resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match="4 GPU"):
        dist.resolve_device("cuda:4")


def test_device_names_under_torchrun(four_gpus):
    four_gpus(2, 4)
    assert dist.resolve_device("cuda") == torch.device("cuda", 2)  # was index None
    assert dist.resolve_device("auto") == torch.device("cuda", 2)
    with pytest.raises(ConfigError, match="all 4 processes .* one GPU"):
        dist.resolve_device("cuda:0")  # was: every rank on GPU 0
    four_gpus(0, 1)  # one process per machine: cuda:N is honoured
    assert dist.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert dist.resolve_device("cpu") == torch.device("cpu")


# ---- 10: an explicit --resume is resolved by rank 0 -----------------------------------------

def test_explicit_resume_is_resolved_on_rank_0_and_broadcast(tmp_path, monkeypatch):
    cfg = tiny_config(max_steps=2, checkpoint_every=1, keep_checkpoints=5)
    run = T.train(cfg, tmp_path / "run", resume=None, progress=False).run_dir
    trainer = T._Trainer(cfg, tmp_path / "new", time.time())
    sent = []
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: sent.append(obj) or obj)
    newest = list_checkpoints(run)[-1]
    assert Path(trainer.find_checkpoint(str(run))) == newest  # the run folder's newest
    assert sent == [(newest, None)]
    # another rank neither lists nor checks anything: it takes what rank 0 sends
    monkeypatch.setattr(dist, "is_main", lambda: False)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: (newest.parent / "x", None))
    assert trainer.find_checkpoint(str(tmp_path / "missing")) == newest.parent / "x"
    # rank 0's error reaches every rank as the same CheckpointError
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: (None, "no such run"))
    with pytest.raises(CheckpointError, match="no such run"):
        trainer.find_checkpoint(str(run))
    monkeypatch.setattr(dist, "is_main", lambda: True)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: obj)
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.find_checkpoint(str(tmp_path / "missing"))


# ---- 2: the signal rule ----------------------------------------------------------------------

def test_repeated_sigterm_and_forwarded_sigint_do_not_abort():
    with T._Stop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM's copy + torchrun's
        os.kill(os.getpid(), signal.SIGINT)   # within the window: the same request
        assert stop.reason == "signal"
    with T._Stop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # terminal's + torchrun's copy of one Ctrl-C
        assert stop.reason == "signal"
        stop.REPEAT_WINDOW = 0.0
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):  # a person's second Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)


# ---- 7: sample gathers uint8 -----------------------------------------------------------------

def test_sample_gathers_uint8_images(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "1", "--max-minutes", "0",
                 *TINY_FLAGS]) == 0
    passed = []
    real = dist.gather_rows
    monkeypatch.setattr(dist, "gather_rows",
                        lambda x, counts, **k: passed.append(x.dtype) or real(x, counts, **k))
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(run), "--num-samples", "5", "--batch-size", "2",
                 "--sampler", "dpm++2m", "--steps", "3", "--out", str(out),
                 "--no-progress"]) == 0
    assert passed == [torch.uint8]
    arr = np.load(out)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 1)
    # the images are sample()'s, converted once
    from ddpmkit.data import to_uint8
    from ddpmkit.sampling import sample
    loaded = T.load_for_inference(run, device="cpu")
    x = sample(loaded.model, loaded.diffusion, (5, 1, 8, 8), method="dpm++2m", steps=3,
               seeds=range(5), device=torch.device("cpu"))
    assert np.array_equal(arr[:2], to_uint8(x)[:2])  # batch 0 is the same batch of 2
    png = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(run), "--num-samples", "5", "--batch-size", "2",
                 "--steps", "3", "--out", str(png), "--no-progress"]) == 0
    assert png.stat().st_size > 0


# ---- TF32: one setting for train, sample and eval --------------------------------------------

@pytest.fixture
def tf32_flags():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_is_set_one_way_by_train_sample_and_eval(tmp_path, tf32_flags):
    run = tmp_path / "run"
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default for matmuls
    assert main(["train", "--out", str(run), "--max-steps", "1", "--max-minutes", "0",
                 *TINY_FLAGS]) == 0
    assert tf32_flags() == (True, True)
    assert main(["train", "--out", str(tmp_path / "r2"), "--max-steps", "1", "--max-minutes",
                 "0", "--tf32", "false", *TINY_FLAGS]) == 0
    assert tf32_flags() == (False, False)
    sample = ["sample", "--checkpoint", str(run), "--num-samples", "2", "--steps", "2",
              "--out", str(tmp_path / "s.npz"), "--no-progress"]
    assert main(sample) == 0 and tf32_flags() == (True, True)
    assert main([*sample, "--tf32", "false"]) == 0 and tf32_flags() == (False, False)
    ev = ["eval", "--checkpoint", str(run), "--max-examples", "2", "--no-progress", "--json"]
    assert main(ev) == 0 and tf32_flags() == (True, True)
    assert main([*ev, "--tf32", "off"]) == 0 and tf32_flags() == (False, False)


# ---- 8: per-example draws on the device; no host sync between log rows ------------------------

def test_example_draws_depend_only_on_seed_and_index():
    draws = randomness.ExampleDraws(7, torch.device("cpu"))
    u, noise = draws(list(range(100, 108)), (3, 4, 4))
    u_a, n_a = draws(list(range(100, 104)), (3, 4, 4))
    u_b, n_b = randomness.ExampleDraws(7, torch.device("cpu"))([104, 105, 106, 107], (3, 4, 4))
    assert torch.equal(torch.cat([u_a, u_b]), u) and torch.equal(torch.cat([n_a, n_b]), noise)
    u2, noise2 = randomness.ExampleDraws(8, torch.device("cpu"))(list(range(100, 108)),
                                                                 (3, 4, 4))
    assert not torch.equal(noise, noise2) and not torch.equal(u, u2)
    # moments of many draws: N(0, 1) noise, U[0, 1) uniforms (5-sigma bounds from n)
    u, noise = draws(list(range(4000)), (16,))
    n = noise.numel()
    assert abs(float(noise.mean())) < 5 / math.sqrt(n)
    assert abs(float(noise.var()) - 1) < 5 * math.sqrt(2 / n)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    # neighbouring examples are uncorrelated
    r = float(torch.corrcoef(torch.stack([noise[:-1].flatten(), noise[1:].flatten()]))[0, 1])
    assert abs(r) < 5 / math.sqrt(noise[1:].numel())


def test_example_seeds_are_distinct():
    seeds = {randomness.example_seed(s, i) for s in range(4) for i in range(5000)}
    assert len(seeds) == 20000 and all(0 <= x < 2**63 for x in seeds)


def _reference_update(history, counts, t, losses):
    """The loop the vectorised update replaced (newest last, oldest dropped)."""
    for ti, li in zip(t.tolist(), losses.tolist(), strict=True):
        if counts[ti] < HISTORY:
            history[ti, counts[ti]] = li
            counts[ti] += 1
        else:
            history[ti] = torch.roll(history[ti], -1)
            history[ti, -1] = li


def test_loss_aware_update_matches_the_loop_as_a_multiset():
    g = torch.Generator().manual_seed(0)
    T_ = 5
    s = TimestepSampler(T_, "loss_aware")
    ref_h = torch.zeros(T_, HISTORY, dtype=torch.float64)
    ref_c = torch.zeros(T_, dtype=torch.int64)
    for step in range(12):
        t = torch.randint(0, T_, (17,), generator=g)  # many repeats per step
        losses = torch.rand(17, generator=g, dtype=torch.float64)
        ok = torch.tensor(step != 4)
        s.update(t, losses, ok)
        if step != 4:
            _reference_update(ref_h, ref_c, t, losses)
        for i in range(T_):
            k = min(int(ref_c[i]), HISTORY)
            assert sorted(s.history[i, :k].tolist() if int(s.counts[i]) < HISTORY
                          else s.history[i].tolist()) == sorted(ref_h[i, :k].tolist())
    p = s.probabilities()
    w = ref_h.pow(2).mean(1).sqrt()
    want = (w / w.sum()) * (1 - 0.001) + 0.001 / T_
    assert torch.allclose(p, want, rtol=1e-12)
    # inverse-CDF draws follow p (chi-square-free check: each bin within 5 sigma)
    t, wts = s.from_uniform(torch.rand(200_000, generator=g, dtype=torch.float64))
    freq = torch.bincount(t, minlength=T_).double() / len(t)
    assert torch.all((freq - p).abs() < 5 * (p * (1 - p) / len(t)).sqrt())
    assert torch.allclose(wts.double(), 1 / (T_ * p[t]), rtol=1e-6)


_SYNC_METHODS = ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy")


def test_a_training_step_never_reads_a_tensor_on_the_host(tmp_path, monkeypatch):
    # the hybrid loss (mse and vb terms) and the loss-aware sampler: every per-step figure
    cfg = tiny_config(max_steps=100, log_every=50)
    cfg = cfg.replace(diffusion=C.section_from_dict(
        C.DiffusionConfig, {"loss": "hybrid", "variance": "learned_range"}, cfg.diffusion))
    cfg = cfg.replace(train=C.section_from_dict(
        C.TrainConfig, {"timestep_sampler": "loss_aware"}, cfg.train))
    trainer = T._Trainer(cfg, tmp_path, time.time())
    trainer.restore(None, None)
    trainer._wrap_for_training()
    trainer.step()  # warm-up (lazy optimizer state)
    calls = []
    src = str(REPO / "src" / "ddpmkit")
    for name in _SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(src):
                calls.append((_name, caller, sys._getframe(1).f_lineno))
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    real_tensor = torch.tensor

    def tensor_spy(*a, **k):  # on a GPU, torch.tensor(data) is a blocking host-to-device copy
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(src):
            calls.append(("torch.tensor", caller, sys._getframe(1).f_lineno))
        return real_tensor(*a, **k)
    monkeypatch.setattr(torch, "tensor", tensor_spy)
    for _ in range(3):
        trainer.step()
    monkeypatch.undo()
    assert calls == []
    # ... and the figures are all there at the log row (one read)
    row = trainer.window.row()
    assert all(isinstance(row[k], float) and math.isfinite(row[k])
               for k in ("loss", "mse", "vb", "grad_norm"))


# ---- benchmarks/gpu_check.sh -----------------------------------------------------------------

GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_parses_and_explains_itself():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    proc = subprocess.run(["bash", str(GPU_CHECK), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "speed fp32" in proc.stdout
    bad = subprocess.run(["bash", str(GPU_CHECK), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """The script's CPU smoke mode: tiny net, train 2 + resume 2 steps in bf16 and fp16 (fp32
    on the CPU), 16 samples; speed.py's flags parsed (~30 s of CPU, five processes)."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", "--out", str(tmp_path / "gc")],
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    table = out[out.index("| check"):]
    for check, status in (("speed fp32", "dry"), ("speed tf32", "dry"), ("speed bf16", "dry"),
                          ("train+resume bf16", "ok"), ("train+resume fp16", "ok"),
                          ("torchrun 2x NCCL", "skip"), ("sample dpm++2m", "ok")):
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {check} "))
        assert f"| {status} " in line, line
    assert "step 4, loss 0." in table and "uint8 16x8x8x3" in table
    assert (tmp_path / "gc" / "summary.md").read_text().strip() == table.strip()


# ---- 9: the SLURM recipe in docs/scaling.md ---------------------------------------------------

def test_slurm_recipe_runs_on_any_allowed_torch_and_parses():
    import re
    import shlex

    from ddpmkit.cli import build_parser
    text = (REPO / "docs" / "scaling.md").read_text()
    script = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "#SBATCH" in b)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in script
    # no torchrun flag that older torch (>= 2.3 is allowed) rejects
    assert "--shutdown-timeout" not in script and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in script
    command = " ".join(script.split("srun ", 1)[1].replace("\\\n", " ").split())
    ddpmkit_args = shlex.split(command.split("-m ddpmkit ", 1)[1])
    args, extra = build_parser().parse_known_args(ddpmkit_args)
    assert args.command == "train" and extra == []
