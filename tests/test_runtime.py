"""ddpmkit.runtime.tune_allocator: freed activations are reused instead of re-faulted."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Allocate and free a 32 MB tensor 20 times; count the minor page faults. glibc's default
# maps such a block fresh each time (8,192 faults of 4 KiB per round); tuned, the heap keeps
# it for the next round. The heap may take a few rounds to settle (how many depends on what
# the process allocated before: 1 to 8 were seen), so the count starts after 10 warm-up
# rounds: the steady state is what a training loop lives in.
PROBE = textwrap.dedent("""
    import os, resource, sys, torch
    from ddpmkit.runtime import tune_allocator
    tuned = tune_allocator()
    for _ in range(10):  # warm-up: first touches happen in any case
        x = torch.ones(8 << 20)
        del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        x = torch.ones(8 << 20)
        del x
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _probe(env_value: str | None) -> tuple[bool, int]:
    import os
    env = dict(os.environ)
    env.pop("DDPMKIT_TUNE_MALLOC", None)
    if env_value is not None:
        env["DDPMKIT_TUNE_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_allocator_reuses_freed_blocks_and_can_be_turned_off():
    tuned, faults = _probe(None)
    off, faults_off = _probe("0")
    assert tuned and not off
    pages = 20 * (32 << 20) // 4096  # 163,840 if every round faulted every page in again
    # Tuned: at most a round or two of faults (none seen once the heap has settled), not 20.
    assert faults < pages // 10, faults
    # The untuned process does fault them in again: the probe can tell the two apart.
    assert faults_off > pages // 2, faults_off


def test_tune_allocator_is_idempotent():
    from ddpmkit.runtime import tune_allocator
    assert tune_allocator() == tune_allocator()
