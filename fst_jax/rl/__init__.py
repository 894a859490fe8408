"""Slow weights: the policy-gradient side of FST (losses here; the jitted update lives in rl/step.py)."""

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
]
