"""examples/walkthrough.py keeps running, keeps drawing, and its checks can fail.

The walkthrough is documentation that executes (docs/walkthrough.md): a change to the library
that breaks one of its claims, or its use of the public API, must turn these tests red.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import ddpmkit

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "walkthrough.py"
FIGURES = ("01_schedule.png", "02_forward.png", "03_posterior.png", "04_bound.png",
           "05_eps_loss.png", "06_sampling.png")


@pytest.fixture(scope="module")
def walkthrough():
    spec = importlib.util.spec_from_file_location("walkthrough", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["walkthrough"] = module  # dataclasses look their module up while defining
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("walkthrough", None)


def _assert_figures(folder: Path) -> None:
    for name in FIGURES:
        with Image.open(folder / name) as img:
            img.verify()  # a complete PNG, not a truncated file
        with Image.open(folder / name) as img:
            assert min(img.size) > 100, (name, img.size)


def test_quick_walkthrough_passes_every_check_and_draws_every_figure(walkthrough, tmp_path,
                                                                      capsys, monkeypatch):
    monkeypatch.setenv("DDPMKIT_TUNE_MALLOC", "0")  # leave the test process's allocator alone
    rc = walkthrough.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "FAIL" not in out
    passed = out.count("  PASS  ")
    assert passed >= 10, out[-3000:]  # every section's checks ran (one is skipped at N < 30)
    assert f"{passed} of {passed} checks passed" in out
    for section in range(1, 7):
        assert f"==== {section}. " in out
    _assert_figures(tmp_path)


def _notes_diffusion():
    return ddpmkit.GaussianDiffusion(ddpmkit.make_betas("linear", 1000))


def _settings(walkthrough, tmp_path):
    return walkthrough.Settings(out=tmp_path, forward_draws=300, posterior_draws=3000)


def test_forward_check_fails_when_a_step_uses_beta_instead_of_its_square_root(
        walkthrough, tmp_path, monkeypatch):
    # A plausible slip in q(x_t | x_{t-1}): scaling x_{t-1} by alpha_t, not sqrt(alpha_t).
    def wrong_step(self, x_prev, t, noise):
        return self._at("alphas", t, x_prev) * x_prev + self._at("betas", t, x_prev).sqrt() * noise

    monkeypatch.setattr(ddpmkit.GaussianDiffusion, "q_step_sample", wrong_step)
    checks = walkthrough.Checks()
    _, x_test = walkthrough.digits()
    walkthrough.section_forward(_settings(walkthrough, tmp_path), checks, _notes_diffusion(),
                                x_test)
    assert [line.split(":")[0] for line in checks.failed] == [
        "FAIL  t single steps (eq. 2) have the moments of q(x_t | x_0) (eq. 4)"]


def test_bayes_identity_catches_an_off_by_one_in_alpha_bar(walkthrough, tmp_path):
    # sqrt(alpha_bar_t) where eq. 7 has sqrt(alpha_bar_{t-1}): the posterior mean moves by
    # a relative 1e-4 or less, far below any Monte-Carlo error; the exact identity sees it.
    diff = _notes_diffusion()
    t = diff._tables
    t["posterior_mean_coef_x0"] = t["betas"] * t["alpha_bar"].sqrt() / (1 - t["alpha_bar"])
    checks = walkthrough.Checks()
    walkthrough.posterior_identity(_settings(walkthrough, tmp_path), checks, diff,
                                   walkthrough.digits()[1][0].reshape(-1))
    assert len(checks.failed) == 1 and "Bayes' rule" in checks.failed[0]


def test_posterior_checks_fail_when_beta_stands_in_for_beta_tilde(walkthrough, tmp_path):
    # The posterior variance is beta_tilde_t (eq. 7), not beta_t (a reverse-process choice).
    diff = _notes_diffusion()
    diff._tables["posterior_variance"] = diff._tables["betas"].clone()
    checks = walkthrough.Checks()
    _, x_test = walkthrough.digits()
    walkthrough.section_posterior(_settings(walkthrough, tmp_path), checks, diff, x_test)
    failed = [line.split(":")[0] for line in checks.failed]
    assert failed == [
        "FAIL  Bayes' rule (three Gaussians) = ddpmkit's q_posterior density, t = 2..T",
        "FAIL  Monte-Carlo posterior mean, variance and evidence = eq. 6-7 and eq. 4"]


def test_eq12_weight_with_fixed_small_variance_is_beta_over_two_alpha_one_minus_alpha_bar_prev(
        walkthrough):
    # With sigma_t^2 = beta_tilde_t, eq. 12's weight simplifies and eq. 8's constant vanishes.
    diff = ddpmkit.GaussianDiffusion(ddpmkit.make_betas("linear", 50))
    w, C = walkthrough.loss_weights(diff, diff.posterior_variance[1:])
    assert torch.all(C.abs() < 1e-12)
    closed = diff.betas[1:] / (2 * diff.alphas[1:] * (1 - diff.alpha_bar_prev[1:]))
    torch.testing.assert_close(w, closed, rtol=1e-12, atol=0)


@pytest.mark.slow
def test_walkthrough_runs_on_a_trained_run_through_ddpmkit_load(tmp_path):
    run = tmp_path / "run"
    train = [sys.executable, "-m", "ddpmkit", "train", "--data", "digits", "--out", str(run),
             "--schedule", "linear", "--timesteps", "40", "--model-channels", "16",
             "--channel-mult", "1,2", "--num-res-blocks", "1", "--groups", "8",
             "--batch-size", "16", "--max-steps", "3", "--max-minutes", "0",
             "--sample-num", "4", "--no-progress"]
    out = subprocess.run(train, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1",
                          "--checkpoint", str(run), "--out", str(tmp_path / "figs")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"loaded from {run}" in out.stdout
    assert "T = 40, prediction 'eps', variance 'fixed_small'" in out.stdout
    _assert_figures(tmp_path / "figs")


@pytest.mark.slow
def test_walkthrough_script_runs_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out",
                          str(tmp_path / "figs")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _assert_figures(tmp_path / "figs")


def test_walkthrough_rejects_bad_settings_with_a_usage_error(walkthrough, capsys):
    with pytest.raises(SystemExit) as stop:
        walkthrough.parse_args(["--timesteps", "5"])
    assert stop.value.code == 2
    assert "--timesteps must be >= 21" in capsys.readouterr().err


def test_a_missing_checkpoint_is_a_one_line_error_before_any_work(walkthrough, tmp_path,
                                                                   capsys):
    rc = walkthrough.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.strip() == f"error: checkpoint {tmp_path / 'nope'} does not exist"
    assert "====" not in captured.out


def test_quick_settings_give_way_to_explicit_flags(walkthrough):
    s = walkthrough.parse_args(["--quick", "--train-steps", "800", "--out", "x"])
    assert (s.train_steps, s.net, s.timesteps, str(s.out)) == (800, "tiny", 40, "x")
