"""`cycle.reuse_gepa_rollouts`: GEPA's evaluation rollouts stand in for RL rollouts of the same (problem,
prompt) pairs, through the CLI on the tiny model the project ships."""

import json
import os
import subprocess
import sys

import pytest

from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, jax_cache_env, *flags):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"),
           f"--config={os.path.join(ROOT, 'configs', 'fst_tiny.py')}", f"--workdir={workdir}",
           "--config.total_steps=2", "--config.cycle.rl_steps=2", "--config.cycle.problems_per_step=4",
           "--config.cycle.rollouts_per_problem=8", "--config.cycle.population_size=2",
           "--config.gepa.budget_rollouts=24", "--config.gepa.proposals_per_iteration=2",
           "--config.gepa.minibatch_size=2", "--config.eval.k=1", "--config.eval.num_problems=2",
           "--config.eval.kl_prompts=0", "--config.eval.at_start=false", "--config.forgetting_tasks=",
           "--config.log.progress=false", "--noplot", *flags]
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), **jax_cache_env)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


@pytest.mark.parametrize("staleness", [0, 3])
def test_gepa_rollouts_replace_rl_rollouts_of_the_same_prompts(tmp_path, staleness, jax_cache_env):
    steps = _train(tmp_path / "reuse", jax_cache_env, "--config.cycle.reuse_gepa_rollouts=true",
                   f"--config.cycle.reuse_max_staleness={staleness}")
    first, second = steps
    assert first["rollouts_this_step"] == 32
    assert first["groups_kept_fraction"] > 0  # some groups carry signal: the update sees the rollouts
    # GEPA scored the carried-over population on the whole window (4 problems per step): each population
    # prompt's pair has at least one rollout to give
    assert 4 <= first["reused_rollouts"] <= 32
    # Sampled at the weights of the first update: their stored log-probs are the policy's own, so the
    # importance weights stay 1 — a rollout filed under the wrong prompt would move them far from it
    assert first["importance_weight_max"] == pytest.approx(1.0, abs=2e-3)
    assert first["importance_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    if staleness == 0:  # one update later the window's rollouts are too stale: fresh samples only
        assert second["reused_rollouts"] == 0
    else:  # reused one update after they were sampled: CISPO's ratio is no longer 1 but stays finite
        assert second["reused_rollouts"] >= 4
        assert second["importance_weight_mean"] != pytest.approx(1.0, abs=1e-6)
        assert 0 < second["importance_weight_max"] < float("inf")


def test_the_pool_hands_each_rollout_out_once_in_request_order():
    """RolloutPool.generate: stored rollouts first, then one fresh request for the rest, prompt-major as a
    sampler returns them; nothing once the rollouts are more than max_staleness updates old."""
    import numpy as np

    from fst_jax.trainer.rollout_reuse import RolloutPool
    from fst_jax.sampling import SampleOutput

    def out(tokens):
        return SampleOutput(tokens=[list(t) for t in tokens], logprobs=[np.full(len(t), -1.0) for t in tokens],
                            finished=[True] * len(tokens))

    pool = RolloutPool(max_staleness=1)
    pool.reset(update_step=10)
    pool.add([[1], [2], [1]], out([[11], [21], [12]]))  # prompt [1] twice, prompt [2] once
    requests = []

    def sample(prompts, num_samples, rest=False):
        requests.append((prompts, num_samples, rest))
        return out([[100 + p[0]] for p in prompts for _ in range(num_samples)])

    got, reused = pool.generate([[1], [2], [3]], 2, update_step=10, sample=sample)
    assert reused == 3
    assert got.tokens == [[11], [12], [21], [102], [103], [103]]
    assert requests == [([[2], [3], [3]], 1, True)]  # the rest: a call of its own kind
    # each stored rollout went out once: the pool is empty now, so the request is sampled whole
    got, reused = pool.generate([[1]], 2, update_step=11, sample=sample)
    assert reused == 0 and got.tokens == [[101], [101]] and requests[-1] == ([[1]], 2, False)
    pool.add([[1]], out([[13]]))
    assert pool.take([[1]], 2, update_step=12) == [[]]  # two updates after the search: too stale
