"""Slow weights: the policy-gradient side of FST.

    config.py        RLConfig, the learning-rate schedule, the optax chain
    losses.py        CISPO / PPO-clip, KL estimators, aggregations, group advantages (pure functions)
    rollouts.py      rendering prompts, scoring completions, the padded Rollouts batch
    train_state.py   TrainState (what the update changes) and its abstract twin for the dry run
    policy_update.py the update (length-bucketed micro-batches, loss and gradient, optax step, skip if non-finite)
    coupled_step.py  fst_step on the host: render, sample, score, advantages, update
"""

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
from fst_jax.rl.rollouts import (
    Rollouts,
    build_rollouts,
    length_bucket,
    pad_rows,
    question_field,
    render_prompts,
    score_completions,
)
from fst_jax.rl.config import RLConfig, learning_rate_schedule, make_optimizer, rl_config_from_run
from fst_jax.rl.coupled_step import fst_step, sampler_generate
from fst_jax.rl.policy_update import bucketed_gradients, compute_gradients, lower_update, update
from fst_jax.rl.train_state import TrainState, abstract_state

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
    "bucketed_gradients",
    "build_rollouts",
    "compute_gradients",
    "fst_step",
    "learning_rate_schedule",
    "length_bucket",
    "make_optimizer",
    "pad_rows",
    "question_field",
    "render_prompts",
    "sampler_generate",
    "score_completions",
    "update",
    "abstract_state",
    "lower_update",
    "rl_config_from_run",
]
