"""`python launch/bench.py gpu --allow-cpu`: the one-shot accelerator check runs end to end on tiny shapes."""

import os
import subprocess
import sys

import pytest

from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_gpu_runs_on_cpu_at_tiny_shapes():
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags())
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"), "gpu", "--allow-cpu"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    for line in ("sampler batch 8: prefill", "sampler batch 16: prefill", "of the HBM roofline", "update: 2-layer",
                 "s/update measured vs", "s predicted (cost model: NVIDIA H100", "micro-batches of 2/device, FSDP over 1",
                 "FST cycle predicted (plan in", "measured: rollouts", "FST cycle (tiny model; T=2, B=4, G=4, K=2",
                 "GEPA", "rollout regime: 16 requests", "useful tokens/s"):
        assert line in out, out
    assert "failed" not in out


def test_bench_gpu_without_accelerator_says_so():
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"), "gpu"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "no accelerator found" in result.stdout


def test_bench_rollout_runs_at_tiny_sizes():
    """`python launch/bench.py rollout` (the CPU rollout benchmark) end to end on 8 requests, the engine only:
    both draws report useful tokens within the row-steps computed, and the decode-step check compares its two
    buffers (it calls the engine's insert and decode programs directly)."""
    import re

    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags())
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"), "rollout", "--requests", "8",
                             "--max-new", "16", "--mean-length", "8", "--slots", "8", "--buffer-rows", "8", "--skip",
                             "static", "hf_cb", "hf_generate"], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    counts = re.findall(r"engine +8 slots, (gumbel|inverse_cdf): utilisation [0-9.]+% \((\d+) tokens / (\d+) row-steps\)",
                        result.stdout)
    assert [c[0] for c in counts] == ["gumbel", "inverse_cdf"], result.stdout
    assert all(8 <= int(tokens) <= int(row_steps) <= 8 * 16 for _, tokens, row_steps in counts), counts
    assert re.search(r"512-column buffer [0-9.]+ ms, 4096-column buffer [0-9.]+ ms \([0-9.]+x\)", result.stdout)
