import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpmkit import config as C
from ddpmkit.cli import main
from ddpmkit.nn import build_model
from ddpmkit.train.checkpoint import list_checkpoints, load_checkpoint
from ddpmkit.train.trainer import build_diffusion, train

TINY_FLAGS = ["--model-channels", "16", "--channel-mult", "1,2", "--num-res-blocks", "1",
              "--attention-resolutions", "4", "--groups", "8", "--timesteps", "40",
              "--batch-size", "16", "--warmup-steps", "2", "--log-every", "2",
              "--sample-num", "4", "--sample-steps", "4", "--no-progress"]


def tiny_config(**train_overrides) -> C.RunConfig:
    base = C.RUN_PRESETS["digits"]
    return C.RunConfig.from_dict({
        "model": {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attention_resolutions": [4], "groups": 8, "dropout": 0.1},
        "diffusion": {"timesteps": 40},
        "train": {"batch_size": 16, "warmup_steps": 2, "log_every": 2, "max_minutes": 0,
                  **train_overrides},
        "sample": {"num": 4, "steps": 4},
    }, base=base)


# ---- units: EMA, learning rate, timestep sampling ----------------------------------------

def test_ema_update_follows_its_formula():
    # shadow <- decay * shadow + (1 - decay) * current: from 0 towards 1 with decay 0.9,
    # 0.1 after one step and 1 - 0.9^k after k.
    from ddpmkit.train.ema import EMA

    net = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(net.weight)
    torch.nn.init.zeros_(net.bias)
    ema = EMA(net)
    torch.nn.init.ones_(net.weight)
    torch.nn.init.ones_(net.bias)
    for k in (1, 2, 3):
        ema.update(net, 0.9)
        for v in ema.state_dict().values():
            assert torch.allclose(v, torch.full_like(v, 1 - 0.9 ** k), rtol=0, atol=1e-6), (k, v)
    # the same update decided on the device: applied where the flag is true, skipped where not
    ema.update(net, 0.9, where=torch.tensor(False))
    for v in ema.state_dict().values():
        assert torch.allclose(v, torch.full_like(v, 1 - 0.9 ** 3), rtol=0, atol=1e-6)
    ema.update(net, 0.9, where=torch.tensor(True))
    for v in ema.state_dict().values():
        assert torch.allclose(v, torch.full_like(v, 1 - 0.9 ** 4), rtol=0, atol=1e-6)
    ema.update(net, 0.0)  # decay 0: the current weights exactly
    assert all(torch.equal(v, torch.ones_like(v)) for v in ema.state_dict().values())
    other = torch.nn.Linear(3, 2)
    ema.copy_to(other)
    assert torch.equal(other.weight, torch.ones(2, 3)) and torch.equal(other.bias, torch.ones(2))


def test_ema_decay_is_half_life_in_images_with_rampup():
    from ddpmkit.train.ema import ema_decay

    # 100 images per step, half-life 1000 images: 10 steps halve the weight of the past.
    assert ema_decay(100, 10**6, 1000.0, 0.0) ** 10 == pytest.approx(0.5, rel=1e-12)
    # ramp-up: after 2000 images the half-life is at most 0.05 * 2000 = 100 images
    assert ema_decay(100, 2000, 1000.0, 0.05) == pytest.approx(0.5, rel=1e-12)
    assert ema_decay(100, 10**6, 1000.0, 0.05) == pytest.approx(0.5 ** 0.1, rel=1e-12)
    assert ema_decay(100, 0, 1000.0, 0.05) == 0.0  # nothing seen: no history to keep


def test_cosine_learning_rate_after_warmup():
    from ddpmkit.train.trainer import _lr_at

    cfg = tiny_config(max_steps=10, warmup_steps=2, lr_decay="cosine", lr=1e-3)
    got = [_lr_at(cfg, s) for s in (0, 1, 2, 6, 10)]
    # warm-up (s + 1) / 2, then 0.5 (1 + cos(pi (s - 2) / 8)): 1 at s = 2, 1/2 at 6, 0 at 10
    assert got == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4, 0.0], rel=1e-12, abs=1e-18)


def test_loss_aware_timesteps_follow_the_losses_and_keep_the_loss_unbiased():
    # Improved DDPM eq. 18: p_t ~ sqrt(E[L_t^2]) over the history (mixed with a little uniform),
    # and weights 1 / (T p_t), so E_t~p[w_t L_t] is the uniform average of L_t. Statistical
    # checks at 5 standard errors of n draws.
    from ddpmkit.train.timesteps import HISTORY, UNIFORM_MIX, TimestepSampler

    T, n = 8, 200_000
    sampler = TimestepSampler(T, "loss_aware")
    losses = torch.arange(1, T + 1, dtype=torch.float64)
    for _ in range(HISTORY):  # a constant history: sqrt(E[L^2]) = L
        sampler.update(torch.arange(T), losses)
    p = sampler.probabilities()
    want = losses / losses.sum() * (1 - UNIFORM_MIX) + UNIFORM_MIX / T
    assert torch.allclose(p, want, rtol=1e-12, atol=0)
    t, w = sampler.sample(n, torch.Generator().manual_seed(0))
    freq = torch.bincount(t, minlength=T).double() / n
    assert torch.all((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt()), (freq, p)
    weighted = w.double() * losses[t]
    se = float(weighted.std()) / math.sqrt(n)
    assert abs(float(weighted.mean()) - float(losses.mean())) < 5 * se
    assert torch.allclose(w.double(), 1 / (T * p[t]), rtol=1e-6, atol=0)


# ---- the trainer ------------------------------------------------------------------------------

def test_checkpoints_hold_the_ema_the_trainer_held(tmp_path, monkeypatch):
    # Through the real trainer: record every weight snapshot and decay the EMA is fed, redo
    # the average from its formula, and compare with ema.safetensors (which must differ from
    # the raw weights in model.safetensors, or the comparison could not tell them apart).
    import ddpmkit.train.trainer as trainer_mod
    from ddpmkit.train.ema import EMA

    held = []

    class RecordingEMA(EMA):
        def __init__(self, model):
            super().__init__(model)
            self.expected = {k: v.clone().double() for k, v in self.shadow.items()}
            self.decays = []
            held.append(self)

        def update(self, model, decay, where=None):
            if where is None or bool(where):  # a skipped (non-finite) step leaves it alone
                for k, v in model.state_dict().items():
                    if k in self.expected:
                        self.expected[k] = decay * self.expected[k] + (1 - decay) * v.double()
                self.decays.append(decay)
            super().update(model, decay, where=where)

    monkeypatch.setattr(trainer_mod, "EMA", RecordingEMA)
    # half-life 100 images at 16 per step: decay 0.5 ** 0.16 = 0.895, so after 4 steps the
    # average still holds ~64% of the initial weights: far from the raw ones.
    cfg = tiny_config(max_steps=4, checkpoint_every=4, sample_every=0, ema_half_life=100.0,
                      ema_rampup=0.0, lr=1e-2)
    result = train(cfg, tmp_path, resume=None, progress=False)
    (ema,) = held
    assert ema.decays == pytest.approx([0.5 ** (16 / 100)] * 4, rel=1e-12)
    saved = load_file(result.checkpoint / "ema.safetensors")
    raw = load_file(result.checkpoint / "model.safetensors")
    assert saved.keys() == ema.expected.keys()
    far = 0
    for k, want in ema.expected.items():
        assert torch.allclose(saved[k].double(), want, rtol=0, atol=1e-6), k
        far = max(far, float((raw[k].double() - want).abs().max()))
    assert far > 1e-3  # the raw weights moved away from their average
    # and what sample/eval load by default is that average
    import ddpmkit

    run = ddpmkit.load(result.checkpoint, device="cpu")
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("n", [16, 18])
def test_every_epoch_is_a_fresh_permutation_of_the_data(tmp_path, monkeypatch, n):
    # Observed through the trainer: n images, each a constant grey level k * 13 (so flips or
    # crops cannot hide which one it is), batch 4, 3 epochs' worth of examples. Every epoch
    # must show each image exactly once, and no two epochs the same order.
    # n = 16: batches end where epochs end. n = 18: a batch crosses each epoch's end; the
    # trainer's order is one endless stream of epoch permutations (the batch takes the rest
    # of one epoch and the start of the next), so each run of n examples is an epoch. A loader
    # that drops an epoch's last partial batch instead would change that case (and it with it).
    from ddpmkit.diffusion import GaussianDiffusion

    batch = 4
    data = tmp_path / "levels.npy"
    np.save(data, np.repeat(np.arange(n, dtype=np.uint8)[:, None, None] * 13, 64, axis=1)
            .reshape(n, 8, 8))
    seen = []
    real = GaussianDiffusion.training_losses

    def recording(self, model, x0, *args, **kwargs):
        seen.extend(torch.round((x0.mean(dim=(1, 2, 3)) + 1) * 127.5 / 13).long().tolist())
        return real(self, model, x0, *args, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", recording)
    steps = -(-3 * n // batch)
    cfg = tiny_config(max_steps=steps, checkpoint_every=1000, sample_every=0,
                      batch_size=batch)
    cfg = cfg.replace(data=C.section_from_dict(C.DataConfig, {"name": str(data)}, cfg.data))
    train(cfg, tmp_path / "run", resume=None, progress=False)
    assert len(seen) == steps * batch >= 3 * n
    epochs = [seen[i:i + n] for i in range(0, 3 * n, n)]
    for e in epochs:
        assert sorted(e) == list(range(n)), e
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert epochs[0] != list(range(n))  # shuffled, not in file order


def test_overfit_one_batch_drives_simple_loss_near_zero():
    torch.manual_seed(0)
    cfg = tiny_config()
    model_cfg = dataclasses.replace(cfg.model, dropout=0.0)
    model = build_model(model_cfg)
    diffusion = build_diffusion(cfg)
    from ddpmkit.data import load_data
    x0 = load_data(cfg.data).x[:4]
    t = torch.tensor([3, 10, 20, 30])
    noise = torch.randn_like(x0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = diffusion.training_losses(model, x0, t, noise)["loss"].mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02 * first, (first, loss.item())


def _tensors(path):
    return {name: load_file(path / name) for name in
            ("model.safetensors", "ema.safetensors", "trainer.safetensors")}


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = tiny_config(max_steps=6, checkpoint_every=3, sample_every=0, log_every=1)
    full = train(cfg, tmp_path / "full", resume=None, progress=False)
    assert full.step == 6
    # Stop at step 3 ...
    part_cfg = cfg.replace(train=C.section_from_dict(C.TrainConfig, {"max_steps": 3}, cfg.train))
    train(part_cfg, tmp_path / "part", resume=None, progress=False)
    # ... and resume to 6 from the checkpoint the first leg left.
    resumed = train(cfg, tmp_path / "part", resume="auto", progress=False)
    assert resumed.step == 6
    a = _tensors(full.checkpoint)
    b = _tensors(resumed.checkpoint)
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    # the metrics of the resumed run are the uninterrupted run's, row for row (but timings)
    def rows(path):
        with open(path / "metrics.csv") as f:
            return [{k: v for k, v in r.items() if k not in ("steps_per_s", "elapsed_s")}
                    for r in csv.DictReader(f)]
    assert rows(tmp_path / "full") == rows(tmp_path / "part")
    assert len(rows(tmp_path / "full")) == 6
    # the learning rate each step trained with: linear warm-up over 2 steps from lr / 2
    # (the first step trains too), then constant
    lr = cfg.train.lr
    assert [float(r["lr"]) for r in rows(tmp_path / "full")] == pytest.approx(
        [lr / 2, lr, lr, lr, lr, lr], rel=1e-12)




def test_checkpoints_are_pruned_and_complete(tmp_path):
    cfg = tiny_config(max_steps=8, checkpoint_every=2, keep_checkpoints=2, sample_every=0)
    train(cfg, tmp_path, resume=None, progress=False)
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-0000006", "step-0000008"]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 8 and ckpt.config.model.channels == 16
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="flock is POSIX")
def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path):
    # Another trainer (here: this process holding the lock through a separate open file, as a
    # second process would) makes train() stop before touching the folder; once the holder
    # is gone the same call trains, and its own lock is released when it returns.
    import fcntl

    from ddpmkit.errors import ConfigError

    cfg = tiny_config(max_steps=2, checkpoint_every=2, sample_every=0)
    holder = open(tmp_path / ".lock", "a+")
    holder.write("pid 12345 on elsewhere\n")
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(ConfigError, match=r"in use by another training run \(pid 12345"):
        train(cfg, tmp_path, resume=None, progress=False)
    assert not (tmp_path / "checkpoints").exists()
    holder.close()
    train(cfg, tmp_path, resume=None, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]
    with open(tmp_path / ".lock") as again:  # released: a new holder gets it at once
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_cli_train_sample_eval_roundtrip(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "4", "--max-minutes", "0",
                 *TINY_FLAGS]) == 0
    assert (run / "samples.png").exists() and (run / "config.json").exists()
    assert main(["sample", "--checkpoint", str(run), "--num", "5", "--steps", "4",
                 "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (5, 8, 8, 1) and arr.dtype == np.uint8
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--max-examples", "3", "--json",
                 "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 3 and res["timesteps"] == 40
    assert np.isfinite(res["bits_per_dim"]) and res["bits_per_dim"] > 0
    parts = res["prior"] + res["diffusion"] + res["decoder"]
    assert parts == pytest.approx(res["bits_per_dim"], rel=1e-9)


def test_eval_refuses_other_levels(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--out", str(run), "--max-steps", "1", "--max-minutes", "0", *TINY_FLAGS])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--levels", "256", "--max-examples", "1",
                 "--no-progress"]) == 2
    assert "17 levels" in capsys.readouterr().err


def test_points_run_writes_scatter(tmp_path):
    run = tmp_path / "moons"
    assert main(["train", "--data", "moons", "--out", str(run), "--max-steps", "3",
                 "--max-minutes", "0", "--timesteps", "40", "--sample-steps", "5",
                 "--sample-num", "50", "--no-progress"]) == 0
    assert (run / "samples.png").exists()
    assert json.loads((run / "config.json").read_text())["model"]["arch"] == "mlp"
