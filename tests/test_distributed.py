"""torchrun with 2 CPU processes (gloo) against one process: training, resume, sample, eval.

Each torchrun launch costs ~8-10 s here (two interpreters importing torch on 2 busy cores),
so the launches are few and each checks several things.
"""

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ddpmkit.cli import main
from ddpmkit.train.checkpoint import list_checkpoints

# Tiny U-Net, no dropout (dropout masks are per rank, so they could never match one process),
# checkpoints at steps 2 and 4.
FLAGS = ["--model-channels", "16", "--channel-mult", "1,2", "--num-res-blocks", "1",
         "--attention-resolutions", "4", "--groups", "8", "--timesteps", "40", "--dropout", "0",
         "--warmup-steps", "2", "--log-every", "2", "--checkpoint-every", "2",
         "--max-minutes", "0", "--sample-num", "4", "--sample-steps", "4", "--no-progress"]
B = 8  # per-process batch of the 2-process runs; the 1-process runs use 2 * B

# The 2-process gradient is the mean of two half-batch means, all-reduced in float32, where
# one process takes one mean over the batch: the sums round differently (~1e-7 relative), so
# the gradient norms agree to ~1e-6 (GRAD_REL). The weights agree less well: Adam divides each
# gradient element by its own RMS, so elements whose gradient is near zero (e.g. the first
# conv of a block whose zero-initialised last conv passes back almost nothing in the first
# steps) take lr-sized steps whose size rounding noise decides. Measured: up to 9e-6 after 4
# steps at lr 1e-3, i.e. ~1% of one step. ATOL = 10% of one step; a real difference (a wrong
# slice, one rank's examples counted twice) moves many weights by ~lr. Adam would hide a wrong
# gradient scale (a missing 1/world), which is what the logged grad_norm check is for.
ATOL = 1e-4
GRAD_REL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, cwd=None) -> str:
    """Run ``python -m torch.distributed.run ... -m -- ddpmkit ARGS``; its output (exit 0)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores; also the tests' own thread count
    # "--" ends torchrun's own options: without it, its argparse rejects `--num` (of
    # ddpmkit sample) as an ambiguous abbreviation of its `--numa-binding`.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "--", "ddpmkit", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out

def one_and_two_process_json(args: list[str], capsys) -> tuple[dict, dict]:
    """The --json report of ``ddpmkit ARGS`` in this process and under 2-process torchrun."""
    out = torchrun(*args)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 0 alone reports
    two = json.loads(lines[0])
    capsys.readouterr()
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return one, two



def _weights(ckpt, name="model.safetensors"):
    return load_file(ckpt / name)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _metrics(run) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _only_checkpoint(src, step: int, dst):
    """A run folder holding only checkpoint ``step`` of ``src`` (an interrupted run)."""
    name = f"step-{step:07d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    """The reference: one process, batch 2B, 4 steps (checkpoints at 2 and 4)."""
    run = tmp_path_factory.mktemp("one") / "run"
    assert main(["train", "--out", str(run), "--max-steps", "4", "--batch-size", str(2 * B),
                 *FLAGS]) == 0
    return run


def test_two_processes_train_like_one_with_the_global_batch(one_proc, tmp_path):
    run = tmp_path / "two"
    out = torchrun("train", "--out", str(run), "--max-steps", "4", "--batch-size", str(B),
                   *FLAGS)
    assert "processes: 2" in out
    assert out.count("starting a new run") == 1  # printing on rank 0 only

    for step in (2, 4):
        ckpt = f"checkpoints/step-{step:07d}"
        for name in ("model.safetensors", "ema.safetensors"):
            a, b = _weights(one_proc / ckpt, name), _weights(run / ckpt, name)
            diff = _max_diff(a, b)
            print(f"step {step} {name}: max |1-proc - 2-proc| = {diff:.3g}")
            assert diff < ATOL, (step, name, diff)
    # and they did train: steps 3 and 4 moved the weights by far more than the tolerance
    assert _max_diff(_weights(run / "checkpoints/step-0000002"),
                     _weights(run / "checkpoints/step-0000004")) > 10 * ATOL

    # written once, by rank 0: one metrics row per log step, one picture, both RNG states
    assert [r["step"] for r in _metrics(run)] == ["2", "4"]
    assert (run / "samples.png").exists() and (run / "config.json").exists()
    with safe_open(run / "checkpoints/step-0000004/trainer.safetensors", "pt") as f:
        keys = set(f.keys())
        state = json.loads(f.metadata()["trainer_state"])
    assert {"rng.torch.rank0", "rng.torch.rank1"} <= keys
    assert state["world_size"] == 2 and state["global_batch"] == 2 * B
    # the logged loss is the whole global batch's, and the gradient (its norm before
    # clipping) is that of the mean over the global batch, as in one process
    one_rows = _metrics(one_proc)
    for r1, r2 in zip(one_rows, _metrics(run), strict=True):
        for key in ("loss", "mse", "grad_norm"):
            assert float(r2[key]) == pytest.approx(float(r1[key]), rel=GRAD_REL), (key, r1, r2)

    # 2-process checkpoint -> 1 process: resume at step 2 with batch 2B, reach step 4, and
    # land where the uninterrupted 1-process run did.
    part = _only_checkpoint(run, 2, tmp_path / "resumed")
    assert main(["train", "--out", str(part), "--max-steps", "4", "--batch-size", str(2 * B),
                 *FLAGS]) == 0
    final = part / "checkpoints/step-0000004"
    assert final.is_dir()
    for name in ("model.safetensors", "ema.safetensors"):
        diff = _max_diff(_weights(one_proc / "checkpoints/step-0000004", name),
                         _weights(final, name))
        print(f"2->1 resume {name}: max diff {diff:.3g}")
        assert diff < ATOL, (name, diff)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_with_grad_accum(one_proc, tmp_path):
    # global batch 4 per rank x 2 ranks x 2 micro-batches = the reference's 16
    part = _only_checkpoint(one_proc, 2, tmp_path / "resumed")
    out = torchrun("train", "--out", str(part), "--max-steps", "4", "--batch-size", "4",
                   "--grad-accum", "2", *FLAGS)
    assert "resuming from" in out and "written by 1 process(es), this run has 2" in out
    final = part / "checkpoints/step-0000004"
    for name in ("model.safetensors", "ema.safetensors"):
        diff = _max_diff(_weights(one_proc / "checkpoints/step-0000004", name),
                         _weights(final, name))
        print(f"1->2 resume, grad_accum 2 {name}: max diff {diff:.3g}")
        assert diff < ATOL, (name, diff)
    row = _metrics(part)[-1]
    ref = _metrics(one_proc)[-1]
    assert row["step"] == ref["step"] == "4"
    for key in ("loss", "mse", "grad_norm"):
        assert float(row[key]) == pytest.approx(float(ref[key]), rel=GRAD_REL), key


def test_two_process_sample_equals_one_process(one_proc, tmp_path):
    # 5 samples in batches of 2: rank 0 draws batches 0 and 2, rank 1 batch 1, so the gather
    # pads unequal parts and rank 0 must put them back in sample order.
    args = ["sample", "--checkpoint", str(one_proc), "--num", "5", "--batch-size", "2",
            "--steps", "4", "--no-progress"]
    out = torchrun(*args, "--out", str(tmp_path / "two.npz"))
    assert out.count("wrote 5 samples") == 1
    assert main([*args, "--out", str(tmp_path / "one.npz")]) == 0
    one = np.load(tmp_path / "one.npz")["arr_0"]
    two = np.load(tmp_path / "two.npz")["arr_0"]
    assert one.shape == (5, 8, 8, 1) and one.dtype == np.uint8
    assert np.array_equal(one, two)
    assert len({a.tobytes() for a in one}) == 5  # distinct samples, not one repeated


def test_two_process_eval_equals_one_process(one_proc, capsys):
    # 7 examples: rank 0 evaluates 0, 2, 4, 6 and rank 1 evaluates 1, 3, 5
    args = ["eval", "--checkpoint", str(one_proc), "--max-examples", "7", "--json",
            "--no-progress"]
    one, two = one_and_two_process_json(args, capsys)
    assert one["n"] == two["n"] == 7
    for key in ("bits_per_dim", "prior", "diffusion", "decoder", "stderr"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=0), key
    assert torch.isfinite(torch.tensor(one["bits_per_dim"]))


# ---- issue 16: the SLURM signal rule, uint8 gathered in rounds --------------------------------

SHIM = """import os, sys, time
from ddpmkit.cli import main
from ddpmkit.train import trainer
if os.environ.get("SLOW_SAVE"):  # a big model's checkpoint write takes a while
    real = trainer.save_checkpoint
    def slow(*a, **k):
        time.sleep(float(os.environ["SLOW_SAVE"]))
        return real(*a, **k)
    trainer.save_checkpoint = slow
rc = main(sys.argv[1:])
with open(os.path.join(os.environ["RC_DIR"], "rc." + os.environ["RANK"]), "w") as f:
    f.write(str(rc))
sys.exit(rc)
"""


def _torchrun_cmd(script, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
            *args]


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: ppid
                found.append(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_torchrun_and_every_worker_saves_one_checkpoint(tmp_path):
    """SLURM's --signal=TERM reaches torchrun and each worker; torchrun forwards another
    SIGTERM. The workers must take both as one request: save once, exit 0."""
    import signal
    import time
    shim, run, log = tmp_path / "shim.py", tmp_path / "run", tmp_path / "out.log"
    shim.write_text(SHIM)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", RC_DIR=str(tmp_path), PYTHONUNBUFFERED="1", SLOW_SAVE="3")
    cmd = _torchrun_cmd(shim, "train", "--out", str(run), "--batch-size", str(B), *FLAGS,
                        "--max-steps", "100000", "--checkpoint-every", "100000")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.csv").exists():  # the loop, with its handler, runs
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        # SLURM signals every process of the step; torchrun forwards its SIGTERM to the
        # workers, which arrives while they save (signals that reach a process before its
        # handler runs merge into one, so the workers' copies go first)
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    # torchrun itself reports the signal it got (exit 1); the workers saved and exited 0
    assert [(tmp_path / f"rc.{r}").read_text() for r in (0, 1)] == ["0", "0"], text[-3000:]
    assert "interrupted" not in text
    stops = re.findall(r"stopped \(signal\) at step (\d+)", text)
    assert len(stops) == 1, text[-3000:]
    assert [p.name for p in list_checkpoints(run)] == [f"step-{int(stops[0]):07d}"]


GATHER = """import os, sys, torch
from ddpmkit import dist
dist.init_process_group(torch.device("cpu"))
counts = [7, 4]
r = dist.rank()
x = (torch.arange(counts[r] * 6, dtype=torch.uint8) + 100 * r).reshape(counts[r], 2, 3)
out = dist.gather_rows(x, counts, max_bytes=13)  # 2 rows (12 bytes) per round: 4 rounds
if r == 0:
    torch.save(out, sys.argv[1])
dist.destroy()
"""


@pytest.mark.slow
def test_gather_rows_in_rounds_keeps_dtype_and_order(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(_torchrun_cmd(script, str(tmp_path / "out.pt")), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    want = torch.cat([(torch.arange(c * 6, dtype=torch.uint8) + 100 * r).reshape(c, 2, 3)
                      for r, c in enumerate([7, 4])])
    assert got.dtype == torch.uint8 and torch.equal(got, want)


@pytest.mark.slow
def test_two_process_fid_equals_one_process(one_proc, tmp_path, capsys):
    # 5 samples in batches of 2 (rank 0: batches 0 and 2, rank 1: batch 1): features, not
    # images, are gathered and put back in sample order, so every figure is one process's.
    from test_fid import _random_inception_state

    torch.save(_random_inception_state(), tmp_path / "w.pth")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8))
    args = ["fid", "--checkpoint", str(one_proc), "--num", "5", "--batch-size", "2",
            "--steps", "4", "--ref", str(tmp_path / "ref.npz"), "--inception",
            str(tmp_path / "w.pth"), "--json", "--no-progress"]
    one, two = one_and_two_process_json(args, capsys)
    assert one["num_samples"] == two["num_samples"] == 5
    for key in ("fid", "kid", "kid_se", "is", "is_std", "precision", "recall"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key
