"""Length-aware micro-batches: the update computes each micro-batch at the smallest planned length that holds
it, with the same loss and gradient as today's one padded batch (every aggregation, with the KL term), the
padding it computes on a wide length distribution, the train records of a real run, and the plan compiling
every length."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fst_jax.models.qwen3 import Qwen3, Qwen3Config
from fst_jax.rl import (
    AGGREGATIONS,
    RLConfig,
    bucketed_gradients,
    build_rollouts,
    compute_gradients,
)
from fst_jax.rl.policy_update import planned_lengths
from fst_jax.rl.rollouts import (
    Rollouts,
    length_buckets,
    micro_batches,
    pad_rows,
    padding_ratio,
    row_lengths,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                   head_dim=8)


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, params, base): a tiny random Qwen3 and a perturbed base copy (numpy init: no threefry)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(TINY, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.RandomState(0)
    init = lambda path, x: (np.ones(x.shape, np.float32) if "norm" in jax.tree_util.keystr(path)
                            else 0.02 * rng.randn(*x.shape).astype(np.float32))
    params = jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(init, abstract))
    base = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.randn(*x.shape), jnp.float32), params)
    return graphdef, params, base


def _wide_rollouts(rows=10, seed=0):
    """Rows from 4 to 60 tokens (two of them dropped), behaviour log-probs spread around a plausible value."""
    rng = np.random.RandomState(seed)
    prompts = [list(rng.randint(1, 64, rng.randint(2, 8))) for _ in range(rows)]
    responses = [list(rng.randint(1, 64, n)) for n in rng.choice([1, 3, 9, 20, 33, 50], rows)]
    logprobs = [list(-4.0 + 0.5 * rng.randn(len(r))) for r in responses]
    keep = [b not in (2, 7) for b in range(rows)]
    return build_rollouts(prompts, responses, logprobs, rng.randn(rows), keep=keep)


CONFIGS = {f"{loss}-{aggregation}": RLConfig(loss=loss, aggregation=aggregation, kl_coef=0.3, micro_batch_size=2,
                                             kl_estimator="k3" if loss == "cispo" else "k2", tau=1.1,
                                             eps_low=0.05, eps_high=0.1, sequence_length=64, num_length_buckets=2)
           for loss in ("cispo", "ppo_clip") for aggregation in AGGREGATIONS}
_padded_gradients = jax.jit(compute_gradients, static_argnames=("graphdef", "config"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bucketed_gradients_equal_the_padded_batch(tiny, name):
    """Micro-batches of 2 rows at 32 or 64 tokens (rows without loss left out) against one batch of 12 rows
    padded to 64 tokens, today's computation: the same loss, KL, statistics and gradient to fp32 tolerance."""
    config = CONFIGS[name]
    graphdef, params, base = tiny
    rollouts = _wide_rollouts()
    grads, metrics = bucketed_gradients(params, base, rollouts, graphdef=graphdef, config=config)
    padded = jax.tree.map(lambda x: x if x.ndim == 1 else np.pad(x, [(0, 0), (0, 64 - x.shape[1])]),
                          pad_rows(rollouts, 12))
    ref_grads, ref = _padded_gradients(params, base, padded, graphdef=graphdef, config=config)
    assert float(ref["kl"]) > 0 and float(ref["num_rows"]) == 8
    for key, value in ref.items():
        np.testing.assert_allclose(metrics[key], value, rtol=2e-5, atol=1e-7, err_msg=key)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(r))))
    # 8 rows that carry loss → 4 micro-batches, at two different lengths; less computed than 12 × 64
    assert metrics["update_micro_batches"] == 4
    groups = micro_batches(rollouts, 2, planned_lengths(config))
    assert sorted({g.input_ids.shape[1] for g in groups}) == [32, 64]
    useful = row_lengths(rollouts)[(rollouts.loss_mask[:, 1:] > 0).any(axis=1)].sum()
    assert metrics["update_padding_ratio"] == pytest.approx(sum(g.input_ids.size for g in groups) / useful)
    assert metrics["update_padding_ratio"] < 12 * 64 / useful


def test_micro_batches_sort_cut_and_refuse_what_was_not_planned():
    ro = build_rollouts([[1, 2], [3], [4, 5, 6], [7]], [[8] * 30, [9], [10] * 12, [11] * 2], [[0.0] * 30, [0.0],
                        [0.0] * 12, [0.0] * 2], [1.0, -1.0, 0.5, 2.0], keep=[True, True, True, False])
    groups = micro_batches(ro, 2, (16, 32, 48))
    # kept rows longest first: 32 and 15 tokens → 32; then 2 tokens (+ a padding row) → 16
    assert [g.input_ids.shape for g in groups] == [(2, 32), (2, 16)]
    np.testing.assert_array_equal(groups[0].advantages, [1.0, 0.5])
    np.testing.assert_array_equal(groups[1].advantages, [-1.0, 0.0])
    np.testing.assert_array_equal(groups[1].input_ids[0, :3], [3, 9, 0])
    assert padding_ratio(ro, groups) == pytest.approx((64 + 32) / (32 + 15 + 2))
    with pytest.raises(ValueError, match="rollout of 32 tokens exceeds the update's longest planned length 16"):
        micro_batches(ro, 2, (16,))
    assert length_buckets(5120, 8) == (640, 1280, 1920, 2560, 3200, 3840, 4480, 5120)
    assert length_buckets(144, 8) == (32, 48, 64, 80, 96, 112, 128, 144) and length_buckets(144, 1) == (144,)


def test_padding_ratio_on_a_wide_length_distribution():
    """The flagship's update shapes (32 problems × 8 rollouts, micro-batches of 8, lengths up to 1024 + 4096 in
    the default 10 buckets) on answers spread log-uniformly from 16 to 4096 tokens: ≤ 1.3 tokens computed per
    real token, against 5120 / mean length when every row is padded to the cap."""
    rng = np.random.RandomState(0)
    rows, cap = 256, 5120
    prompt = rng.randint(100, 1025, rows)
    answer = np.exp(rng.uniform(np.log(16), np.log(4096), rows)).astype(int)
    mask = (np.arange(cap)[None, :] < (prompt + answer)[:, None]).astype(np.int32)
    loss = (mask * (np.arange(cap)[None, :] >= prompt[:, None])).astype(np.float32)
    ro = Rollouts(input_ids=mask, attention_mask=mask, loss_mask=loss, old_logprobs=loss,
                  advantages=np.ones(rows, np.float32))
    ratio = padding_ratio(ro, micro_batches(ro, 8, length_buckets(cap, RLConfig().num_length_buckets)))
    today = rows * cap / (prompt + answer).sum()
    print(f"update padding ratio, answers log-uniform 16..4096 (mean {answer.mean():.0f}), prompts 100..1024: "
          f"{ratio:.3f} with 10 length buckets, {today:.2f} padded to {cap}")
    assert 1.0 < ratio <= 1.3 and today > 3.5


def _train(*args, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, **(env_extra or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_train_records_log_the_update_padding_ratio(tmp_path, jax_cache_env):
    """A real RL run of the embedded default (one step): its train record carries update_padding_ratio, below
    what padding every row to the cap (144 tokens) computes."""
    result = _train("--config", "configs/fst_tiny.py", "--workdir", str(tmp_path), "--config.method=rl",
                    "--config.total_steps=1", "--config.cycle.rl_steps=1", "--config.eval.at_start=false",
                    "--config.eval.num_problems=2", "--config.eval.kl_prompts=0", "--config.forgetting_tasks=",
                    "--config.log.progress=false", "--config.log.tensorboard=false", env_extra=jax_cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 1
    for r in train:
        rows = r["num_rows"]
        if rows:
            real = r["num_tokens"] + rows * 1.0  # response tokens + at least one prompt token per row
            assert 1.0 <= r["update_padding_ratio"] < 64 * 144 / real, r
        assert r["update_micro_batches"] == -(-int(rows) // 8)  # the config's micro-batches of 8 rows with loss
