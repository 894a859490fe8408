"""The slow-weight step's configuration and optimizer: `RLConfig` (every knob of the update and of fst_step's
sampling, read from a run config through `RLConfig.from_config`), the learning-rate schedule and the optax
chain."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from fst_jax.rl import losses

__all__ = ["RLConfig", "learning_rate_schedule", "make_optimizer", "rl_config_from_run"]


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Knobs of the slow-weight step (defaults: the paper's slow-weight recipe).

    Optimizer: AdamW(learning_rate, b1, b2, weight_decay) after an optional clip to `max_grad_norm` (None =
    off); the learning rate warms up linearly over `warmup_steps` updates (lr·(n+1)/warmup at update n), then
    stays constant. Loss: `loss` ("cispo" with truncation `tau`, or "ppo_clip" with `eps_low`/`eps_high`),
    plus `kl_coef` · KL(π_θ ‖ π_base) with estimator `kl_estimator`, aggregated by `aggregation`.
    Memory: `micro_batch_size` rows per forward/backward (None = the whole batch at once; must be a
    multiple of the mesh's data × fsdp size), `logprob_chunk_size` tokens per logits block (None = full
    [B, T, V] logits). Sampling (fst_step): `rollouts_per_problem` (G) responses per problem at `temperature`
    (also the temperature of the update's log-probs, so ratios are 1 on-policy), up to `max_new_tokens` each;
    `enable_thinking` is passed to the chat template (None: the template's default). Lengths: the update
    computes each micro-batch at the smallest of `num_length_buckets` evenly spaced lengths up to
    `sequence_length` that holds its longest row, so a run compiles that many gradient programs (a longer
    rollout is an error); `sequence_length` None: each micro-batch at its own `rollouts.length_bucket`.
    """

    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float | None = None
    loss: str = "cispo"
    tau: float = 4.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 1e-3
    kl_estimator: str = "k3"
    aggregation: str = "seq_mean_token_mean"
    micro_batch_size: int | None = None
    logprob_chunk_size: int | None = None
    temperature: float = 1.0
    rollouts_per_problem: int = 8
    max_new_tokens: int = 1024
    enable_thinking: bool | None = None
    sequence_length: int | None = None
    num_length_buckets: int = 10

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"RLConfig.{field} {why}, got {getattr(self, field)!r}")

        if self.loss not in losses.POLICY_LOSSES:
            bad("loss", f"must be one of {sorted(losses.POLICY_LOSSES)}")
        if self.kl_estimator not in losses.KL_ESTIMATORS:
            bad("kl_estimator", f"must be one of {sorted(losses.KL_ESTIMATORS)}")
        if self.aggregation not in losses.AGGREGATIONS:
            bad("aggregation", f"must be one of {losses.AGGREGATIONS}")
        for field in ("learning_rate", "tau", "temperature"):
            if not (math.isfinite(getattr(self, field)) and getattr(self, field) > 0):
                bad(field, "must be a positive number")
        for field in ("weight_decay", "eps_low", "eps_high", "kl_coef"):
            if not (math.isfinite(getattr(self, field)) and getattr(self, field) >= 0):
                bad(field, "must be a number ≥ 0")
        for field in ("b1", "b2"):
            if not 0 <= getattr(self, field) < 1:
                bad(field, "must be in [0, 1)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad("max_grad_norm", "must be positive or None (off)")
        for field in ("micro_batch_size", "logprob_chunk_size", "sequence_length"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, int) and value > 0):
                bad(field, "must be a positive integer or None")
        for field in ("rollouts_per_problem", "max_new_tokens", "num_length_buckets"):
            if not (isinstance(getattr(self, field), int) and getattr(self, field) > 0):
                bad(field, "must be a positive integer")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            bad("warmup_steps", "must be an integer ≥ 0")

    @classmethod
    def from_config(cls, config: "RLConfig | Mapping[str, Any]") -> "RLConfig":
        """An RLConfig from itself, a dict or an `ml_collections.ConfigDict` of its fields (unknown keys are
        errors), or a whole run config (`fst_jax.config.default_config()`: `rl.*` plus the sampling
        temperature and length, G and the chat-template switch)."""
        if isinstance(config, cls):
            return config
        if "rl" in config and "cycle" in config:  # a run config
            c = config
            names = {f.name for f in dataclasses.fields(cls)}
            if unread := sorted(set(c.rl) - names):
                raise ValueError(f"config.rl has field(s) {unread} that RLConfig does not define; add them there")
            return cls(
                **{f.name: c.rl[f.name] for f in dataclasses.fields(cls) if f.name in c.rl},
                temperature=c.sampling.temperature, rollouts_per_problem=c.cycle.rollouts_per_problem,
                max_new_tokens=c.sampling.max_new_tokens, enable_thinking=c.model.enable_thinking)
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown RL config field(s) {unknown}; the fields are {sorted(known)}")
        return cls(**values)


def learning_rate_schedule(config: RLConfig) -> Callable[[jax.Array], jax.Array]:
    """lr(n) = learning_rate · min(1, (n + 1) / warmup_steps) for the n-th update (0-based): the first update
    already moves the weights, the (warmup_steps)-th and later use the full rate."""
    lr, warmup = config.learning_rate, config.warmup_steps
    if warmup == 0:
        return lambda count: jnp.asarray(lr, jnp.float32)
    return lambda count: lr * jnp.minimum(1.0, (jnp.asarray(count, jnp.float32) + 1.0) / warmup)


def make_optimizer(config: RLConfig | Mapping[str, Any]) -> optax.GradientTransformation:
    """optax: [clip_by_global_norm(max_grad_norm)] → AdamW(schedule, b1, b2, weight_decay).

    Weight decay (0 by default) applies to every parameter, norms included.
    """
    config = RLConfig.from_config(config)
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                        weight_decay=config.weight_decay)
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


def rl_config_from_run(config, **overrides) -> RLConfig:
    """`RLConfig.from_config(config)` of a whole run config, with `overrides` (e.g. the planned
    `sequence_length`) replacing fields."""
    return dataclasses.replace(RLConfig.from_config(config), **overrides)
