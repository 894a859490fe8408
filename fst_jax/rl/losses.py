"""Policy-gradient losses for the slow weights: advantages, per-token log-probs, CISPO, PPO-clip, KL.

Every function is pure and jittable (string options are static Python values). Losses return
`(loss_sum, denominator[, stats])` rather than a mean: summing sums and denominators over micro-batches and
dividing once at the end gives exactly the full-batch loss and gradient (see `aggregate`).

Shape letters: P problems, G rollouts per problem, B responses (rows), T response tokens, V vocab, D model
width. Log-probs are float32 natural logs; masks are 1 on response tokens and 0 on padding (and on rows that
should not count, e.g. rows of zero-variance groups).
"""

from __future__ import annotations

import functools
from typing import Callable

import chex
import jax
import jax.numpy as jnp

AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


def _at_least_f32(dtype) -> jnp.dtype:
    # bf16/f16 inputs are computed in float32; float64 stays float64 (finite-difference tests run in x64).
    return jnp.promote_types(dtype, jnp.float32)


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


# ---------------------------------------------------------------------------------------------------------
# Advantages


def group_advantages(
    rewards_pg: jax.Array, eps: float = 1e-6, *, min_std: float = 1e-6
) -> tuple[jax.Array, jax.Array]:
    """Group-normalised advantages, one group per problem over all its G rollouts.

        A_pg = (r_pg − mean_g r_pg) / (std_g r_pg + eps)

    std is the population standard deviation (ddof = 0). The G rollouts of a problem form one group whatever
    prompt of the population each used (RECIPE §Cycle), so prompts compete on the same baseline.

    A group whose std ≤ `min_std` (all rollouts scored alike, e.g. all right or all wrong) carries no learning
    signal: `valid_p` is False and its advantages are 0. A group containing NaN is also marked invalid so a
    NaN never reaches the loss; callers check rewards on the host first to report such errors. To drop invalid
    groups from the *denominator* as well, fold `valid_p` into the token mask of their rows.

    Returns (advantages_pg in at least float32, valid_p bool).
    """
    chex.assert_rank(rewards_pg, 2)
    rewards_pg = rewards_pg.astype(_at_least_f32(rewards_pg.dtype))
    mean_p = jnp.mean(rewards_pg, axis=1, keepdims=True)
    std_p = jnp.std(rewards_pg, axis=1, keepdims=True)
    valid_p = (std_p > min_std)[:, 0]  # False for NaN too: NaN > x is False
    advantages_pg = (rewards_pg - mean_p) / (std_p + eps)
    advantages_pg = jnp.where(valid_p[:, None], advantages_pg, 0.0)
    return advantages_pg, valid_p


# ---------------------------------------------------------------------------------------------------------
# Per-token log-probs


def _logprobs_and_entropy(
    logits_btv: jax.Array, targets_bt: jax.Array, temperature, with_entropy: bool
) -> tuple[jax.Array, jax.Array | None]:
    # The sampler draws from softmax(logits / temperature); log-probs must be of that same distribution
    # for the importance ratio π_θ/π_old to be 1 on-policy.
    logits_btv = logits_btv.astype(_at_least_f32(logits_btv.dtype)) / temperature
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logp_bt = target_logit_bt - lse_bt
    if not with_entropy:
        return logp_bt, None
    # H = −Σ_v p_v log p_v. Summing p·(z − lse) rather than lse − Σ p·z avoids cancelling two O(|z|) terms,
    # which loses ~1e-5 absolute in float32 on peaked (low-entropy) distributions.
    log_probs_btv = logits_btv - lse_bt[..., None]
    entropy_bt = -jnp.einsum("btv,btv->bt", jnp.exp(log_probs_btv), log_probs_btv)
    return logp_bt, entropy_bt


def _check_temperature(temperature) -> None:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")


def token_logprobs_from_logits(
    logits_btv: jax.Array, targets_bt: jax.Array, temperature: float | jax.Array = 1.0
) -> jax.Array:
    """Per-token log-probs log π(y_t) of `targets_bt` under softmax(logits / temperature).

        log π(y_t) = z_{t, y_t} − logsumexp_v z_{t, v},     z = logits / temperature   (≥ float32)

    Picks the target logit with take_along_axis instead of building a full log-softmax tensor.
    """
    chex.assert_rank(logits_btv, 3)
    chex.assert_shape(targets_bt, logits_btv.shape[:2])
    _check_temperature(temperature)
    logp_bt, _ = _logprobs_and_entropy(logits_btv, targets_bt, temperature, with_entropy=False)
    return logp_bt


def token_logprobs(
    hidden_btd: jax.Array,
    unembed_dv: jax.Array,
    targets_bt: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
):
    """Per-token log-probs (and optionally entropies) straight from final hidden states.

        z_t = (h_t · W_unembed) / temperature,  log π(y_t) = z_{t, y_t} − logsumexp_v z_{t, v},
        H_t = − Σ_v π_v(t) log π_v(t),   π(t) = softmax(z_t)

    With `chunk_size` set, the sequence is padded to a multiple of it and processed chunk by chunk under
    `lax.map`, each chunk rematerialised (`jax.checkpoint`) so that neither the forward nor the backward pass
    holds more than one [B, chunk, V] float32 logits block — at Qwen3's V = 151,936 the full [B, T, V] tensor is
    what would dominate training memory. The matmul accumulates in (at least) float32 whatever the input dtype.
    Gradients flow to `hidden_btd` and `unembed_dv`.

    Returns logp_bt, or (logp_bt, entropy_bt) when `return_entropy`.
    """
    chex.assert_rank([hidden_btd, unembed_dv, targets_bt], [3, 2, 2])
    batch, seq_len, width = hidden_btd.shape
    chex.assert_shape(unembed_dv, (width, None))
    chex.assert_shape(targets_bt, (batch, seq_len))
    _check_temperature(temperature)

    logits_dtype = _at_least_f32(jnp.result_type(hidden_btd, unembed_dv))

    def chunk_logprobs(hidden_bcd, targets_bc):
        logits_bcv = jnp.einsum("bcd,dv->bcv", hidden_bcd, unembed_dv, preferred_element_type=logits_dtype)
        logp_bc, entropy_bc = _logprobs_and_entropy(logits_bcv, targets_bc, temperature, return_entropy)
        return (logp_bc, entropy_bc) if return_entropy else (logp_bc, jnp.zeros_like(logp_bc))

    if chunk_size is None:
        logp_bt, entropy_bt = chunk_logprobs(hidden_btd, targets_bt)
    else:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
        num_chunks = -(-seq_len // chunk_size)
        pad = num_chunks * chunk_size - seq_len
        hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))  # token 0 on padding; sliced off below
        # [B, n·c, ·] → [n, B, c, ·] so lax.map walks the chunks.
        hidden_nbcd = hidden_btd.reshape(batch, num_chunks, chunk_size, width).swapaxes(0, 1)
        targets_nbc = targets_bt.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)
        # Without checkpointing, autodiff of the loop would stack every chunk's logits as residuals,
        # rebuilding the [B, T, V] tensor we are avoiding; with it, the backward recomputes one chunk at a time.
        body = jax.checkpoint(lambda xs: chunk_logprobs(*xs))
        logp_nbc, entropy_nbc = jax.lax.map(body, (hidden_nbcd, targets_nbc))
        logp_bt = logp_nbc.swapaxes(0, 1).reshape(batch, -1)[:, :seq_len]
        entropy_bt = entropy_nbc.swapaxes(0, 1).reshape(batch, -1)[:, :seq_len]
    return (logp_bt, entropy_bt) if return_entropy else logp_bt


# ---------------------------------------------------------------------------------------------------------
# Aggregation


def aggregate(
    per_token_bt: jax.Array, mask_bt: jax.Array, aggregation: str = "seq_mean_token_mean"
) -> tuple[jax.Array, jax.Array]:
    """Reduce a per-token quantity ℓ_bt to (sum, denominator); the aggregated value is sum / denominator.

    "seq_mean_token_mean" (default; RECIPE §Slow weights): mean over each response's tokens, then over responses
        sum = Σ_b [n_b > 0] · (Σ_t m_bt ℓ_bt) / n_b,    denominator = Σ_b [n_b > 0],    n_b = Σ_t m_bt
    "token_mean": one mean over all tokens of the batch
        sum = Σ_bt m_bt ℓ_bt,                          denominator = Σ_bt m_bt

    Exact micro-batching: split the batch *by rows* (whole responses), add up each micro-batch's sums and
    denominators, divide once. For "seq_mean_token_mean" each row is normalised by its own token count n_b,
    which is complete inside the micro-batch that holds the row — so do not split a response across
    micro-batches along T. Rows with no unmasked token (padding rows, dropped groups) count in neither.
    """
    _check_aggregation(aggregation)
    chex.assert_rank(per_token_bt, 2)
    chex.assert_equal_shape([per_token_bt, mask_bt])
    mask_bt = mask_bt.astype(_at_least_f32(per_token_bt.dtype))
    # where() rather than multiply so that inf/NaN on padding positions cannot leak in as 0·inf = NaN.
    masked_bt = jnp.where(mask_bt > 0, per_token_bt * mask_bt, 0.0)
    if aggregation == "token_mean":
        return jnp.sum(masked_bt), jnp.sum(mask_bt)
    tokens_b = jnp.sum(mask_bt, axis=1)
    has_tokens_b = tokens_b > 0
    row_mean_b = jnp.sum(masked_bt, axis=1) / jnp.where(has_tokens_b, tokens_b, 1.0)
    return jnp.sum(jnp.where(has_tokens_b, row_mean_b, 0.0)), jnp.sum(has_tokens_b.astype(mask_bt.dtype))


def _check_policy_inputs(logp_bt, old_logp_bt, advantages_b, mask_bt) -> None:
    chex.assert_rank([logp_bt, advantages_b], [2, 1])
    chex.assert_equal_shape([logp_bt, old_logp_bt, mask_bt])
    chex.assert_shape(advantages_b, logp_bt.shape[:1])


def _masked_mean_max(values_bt, mask_bt) -> tuple[jax.Array, jax.Array, jax.Array]:
    mask_bt = mask_bt > 0
    num_tokens = jnp.sum(mask_bt.astype(jnp.float32))
    mean = jnp.sum(jnp.where(mask_bt, values_bt, 0.0)) / jnp.maximum(num_tokens, 1.0)
    maximum = jnp.max(jnp.where(mask_bt, values_bt, -jnp.inf), initial=-jnp.inf)
    return mean, jnp.where(num_tokens > 0, maximum, 0.0), num_tokens


def _importance_ratio(logp_bt, old_logp_bt, mask_bt) -> jax.Array:
    # ρ = π_θ / π_old per token; forced to 1 on padding so exp() of garbage log-probs cannot overflow there.
    log_ratio_bt = jnp.where(mask_bt > 0, logp_bt - old_logp_bt, 0.0)
    return jnp.exp(log_ratio_bt)


# ---------------------------------------------------------------------------------------------------------
# Policy losses


def cispo_loss(
    logp_bt: jax.Array,
    old_logp_bt: jax.Array,
    advantages_b: jax.Array,
    mask_bt: jax.Array,
    *,
    tau: float = 4.0,
    aggregation: str = "seq_mean_token_mean",
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """CISPO (MiniMax-M1): REINFORCE with a stop-gradient, upper-truncated importance weight.

        ℓ_t = − sg(min(ρ_t, τ)) · A_b · log π_θ(y_t),      ρ_t = exp(log π_θ(y_t) − log π_old(y_t))

    No lower bound and no clipping of the gradient itself: every token keeps a gradient
    ∂ℓ_t/∂log π_θ(y_t) = − min(ρ_t, τ) · A_b, unlike PPO-clip which zeroes it outside the trust region.

    Returns (loss_sum, denominator, stats); loss = loss_sum / denominator (see `aggregate`). stats (over
    masked tokens): importance_weight_mean, importance_weight_max, truncated_fraction (ρ > τ), num_tokens.
    """
    _check_policy_inputs(logp_bt, old_logp_bt, advantages_b, mask_bt)
    ratio_bt = jax.lax.stop_gradient(_importance_ratio(logp_bt, old_logp_bt, mask_bt))
    weight_bt = jnp.minimum(ratio_bt, tau)
    per_token_bt = -weight_bt * advantages_b[:, None] * logp_bt
    loss_sum, denominator = aggregate(per_token_bt, mask_bt, aggregation)
    ratio_mean, ratio_max, num_tokens = _masked_mean_max(ratio_bt, mask_bt)
    truncated, _, _ = _masked_mean_max((ratio_bt > tau).astype(jnp.float32), mask_bt)
    stats = dict(
        importance_weight_mean=ratio_mean,
        importance_weight_max=ratio_max,
        truncated_fraction=truncated,
        num_tokens=num_tokens,
    )
    return loss_sum, denominator, stats


def ppo_clip_loss(
    logp_bt: jax.Array,
    old_logp_bt: jax.Array,
    advantages_b: jax.Array,
    mask_bt: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "seq_mean_token_mean",
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """PPO / GRPO clipped surrogate with asymmetric range (ε_high > ε_low is DAPO's "clip-higher").

        ℓ_t = − min(ρ_t · A_b, clip(ρ_t, 1 − ε_low, 1 + ε_high) · A_b),   ρ_t = π_θ(y_t) / π_old(y_t)

    Returns (loss_sum, denominator, stats); stats (over masked tokens): importance_weight_mean,
    importance_weight_max, clip_fraction (tokens whose clipped term is active, i.e. zero gradient),
    clip_low_fraction (ρ < 1 − ε_low with A < 0), clip_high_fraction (ρ > 1 + ε_high with A > 0), num_tokens.
    """
    _check_policy_inputs(logp_bt, old_logp_bt, advantages_b, mask_bt)
    ratio_bt = _importance_ratio(logp_bt, old_logp_bt, mask_bt)
    advantages_bt = advantages_b[:, None]
    unclipped_bt = ratio_bt * advantages_bt
    clipped_bt = jnp.clip(ratio_bt, 1.0 - eps_low, 1.0 + eps_high) * advantages_bt
    per_token_bt = -jnp.minimum(unclipped_bt, clipped_bt)
    loss_sum, denominator = aggregate(per_token_bt, mask_bt, aggregation)

    ratio_bt = jax.lax.stop_gradient(ratio_bt)
    ratio_mean, ratio_max, num_tokens = _masked_mean_max(ratio_bt, mask_bt)
    clip_low_bt = (ratio_bt < 1.0 - eps_low) & (advantages_bt < 0)
    clip_high_bt = (ratio_bt > 1.0 + eps_high) & (advantages_bt > 0)
    frac = lambda x_bt: _masked_mean_max(x_bt.astype(jnp.float32), mask_bt)[0]
    stats = dict(
        importance_weight_mean=ratio_mean,
        importance_weight_max=ratio_max,
        clip_fraction=frac(clip_low_bt | clip_high_bt),
        clip_low_fraction=frac(clip_low_bt),
        clip_high_fraction=frac(clip_high_bt),
        num_tokens=num_tokens,
    )
    return loss_sum, denominator, stats


PolicyLoss = Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
POLICY_LOSSES: dict[str, PolicyLoss] = {"cispo": cispo_loss, "ppo_clip": ppo_clip_loss}


def get_policy_loss(name: str, **options) -> PolicyLoss:
    """The policy loss registered as `name`, with keyword `options` (tau, eps_low, aggregation, …) bound."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; expected one of {sorted(POLICY_LOSSES)}")
    if "aggregation" in options:
        _check_aggregation(options["aggregation"])
    return functools.partial(POLICY_LOSSES[name], **options)


# ---------------------------------------------------------------------------------------------------------
# KL to the frozen base model


def _kl_k1(log_ratio_bt):
    return -log_ratio_bt


def _kl_k2(log_ratio_bt):
    return 0.5 * jnp.square(log_ratio_bt)


def _kl_k3(log_ratio_bt):
    # expm1 keeps precision when the policies are close (log_ratio ≈ 0), where k3 ≈ ½ log_ratio².
    return jnp.expm1(log_ratio_bt) - log_ratio_bt


# Each maps log_ratio = log π_base − log π_θ (per sampled token) to a per-token KL(π_θ ‖ π_base) estimate.
KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(
    logp_bt: jax.Array,
    base_logp_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    estimator: str = "k3",
    aggregation: str = "seq_mean_token_mean",
) -> tuple[jax.Array, jax.Array]:
    """Per-token estimate of KL(π_θ ‖ π_base) on tokens sampled from π_θ (Schulman's estimators).

        k1 = log π_θ − log π_base
        k2 = ½ (log π_θ − log π_base)²
        k3 = exp(log π_base − log π_θ) − (log π_base − log π_θ) − 1      (unbiased, always ≥ 0; the default)

    Returns (kl_sum, denominator) with the same aggregation and micro-batching rules as the policy losses.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {sorted(KL_ESTIMATORS)}")
    chex.assert_rank(logp_bt, 2)
    chex.assert_equal_shape([logp_bt, base_logp_bt, mask_bt])
    log_ratio_bt = jnp.where(mask_bt > 0, base_logp_bt - logp_bt, 0.0)
    return aggregate(KL_ESTIMATORS[estimator](log_ratio_bt), mask_bt, aggregation)
