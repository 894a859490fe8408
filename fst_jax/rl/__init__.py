"""Slow weights: the policy-gradient side of FST (losses; rollout batches; the jitted update and fst_step)."""

from fst_jax.rl.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    cispo_loss,
    get_policy_loss,
    group_advantages,
    kl_penalty,
    ppo_clip_loss,
    token_logprobs,
    token_logprobs_from_logits,
)
from fst_jax.rl.rollouts import Rollouts, build_rollouts, length_bucket, pad_rows
from fst_jax.rl.step import (
    RLConfig,
    TrainState,
    compute_gradients,
    fst_step,
    learning_rate_schedule,
    make_optimizer,
    sampler_generate,
    update,
)

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "aggregate",
    "cispo_loss",
    "get_policy_loss",
    "group_advantages",
    "kl_penalty",
    "ppo_clip_loss",
    "token_logprobs",
    "token_logprobs_from_logits",
    "RLConfig",
    "Rollouts",
    "TrainState",
    "build_rollouts",
    "compute_gradients",
    "fst_step",
    "learning_rate_schedule",
    "length_bucket",
    "make_optimizer",
    "pad_rows",
    "sampler_generate",
    "update",
]
