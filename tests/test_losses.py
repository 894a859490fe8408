"""Pure-function tests for fst_jax.rl.losses: hand-computed values, gradients, micro-batch exactness, memory."""

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from fst_jax.rl import losses

LN2, LN8 = math.log(2.0), math.log(8.0)


def _mask(rows):
    return jnp.asarray(rows, jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# Advantages


def test_group_advantages_known_values_and_dropped_groups():
    rewards_pg = jnp.array([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    advantages_pg, valid_p = losses.group_advantages(rewards_pg, eps=0.0)
    # Group 0: mean ½, std ½ → ±1. Group 1: std 0 → dropped. Group 2: mean ¾, var = (3·(¾)² + (9/4)²)/4 =
    # 27/16, std = 3√3/4 → −¾ / std = −1/√3, 9/4 / std = √3.
    s3 = math.sqrt(3.0)
    expected = [[1, -1, 1, -1], [0, 0, 0, 0], [-1 / s3, -1 / s3, -1 / s3, s3]]
    chex.assert_trees_all_close(advantages_pg, jnp.array(expected), atol=1e-6)
    np.testing.assert_array_equal(valid_p, [True, False, True])


def test_group_advantages_eps_and_nan():
    advantages_pg, valid_p = losses.group_advantages(jnp.array([[1.0, 0.0], [jnp.nan, 1.0]]), eps=0.5)
    # std = ½, so A = ±½ / (½ + ½) = ±½; the NaN group is invalid and zeroed, never propagated.
    chex.assert_trees_all_close(advantages_pg, jnp.array([[0.5, -0.5], [0.0, 0.0]]))
    np.testing.assert_array_equal(valid_p, [True, False])
    chex.assert_tree_all_finite(advantages_pg)


# ---------------------------------------------------------------------------------------------------------
# Per-token log-probs

# Row 0 at temperature 2: z = [0, ln2, 0] → p = [¼, ½, ¼]. Row 1: uniform over 3.
HAND_LOGITS_BTV = jnp.array([[[0.0, 2 * LN2, 0.0], [0.0, 0.0, 0.0]]])
HAND_TARGETS_BT = jnp.array([[1, 2]])


def test_token_logprobs_from_logits_by_hand():
    logp_bt = losses.token_logprobs_from_logits(HAND_LOGITS_BTV, HAND_TARGETS_BT, temperature=2.0)
    chex.assert_trees_all_close(logp_bt, jnp.array([[math.log(0.5), -math.log(3.0)]]), atol=1e-6)
    # At temperature 1 row 0 is softmax([0, 2ln2, 0]) = [1/6, 4/6, 1/6].
    logp_bt = losses.token_logprobs_from_logits(HAND_LOGITS_BTV, HAND_TARGETS_BT)
    chex.assert_trees_all_close(logp_bt, jnp.array([[math.log(4 / 6), -math.log(3.0)]]), atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_token_logprobs_and_entropy_by_hand(chunk_size):
    # unembed = I, so the hidden states are the logits.
    logp_bt, entropy_bt = losses.token_logprobs(
        HAND_LOGITS_BTV, jnp.eye(3), HAND_TARGETS_BT, temperature=2.0, chunk_size=chunk_size, return_entropy=True
    )
    chex.assert_trees_all_close(logp_bt, jnp.array([[math.log(0.5), -math.log(3.0)]]), atol=1e-6)
    # H([¼, ½, ¼]) = 2·¼·ln4 + ½·ln2 = 1.5 ln2; H(uniform over 3) = ln3.
    chex.assert_trees_all_close(entropy_bt, jnp.array([[1.5 * LN2, math.log(3.0)]]), atol=1e-6)


def _random_lm_head(seed, batch=3, seq_len=13, width=8, vocab=50, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden_btd = jax.random.normal(k1, (batch, seq_len, width), dtype)
    unembed_dv = jax.random.normal(k2, (width, vocab), dtype)
    targets_bt = jax.random.randint(k3, (batch, seq_len), 0, vocab)
    return hidden_btd, unembed_dv, targets_bt


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 32])
def test_chunked_logprobs_match_unchunked_values_and_gradients(chunk_size):
    hidden_btd, unembed_dv, targets_bt = _random_lm_head(0)
    weights_bt = jax.random.normal(jax.random.key(1), targets_bt.shape)

    def objective(hidden_btd, unembed_dv, chunk):
        logp_bt, entropy_bt = losses.token_logprobs(
            hidden_btd, unembed_dv, targets_bt, temperature=0.7, chunk_size=chunk, return_entropy=True
        )
        return jnp.sum(weights_bt * logp_bt) + 0.3 * jnp.sum(entropy_bt), (logp_bt, entropy_bt)

    grad_fn = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True), static_argnums=2)
    grads_ref, aux_ref = grad_fn(hidden_btd, unembed_dv, None)
    grads, aux = grad_fn(hidden_btd, unembed_dv, chunk_size)
    chex.assert_trees_all_close(aux, aux_ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, grads_ref, atol=1e-5, rtol=1e-5)
    # And both agree with the logits path.
    logits_btv = jnp.einsum("btd,dv->btv", hidden_btd, unembed_dv)
    logp_ref_bt = losses.token_logprobs_from_logits(logits_btv, targets_bt, temperature=0.7)
    chex.assert_trees_all_close(aux[0], logp_ref_bt, atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        hidden_btd, unembed_dv, targets_bt = _random_lm_head(2, batch=2, seq_len=5, width=3, vocab=7)
        hidden_btd, unembed_dv = hidden_btd.astype(jnp.float64), unembed_dv.astype(jnp.float64)
        fn = lambda h, w: losses.token_logprobs(h, w, targets_bt, temperature=1.3, chunk_size=2)
        check_grads(fn, (hidden_btd, unembed_dv), order=1, modes=["rev"])


def test_bf16_hidden_gives_float32_logprobs():
    hidden_btd, unembed_dv, targets_bt = _random_lm_head(3, dtype=jnp.bfloat16)
    logp_bt = losses.token_logprobs(hidden_btd, unembed_dv, targets_bt, chunk_size=4)
    chex.assert_type(logp_bt, jnp.float32)
    chex.assert_shape(logp_bt, targets_bt.shape)
    assert bool(jnp.all(logp_bt <= 0.0))


def _compiled_temp_bytes(fn, *abstract_args):
    try:
        analysis = jax.jit(fn).lower(*abstract_args).compile().memory_analysis()
    except (NotImplementedError, RuntimeError) as e:  # not every backend implements it
        pytest.skip(f"memory_analysis unavailable on {jax.default_backend()}: {e}")
    if analysis is None or not hasattr(analysis, "temp_size_in_bytes"):
        pytest.skip(f"memory_analysis returned nothing on {jax.default_backend()}")
    return analysis.temp_size_in_bytes


def test_chunked_logprobs_never_hold_full_logits_at_qwen3_vocab():
    batch, seq_len, width, vocab, chunk = 2, 128, 32, 151_936, 16
    args = (
        jax.ShapeDtypeStruct((batch, seq_len, width), jnp.float32),
        jax.ShapeDtypeStruct((width, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq_len), jnp.int32),
    )
    full_logits_bytes = batch * seq_len * vocab * 4
    chunk_logits_bytes = batch * chunk * vocab * 4
    temp = {}
    for chunk_size in (None, chunk):
        loss = lambda h, w, y, c=chunk_size: jnp.sum(losses.token_logprobs(h, w, y, chunk_size=c))
        temp[chunk_size, "forward"] = _compiled_temp_bytes(loss, *args)
        temp[chunk_size, "grad"] = _compiled_temp_bytes(jax.grad(loss, argnums=(0, 1)), *args)
    print({k: f"{v / 2**20:.1f} MiB" for k, v in temp.items()})
    assert temp[None, "forward"] >= full_logits_bytes  # the unchunked program does build [B, T, V]
    # Chunked: about one [B, chunk, V] block forward; backward adds the recomputed block, its cotangent and
    # the [D, V] unembed gradient — still far below a single full logits tensor.
    assert temp[chunk, "forward"] < 2 * chunk_logits_bytes
    assert temp[chunk, "grad"] < full_logits_bytes / 2
    assert temp[chunk, "grad"] < temp[None, "grad"] / 4


# ---------------------------------------------------------------------------------------------------------
# CISPO

# Shared 2×3 example: ρ = [[1, 2, 8], [½, 1, 100]], the last token masked out.
LOGP_BT = jnp.array([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]])
CISPO_OLD_LOGP_BT = LOGP_BT - jnp.array([[0.0, LN2, LN8], [-LN2, 0.0, math.log(100.0)]])
ADVANTAGES_B = jnp.array([1.0, -2.0])
MASK_BT = _mask([[1, 1, 1], [1, 1, 0]])


def test_cispo_by_hand():
    # Weights min(ρ, 4) = [[1, 2, 4], [½, 1, ·]]; ℓ = −w·A·logp:
    # row 0 (A=1):  −1·(−1) = 1, −2·(−2) = 4, −4·(−½) = 2            → sum 7,    3 tokens
    # row 1 (A=−2): −½·(−2)·(−1.5) = −1.5, −1·(−2)·(−0.2) = −0.4      → sum −1.9, 2 tokens
    loss_sum, denom, stats = losses.cispo_loss(LOGP_BT, CISPO_OLD_LOGP_BT, ADVANTAGES_B, MASK_BT)
    chex.assert_trees_all_close((loss_sum, denom), (7 / 3 - 1.9 / 2, 2.0), atol=1e-5)
    loss_sum, denom, _ = losses.cispo_loss(
        LOGP_BT, CISPO_OLD_LOGP_BT, ADVANTAGES_B, MASK_BT, aggregation="token_mean"
    )
    chex.assert_trees_all_close((loss_sum, denom), (7 - 1.9, 5.0), atol=1e-5)
    # Over unmasked ρ = [1, 2, 8, ½, 1]: mean 12.5/5, max 8, one of five above τ (ρ = 100 is masked).
    chex.assert_trees_all_close(
        (stats["importance_weight_mean"], stats["importance_weight_max"], stats["truncated_fraction"]),
        (2.5, 8.0, 0.2),
        atol=1e-5,
    )
    assert float(stats["num_tokens"]) == 5.0


@pytest.mark.parametrize(
    "aggregation, expected_grad_bt",
    [
        # −min(ρ, τ)·A·mask / 5 tokens.
        ("token_mean", [[-1 / 5, -2 / 5, -4 / 5], [1 / 5, 2 / 5, 0.0]]),
        # −min(ρ, τ)·A·mask / (n_b · 2 rows): n_0 = 3, n_1 = 2.
        ("seq_mean_token_mean", [[-1 / 6, -2 / 6, -4 / 6], [1 / 4, 2 / 4, 0.0]]),
    ],
)
def test_cispo_gradient_is_truncated_weight_times_advantage(aggregation, expected_grad_bt):
    def loss(logp_bt):
        loss_sum, denom, _ = losses.cispo_loss(
            logp_bt, CISPO_OLD_LOGP_BT, ADVANTAGES_B, MASK_BT, aggregation=aggregation
        )
        return loss_sum / denom

    grad_bt = jax.jit(jax.grad(loss))(LOGP_BT)
    chex.assert_trees_all_close(grad_bt, jnp.array(expected_grad_bt), atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    log_ratio=hnp.arrays(np.float32, (3, 4), elements=st.floats(-4, 4, width=32)),
    advantages=hnp.arrays(np.float32, (3,), elements=st.floats(-3, 3, width=32)),
    tau=st.sampled_from([1.0, 2.0, 4.0]),
)
def test_cispo_gradient_identity_property(log_ratio, advantages, tau):
    mask_bt = _mask([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    old_logp_bt = jnp.full((3, 4), -1.0) - log_ratio

    def loss(logp_bt):
        loss_sum, denom, _ = losses.cispo_loss(
            logp_bt, old_logp_bt, advantages, mask_bt, tau=tau, aggregation="token_mean"
        )
        return loss_sum / denom

    grad_bt = jax.grad(loss)(jnp.full((3, 4), -1.0))
    expected_bt = -np.minimum(np.exp(log_ratio), tau) * advantages[:, None] * np.asarray(mask_bt) / 6.0
    np.testing.assert_allclose(grad_bt, expected_bt, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# PPO clip

# ρ = [[1, 1.5, ½], [½, 1.5, 1.1]], A = [1, −2], last token masked, ε = 0.2 (range [0.8, 1.2]).
PPO_OLD_LOGP_BT = LOGP_BT - jnp.log(jnp.array([[1.0, 1.5, 0.5], [0.5, 1.5, 1.1]]))


def test_ppo_clip_by_hand():
    # row 0 (A=1):  −min(1, 1) = −1, −min(1.5, 1.2) = −1.2, −min(0.5, 0.8) = −0.5     → sum −2.7
    # row 1 (A=−2): −min(−1, −1.6) = 1.6, −min(−3, −2.4) = 3                          → sum 4.6
    loss_sum, denom, stats = losses.ppo_clip_loss(LOGP_BT, PPO_OLD_LOGP_BT, ADVANTAGES_B, MASK_BT)
    chex.assert_trees_all_close((loss_sum, denom), (-2.7 / 3 + 4.6 / 2, 2.0), atol=1e-5)
    loss_sum, denom, _ = losses.ppo_clip_loss(
        LOGP_BT, PPO_OLD_LOGP_BT, ADVANTAGES_B, MASK_BT, aggregation="token_mean"
    )
    chex.assert_trees_all_close((loss_sum, denom), (-2.7 + 4.6, 5.0), atol=1e-5)
    # Clipped (zero-gradient) tokens: ρ=1.5 with A>0 (high), ρ=½ with A<0 (low).
    keys = ("importance_weight_mean", "importance_weight_max", "clip_fraction", "clip_low_fraction",
            "clip_high_fraction")
    chex.assert_trees_all_close([stats[k] for k in keys], [5.0 / 5, 1.5, 0.4, 0.2, 0.2], atol=1e-5)
    # Clip-higher: ε_high = 0.28 lets row 0's ρ = 1.5 count up to 1.28 instead of 1.2.
    loss_sum, _, _ = losses.ppo_clip_loss(
        LOGP_BT, PPO_OLD_LOGP_BT, ADVANTAGES_B, MASK_BT, eps_high=0.28, aggregation="token_mean"
    )
    chex.assert_trees_all_close(loss_sum, -2.78 + 4.6, atol=1e-5)


def test_ppo_clip_gradient_by_hand_and_finite_differences():
    def loss(logp_bt, old_logp_bt=PPO_OLD_LOGP_BT, advantages_b=ADVANTAGES_B, mask_bt=MASK_BT):
        loss_sum, denom, _ = losses.ppo_clip_loss(
            logp_bt, old_logp_bt, advantages_b, mask_bt, aggregation="token_mean"
        )
        return loss_sum / denom

    # ∂ℓ/∂logp = −ρ·A where the unclipped term is active, 0 where clipped; / 5 tokens.
    expected_bt = jnp.array([[-1.0, 0.0, -0.5], [0.0, 3.0, 0.0]]) / 5
    chex.assert_trees_all_close(jax.grad(loss)(LOGP_BT), expected_bt, atol=1e-6)
    with jax.enable_x64(True):
        # Random points away from the clip kinks, in float64.
        rng = np.random.default_rng(0)
        logp_bt = jnp.asarray(rng.normal(-1.0, 0.3, (3, 5)))
        old_logp_bt = logp_bt - jnp.asarray(rng.normal(0.0, 0.3, (3, 5)))
        args = (old_logp_bt, jnp.asarray([1.0, -0.5, 2.0]), jnp.asarray(rng.integers(0, 2, (3, 5)), jnp.float64))
        check_grads(lambda lp: loss(lp, *args), (logp_bt,), order=1, modes=["rev"], eps=1e-6)


# ---------------------------------------------------------------------------------------------------------
# KL to base

# log_ratio d = base − logp = [[0, ln2], [−1, 1]].
KL_LOGP_BT = jnp.array([[-1.0, -2.0], [-0.5, -3.0]])
KL_BASE_LOGP_BT = jnp.array([[-1.0, -2.0 + LN2], [-1.5, -2.0]])


@pytest.mark.parametrize(
    "estimator, per_token",
    [
        ("k1", [[0.0, -LN2], [1.0, -1.0]]),  # −d
        ("k2", [[0.0, LN2**2 / 2], [0.5, 0.5]]),  # d²/2
        ("k3", [[0.0, 2 - LN2 - 1], [math.exp(-1) + 1 - 1, math.e - 1 - 1]]),  # eᵈ − d − 1
    ],
)
def test_kl_estimators_by_hand(estimator, per_token):
    (a, b), (c, d) = per_token
    total, denom = losses.kl_penalty(KL_LOGP_BT, KL_BASE_LOGP_BT, jnp.ones((2, 2)), estimator=estimator)
    chex.assert_trees_all_close((total, denom), ((a + b) / 2 + (c + d) / 2, 2.0), atol=1e-6)
    mask_bt = _mask([[1, 0], [1, 1]])
    total, denom = losses.kl_penalty(KL_LOGP_BT, KL_BASE_LOGP_BT, mask_bt, estimator=estimator,
                                     aggregation="token_mean")
    chex.assert_trees_all_close((total, denom), (a + c + d, 3.0), atol=1e-6)


@pytest.mark.parametrize("estimator", sorted(losses.KL_ESTIMATORS))
def test_kl_gradient_matches_finite_differences(estimator):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        logp_bt = jnp.asarray(rng.normal(-1.0, 0.5, (2, 4)))
        base_logp_bt = jnp.asarray(rng.normal(-1.0, 0.5, (2, 4)))
        mask_bt = jnp.asarray([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])

        def kl(lp):
            total, denom = losses.kl_penalty(lp, base_logp_bt, mask_bt, estimator=estimator)
            return total / denom

        check_grads(kl, (logp_bt,), order=2, modes=["rev"])


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, (2, 3), elements=st.floats(-6, 6, width=32)))
def test_k3_is_nonnegative_and_zero_on_policy(log_ratio):
    logp_bt = jnp.full((2, 3), -2.0)
    total, _ = losses.kl_penalty(logp_bt, logp_bt + log_ratio, jnp.ones((2, 3)), aggregation="token_mean")
    assert float(total) >= 0.0
    total, _ = losses.kl_penalty(logp_bt, logp_bt, jnp.ones((2, 3)))
    assert float(total) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Micro-batch exactness of the (sum, denominator) convention


def _policy_and_kl_terms(logp_bt, old_logp_bt, base_logp_bt, advantages_b, mask_bt, name, aggregation):
    loss_sum, denom, _ = losses.get_policy_loss(name, aggregation=aggregation)(
        logp_bt, old_logp_bt, advantages_b, mask_bt
    )
    kl_sum, kl_denom = losses.kl_penalty(logp_bt, base_logp_bt, mask_bt, aggregation=aggregation)
    return loss_sum, denom, kl_sum, kl_denom


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("name", sorted(losses.POLICY_LOSSES))
def test_microbatch_accumulation_is_exact(name, aggregation):
    rng = np.random.default_rng(2)
    batch, seq_len = 6, 7
    logp_bt = jnp.asarray(rng.normal(-1.0, 0.5, (batch, seq_len)), jnp.float32)
    old_logp_bt = logp_bt + jnp.asarray(rng.normal(0.0, 0.3, (batch, seq_len)), jnp.float32)
    base_logp_bt = logp_bt + jnp.asarray(rng.normal(0.0, 0.3, (batch, seq_len)), jnp.float32)
    advantages_b = jnp.asarray(rng.normal(size=batch), jnp.float32)
    lengths_b = np.array([7, 3, 0, 5, 1, 6])  # one empty row: counts in no denominator
    mask_bt = jnp.asarray(np.arange(seq_len)[None, :] < lengths_b[:, None], jnp.float32)
    data = (old_logp_bt, base_logp_bt, advantages_b, mask_bt)

    def objective(terms):
        loss_sum, denom, kl_sum, kl_denom = terms
        return loss_sum / denom + 1e-1 * kl_sum / kl_denom

    terms_fn = jax.jit(lambda lp, *d: _policy_and_kl_terms(lp, *d, name=name, aggregation=aggregation))
    full_terms = terms_fn(logp_bt, *data)
    full_grad_bt = jax.jit(jax.grad(lambda lp, *d: objective(terms_fn(lp, *d))))(logp_bt, *data)

    # Micro-batches of uneven sizes: each contributes the gradients of its two sums (not of a ratio); the
    # sums and denominators accumulate and the division happens once at the end.
    sums_jacobian = jax.jit(jax.jacrev(lambda lp, *d: jnp.stack(terms_fn(lp, *d)[::2])))
    summed = [0.0] * 4
    grads = []
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        micro_data = [x[rows] for x in data]
        summed = [a + b for a, b in zip(summed, terms_fn(logp_bt[rows], *micro_data))]
        grads.append(sums_jacobian(logp_bt[rows], *micro_data))
    chex.assert_trees_all_close(tuple(summed), full_terms, rtol=1e-6, atol=1e-6)
    loss_denom, kl_denom = summed[1], summed[3]
    micro_grad_bt = jnp.concatenate([g[0] / loss_denom + 1e-1 * g[1] / kl_denom for g in grads])
    chex.assert_trees_all_close(micro_grad_bt, full_grad_bt, rtol=1e-6, atol=1e-7)
    expected_denom = 5.0 if aggregation == "seq_mean_token_mean" else float(lengths_b.sum())
    assert float(full_terms[1]) == expected_denom


def test_zero_variance_group_contributes_nothing():
    # Two problems × two rollouts; problem 1 is all-correct, so its rows have A = 0 and, with valid folded
    # into the mask, vanish from both the sum and the denominator.
    advantages_pg, valid_p = losses.group_advantages(jnp.array([[1.0, 0.0], [1.0, 1.0]]), eps=0.0)
    advantages_b = advantages_pg.reshape(-1)
    mask_bt = jnp.ones((4, 2)) * jnp.repeat(valid_p, 2)[:, None]
    logp_bt = jnp.array([[-1.0, -2.0], [-1.0, -1.0], [-5.0, -5.0], [-5.0, -5.0]])
    loss_sum, denom, _ = losses.cispo_loss(logp_bt, logp_bt, advantages_b, mask_bt)
    # Row 0: A = 1 → −(−1 − 2)/2 = 1.5; row 1: A = −1 → (−1 − 1)/2 = −1.
    chex.assert_trees_all_close((loss_sum, denom), (0.5, 2.0))


# ---------------------------------------------------------------------------------------------------------
# Validation and jit


def test_unknown_names_raise_clear_errors():
    ones_bt, ones_b = jnp.ones((1, 2)), jnp.ones((1,))
    with pytest.raises(ValueError, match=r"unknown policy loss 'grpo'.*cispo.*ppo_clip"):
        losses.get_policy_loss("grpo")
    with pytest.raises(ValueError, match=r"unknown aggregation 'mean'.*seq_mean_token_mean"):
        losses.cispo_loss(ones_bt, ones_bt, ones_b, ones_bt, aggregation="mean")
    with pytest.raises(ValueError, match=r"unknown aggregation"):
        losses.get_policy_loss("cispo", aggregation="sum")
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'.*k1.*k2.*k3"):
        losses.kl_penalty(ones_bt, ones_bt, ones_bt, estimator="k4")
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        losses.token_logprobs_from_logits(jnp.ones((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), temperature=0.0)
    with pytest.raises(ValueError, match=r"chunk_size"):
        losses.token_logprobs(jnp.ones((1, 2, 3)), jnp.ones((3, 4)), jnp.zeros((1, 2), jnp.int32), chunk_size=0)
    with pytest.raises(AssertionError):  # chex shape check at the boundary
        losses.cispo_loss(ones_bt, ones_bt, jnp.ones((2,)), ones_bt)


def test_losses_jit_with_static_options_and_traced_temperature():
    cispo = jax.jit(losses.cispo_loss, static_argnames=("aggregation",))
    loss_sum, denom, _ = cispo(LOGP_BT, CISPO_OLD_LOGP_BT, ADVANTAGES_B, MASK_BT, tau=4.0, aggregation="token_mean")
    chex.assert_trees_all_close((loss_sum, denom), (5.1, 5.0), atol=1e-5)
    # Temperature is traced: one compiled program serves every value, as in the sampler.
    logp_fn = jax.jit(losses.token_logprobs_from_logits)
    chex.assert_trees_all_close(
        logp_fn(HAND_LOGITS_BTV, HAND_TARGETS_BT, jnp.float32(2.0))[0, 0], math.log(0.5), atol=1e-6
    )
    chex.assert_trees_all_close(
        logp_fn(HAND_LOGITS_BTV, HAND_TARGETS_BT, jnp.float32(1.0))[0, 0], math.log(4 / 6), atol=1e-6
    )
    assert logp_fn._cache_size() == 1
