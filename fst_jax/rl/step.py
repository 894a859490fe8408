"""The slow-weight step: the jitted policy-gradient `update` and the coupled `fst_step`.

`update(state, base_params, rollouts, config)` is one optimizer step on a batch of scored rollouts:

    loss = Σ_mb policy_sum(mb) / Σ_mb denominator(mb)  +  kl_coef · Σ_mb kl_sum(mb) / Σ_mb denominator(mb)

accumulated over micro-batches of whole rows with `lax.scan` (sums, denominators and gradients added up,
divided once at the end, so any micro-batch size gives the full-batch gradient), per-token log-probs taken from
the model's final hidden state by `losses.token_logprobs` (chunked: no [B, T, V] logits when
`logprob_chunk_size` is set), KL(π_θ ‖ π_base) against a forward pass of the frozen base parameters.

`fst_step(state, population, batch, ...)` is the coupled step of one FST cycle: rollouts split evenly over the
population's prompts, sampled, scored on the host, normalised per problem over all G rollouts, then `update`.
A population of one prompt is the RL-only baseline.

Shape letters: B rows (responses), T tokens, P problems, G rollouts per problem, K prompts, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fst_jax import parallel
from fst_jax.rl import losses
from fst_jax.rl.rollouts import (Rollouts, build_rollouts, pad_rows, question_field, render_prompts,
                                 score_completions)

__all__ = ["RLConfig", "TrainState", "make_optimizer", "learning_rate_schedule", "compute_gradients", "update",
           "fst_step", "sampler_generate", "abstract_state", "lower_update", "rl_config_from_run"]


# ---------------------------------------------------------------------------------------------------------
# Configuration and state


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
    `enable_thinking` is passed to the chat template (None: the template's default). `sequence_length`: every
    batch is padded to this many tokens, so a run compiles one update program (None: each batch's own bucket).
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
        for field in ("rollouts_per_problem", "max_new_tokens"):
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


@flax.struct.dataclass
class TrainState:
    """Everything an RL run updates: a pytree (orbax-checkpointable) plus the model's static graphdef.

    `step`: optimizer updates applied (skipped updates do not count; it equals optax's count, so the
    learning-rate schedule reads it). `rng`: a raw uint32 PRNG key; fst_step splits it for each sampler call.
    `num_rollouts`: responses sampled so far (dropped groups included).
    """

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array
    num_rollouts: jax.Array
    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module | tuple[nnx.GraphDef, nnx.State], config: RLConfig | Mapping[str, Any],
               *, seed: int = 0) -> "TrainState":
        """A fresh state for `model` (or (graphdef, params)) with optimizer state laid out like the params.

        The params are *copied*: `update` donates the state, so the caller's arrays (typically also the frozen
        base copy) stay valid.
        """
        graphdef, params = nnx.split(model, nnx.Param) if isinstance(model, nnx.Module) else model
        leaves, treedef = jax.tree.flatten(params)
        abstract = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in leaves)
        initialize = _state_initializer(_program_config(RLConfig.from_config(config)), treedef, abstract)
        params, opt_state, step, rng, num_rollouts = initialize(params, np.uint32(seed % 2**32))
        return cls(params=params, opt_state=opt_state, step=step, rng=rng, num_rollouts=num_rollouts,
                   graphdef=graphdef)


@functools.lru_cache(maxsize=16)
def _state_initializer(config: RLConfig, treedef, abstract_leaves: tuple[jax.ShapeDtypeStruct, ...]):
    """A jitted (params, seed) → (copy of params, optimizer state, step, rng, num_rollouts), cached so that
    repeated creates compile once. Adam's moments get their parameter's sharding (jit would otherwise put the
    zeros on one device); the scalars are committed and replicated exactly as `update` returns them, so the
    first update of a fresh state and later ones share one compiled program."""
    tx = make_optimizer(config)
    abstract_params = jax.tree.unflatten(treedef, abstract_leaves)
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    replicated = _replicated_like(abstract_params)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), shardings,
                                          transform_non_params=lambda _: replicated)

    def init(params, seed):
        params = jax.tree.map(jnp.copy, params)
        zero = jnp.zeros((), jnp.int32)
        return params, tx.init(params), zero, jax.random.PRNGKey(seed), zero

    return jax.jit(init, out_shardings=(shardings, opt_shardings, replicated, replicated, replicated))


def _program_config(config: RLConfig) -> RLConfig:
    """`config` with the sampling-only fields at their defaults: they do not change the update's program, so
    they must not split the jit cache."""
    defaults = RLConfig()
    sampling_only = ("rollouts_per_problem", "max_new_tokens", "enable_thinking", "sequence_length")
    return dataclasses.replace(config, **{name: getattr(defaults, name) for name in sampling_only})


def _replicated_like(params):
    leaf = jax.tree.leaves(params)[0]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P())
    return sharding


def _mesh_of(params) -> jax.sharding.Mesh | None:
    """The mesh the params are laid out on (None for plain single-device arrays)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


# ---------------------------------------------------------------------------------------------------------
# Loss and gradients


def _shifted(rollouts: Rollouts):
    """Targets, masks and old log-probs for predicting token t+1 from position t (last position: no loss)."""
    shift = lambda x: jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
    return (shift(rollouts.input_ids), shift(rollouts.loss_mask).astype(jnp.float32),
            shift(rollouts.old_logprobs).astype(jnp.float32))


def _sequence_logprobs(graphdef, params, rollouts: Rollouts, targets_bt, config: RLConfig, with_entropy: bool):
    model = nnx.merge(graphdef, params)
    out = model.forward(rollouts.input_ids, attention_mask=rollouts.attention_mask, compute_logits=False)
    return losses.token_logprobs(out.last_hidden, model.unembed_matrix(), targets_bt,
                                 temperature=config.temperature, chunk_size=config.logprob_chunk_size,
                                 return_entropy=with_entropy)


def _policy_loss(config: RLConfig):
    options = ({"tau": config.tau} if config.loss == "cispo"
               else {"eps_low": config.eps_low, "eps_high": config.eps_high})
    return losses.get_policy_loss(config.loss, aggregation=config.aggregation, **options)


def _micro_batch_sums(params, base_params, rollouts: Rollouts, *, graphdef, config: RLConfig):
    """Gradient and summed statistics of one micro-batch; nothing divided yet (see module docstring)."""
    targets_bt, mask_bt, old_logp_bt = _shifted(rollouts)
    advantages_b = rollouts.advantages.astype(jnp.float32)
    base_logp_bt = None
    if base_params is not None:
        base_logp_bt = jax.lax.stop_gradient(
            _sequence_logprobs(graphdef, base_params, rollouts, targets_bt, config, with_entropy=False))
    policy_loss = _policy_loss(config)

    def objective(params):
        logp_bt, entropy_bt = _sequence_logprobs(graphdef, params, rollouts, targets_bt, config, True)
        policy_sum, denominator, stats = policy_loss(logp_bt, old_logp_bt, advantages_b, mask_bt)
        kl_sum = jnp.zeros((), jnp.float32)
        if base_logp_bt is not None:
            kl_sum, _ = losses.kl_penalty(logp_bt, base_logp_bt, mask_bt, estimator=config.kl_estimator,
                                          aggregation=config.aggregation)
        total = policy_sum + config.kl_coef * kl_sum
        num_tokens = stats.pop("num_tokens")
        sums = {"loss": total, "policy_loss": policy_sum, "kl": kl_sum, "denominator": denominator,
                "num_tokens": num_tokens, "num_rows": jnp.sum(jnp.any(mask_bt > 0, axis=1).astype(jnp.float32)),
                "entropy": jnp.sum(jnp.where(mask_bt > 0, jax.lax.stop_gradient(entropy_bt), 0.0))}
        # Token-mean statistics become token-weighted sums so micro-batches combine exactly; maxima stay maxima.
        for name, value in stats.items():
            sums[name] = value if name.endswith("_max") else value * num_tokens
        return total, sums

    grads, sums = jax.grad(objective, has_aux=True)(params)
    return grads, sums


def compute_gradients(params, base_params, rollouts: Rollouts, *, graphdef, config: RLConfig):
    """(gradient of the batch loss, metrics) with exact accumulation over micro-batches of whole rows.

    Rows are split into B / micro_batch_size consecutive micro-batches, each spread over the mesh's batch
    axes; a micro-batch without a single loss token (padding, dropped groups) is skipped by `lax.cond`.
    Traceable; `update` jits it. `base_params` None skips the KL term (allowed only when kl_coef = 0).
    """
    rollouts.check()
    num_rows = rollouts.input_ids.shape[0]
    micro = config.micro_batch_size or num_rows
    if num_rows % micro:
        raise ValueError(f"{num_rows} rollout rows do not split into micro-batches of {micro}")
    micro_batches = jax.tree.map(lambda x: x.reshape(num_rows // micro, micro, *x.shape[1:]), rollouts)
    micro_batches = jax.tree.map(_constrain_micro_batch, micro_batches)
    sums_fn = lambda p, b: _micro_batch_sums(p, base_params, b, graphdef=graphdef, config=config)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(sums_fn, params, jax.tree.map(lambda x: x[0], micro_batches)))

    def body(carry, batch):
        has_loss = jnp.any(batch.loss_mask[:, 1:] > 0)
        out = jax.lax.cond(has_loss, sums_fn, lambda p, b: zeros, params, batch)
        grads = jax.tree.map(jnp.add, carry[0], out[0])
        sums = {k: (jnp.maximum if k.endswith("_max") else jnp.add)(carry[1][k], v) for k, v in out[1].items()}
        return (grads, sums), None

    (grad_sums, sums), _ = jax.lax.scan(body, zeros, micro_batches)
    denominator = jnp.where(sums["denominator"] > 0, sums["denominator"], 1.0)
    tokens = jnp.maximum(sums["num_tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grad_sums)
    totals = ("loss", "policy_loss", "kl", "denominator", "num_tokens", "num_rows")
    metrics = {name: value if name.endswith("_max") else value / tokens
               for name, value in sums.items() if name not in totals}
    metrics.update({name: sums[name] / denominator for name in ("loss", "policy_loss", "kl")},
                   num_tokens=sums["num_tokens"], num_rows=sums["num_rows"], grad_norm=optax.tree.norm(grads))
    return grads, metrics


def _constrain_micro_batch(x):
    """[n, m, ...] with each micro-batch's m rows split over the batch axes (an all-to-all of the small
    rollout arrays, so that every device works on every micro-batch)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    axes = tuple(a for a in parallel.BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[1] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, P(None, axes, *([None] * (x.ndim - 2))))


def _update(state: TrainState, base_params, rollouts: Rollouts, config: RLConfig):
    grads, metrics = compute_gradients(state.params, base_params, rollouts, graphdef=state.graphdef, config=config)
    tx = make_optimizer(config)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    # A non-finite loss or gradient (or a batch with no loss token) must never reach the weights or Adam's
    # moments: keep the old state, report `skipped`. Selecting leaf by leaf keeps the donated buffers in place.
    apply = finite & (metrics["num_tokens"] > 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
    metrics.update(learning_rate=learning_rate_schedule(config)(state.step),
                   skipped=(~apply).astype(jnp.float32), nonfinite=(~finite).astype(jnp.float32))
    state = state.replace(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                          step=state.step + apply.astype(state.step.dtype))
    return state, metrics


_update_jit = jax.jit(_update, static_argnames=("config",), donate_argnames=("state",))


@functools.lru_cache(maxsize=16)
def _update_program(treedef, leaf_shardings: tuple):
    """The jitted update for a state laid out by `leaf_shardings`, with `out_shardings` stating that the new
    state keeps exactly that layout and the metrics are replicated: left to propagation, XLA may hand back a
    replicated (per-device full-size) copy of the params or moments."""
    state_shardings = jax.tree.unflatten(treedef, leaf_shardings)
    mesh = next(s.mesh for s in leaf_shardings if isinstance(s, NamedSharding))
    return jax.jit(_update, static_argnames=("config",), donate_argnames=("state",),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())))


def _program_for(state: TrainState):
    leaves, treedef = jax.tree.flatten(state)
    return _update_program(treedef, tuple(leaf.sharding for leaf in leaves))


def _pad_length(rollouts: Rollouts, length: int | None) -> Rollouts:
    """Right-pad every [B, T] array to `length` tokens (no attention, no loss): one update shape per run."""
    T = rollouts.input_ids.shape[1]
    if length is None or T == length:
        return rollouts
    if T > length:
        raise ValueError(f"rollouts of {T} tokens exceed the update's sequence_length {length}; raise "
                         "config.sampling.max_prompt_tokens or config.sampling.max_new_tokens")
    xp = np if isinstance(rollouts.input_ids, np.ndarray) else jnp
    pad = lambda x: x if x.ndim == 1 else xp.pad(x, [(0, 0), (0, length - T)])  # noqa: E731
    return jax.tree.map(pad, rollouts)


def abstract_state(graphdef: nnx.GraphDef, abstract_params: nnx.State, config: RLConfig) -> TrainState:
    """The TrainState `TrainState.create` makes for params of these shapes and shardings, as ShapeDtypeStructs
    (nothing allocated): what the dry run lowers the update with."""
    leaves, treedef = jax.tree.flatten(abstract_params)
    initialize = _state_initializer(_program_config(config), treedef, tuple(leaves))
    params, opt_state, step, rng, num_rollouts = jax.eval_shape(initialize, abstract_params, np.uint32(0))
    return TrainState(params=params, opt_state=opt_state, step=step, rng=rng, num_rollouts=num_rollouts,
                      graphdef=graphdef)


def lower_update(state: TrainState, base_params, rollouts: Rollouts, config: RLConfig):
    """Lower (without arrays) the program `update` runs for this state, base and padded rollout shape: the
    same jitted function, static config and shardings, so compiling it fills the cache `update` hits."""
    config = _program_config(RLConfig.from_config(config))
    mesh = _mesh_of(state.params)
    with jax.set_mesh(mesh):
        return _program_for(state).lower(state, base_params, rollouts, config)


def rl_config_from_run(config, **overrides) -> RLConfig:
    """`RLConfig.from_config(config)` of a whole run config, with `overrides` (e.g. the planned
    `sequence_length`) replacing fields."""
    return dataclasses.replace(RLConfig.from_config(config), **overrides)


def update(state: TrainState, base_params, rollouts: Rollouts,
           config: RLConfig | Mapping[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `rollouts`; returns (new state, metrics as device scalars).

    The jitted core donates `state` (its buffers are reused: do not touch the old state afterwards) and is
    compiled once per (config, rollout shape, graphdef). Rollouts are padded with empty rows to a multiple of
    micro_batch_size × the mesh's batch size and placed with `parallel.shard_batch` on the params' mesh (the
    mesh of their NamedShardings; `base_params` must be laid out the same way, e.g. both by
    `parallel.param_shardings(..., TRAIN_RULES)`).
    A NaN/inf loss or gradient is never applied: the state is returned unchanged (step not advanced) and
    `metrics["skipped"]` and `metrics["nonfinite"]` are 1.

    Metrics: loss, policy_loss, kl (to the base), entropy (token mean), importance_weight_mean/_max,
    truncated_fraction (CISPO: ρ > τ) or clip_fraction/_low/_high (PPO), grad_norm (before clipping),
    learning_rate (of this update), num_tokens, num_rows, skipped, nonfinite. Token statistics are over the
    loss tokens (response tokens of kept groups) and read 0 when there are none.
    """
    config = RLConfig.from_config(config)
    if base_params is None and config.kl_coef > 0:
        raise ValueError(f"update needs base_params for the KL term (kl_coef = {config.kl_coef}); "
                         "pass the frozen base parameters, or set kl_coef = 0")
    if base_params is not None and _shares_buffers(state.params, base_params):
        raise ValueError("base_params share buffers with state.params, which update donates; build the state "
                         "with TrainState.create (it copies the params) or pass a separate base copy")
    rollouts.check()
    mesh = _mesh_of(state.params)
    multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
    if config.micro_batch_size is not None and config.micro_batch_size % multiple:
        raise ValueError(f"micro_batch_size {config.micro_batch_size} must be a multiple of the mesh's batch "
                         f"axes (data × fsdp = {multiple})")
    multiple = config.micro_batch_size or multiple
    rollouts = pad_rows(rollouts, -(-rollouts.input_ids.shape[0] // multiple) * multiple)
    rollouts = _pad_length(rollouts, config.sequence_length)
    config = _program_config(config)
    if mesh is None:
        return _update_jit(state, base_params, rollouts, config)
    with jax.set_mesh(mesh):
        rollouts = parallel.shard_batch(rollouts, mesh) if isinstance(rollouts.input_ids, np.ndarray) else rollouts
        return _program_for(state)(state, base_params, rollouts, config)


def _shares_buffers(a, b) -> bool:
    ids = {id(x) for x in jax.tree.leaves(a)}
    return any(id(x) in ids for x in jax.tree.leaves(b))


# ---------------------------------------------------------------------------------------------------------
# The coupled step


def sampler_generate(graphdef: nnx.GraphDef, params: nnx.State, prompts: Sequence[Sequence[int]], **kwargs):
    """Default `generate` for fst_step: `fst_jax.sampling.Sampler` on the params' mesh (sampling layout)."""
    from fst_jax.sampling import Sampler

    return Sampler((graphdef, params), mesh=_mesh_of(params)).generate(prompts, **kwargs)


def fst_step(
    state: TrainState,
    prompt_population: Sequence[str],
    batch: Sequence[Mapping[str, Any]],
    *,
    tokenizer,
    reward_fn: Callable[[Mapping[str, Any], str], float],
    base_params,
    config: RLConfig | Mapping[str, Any],
    generate: Callable[..., Any] = sampler_generate,
    user_message: Callable[[Mapping[str, Any]], str] = question_field,
    stop_token_ids: Sequence[int] | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """One coupled FST step: sample with the population, score, and update the weights.

    For each problem in `batch`, its G = config.rollouts_per_problem rollouts are split evenly over the K
    prompts of `prompt_population` (G/K each, in population order — not random): the chat
    [system = prompt, user = user_message(problem)] is rendered with the tokenizer's template and sampled
    G/K times at config.temperature by `generate(graphdef, params, prompts, max_new_tokens=, temperature=,
    seed=, stop_token_ids=, num_samples=, pad_id=)` (a `SampleOutput`; default: the jitted sampler). Each
    completion, decoded without special tokens, is scored by `reward_fn(problem, text)` on the host (a float,
    or a `tasks.Score`: `reward_fn=task.score, user_message=task.format_problem` plugs in a task). The
    advantage of each rollout is normalised over all G rollouts of its problem whatever prompt produced it;
    problems whose G rewards are all equal carry no signal and are dropped. Then one `update`.

    A population of one prompt is the RL-only baseline; nothing else changes.

    Raises ValueError for an empty population or batch, K not dividing G, or a NaN/inf reward (naming the
    problem). Returns (state, metrics as Python floats): reward_mean, reward_std, reward_prompt_{k},
    response_length, response_truncated_fraction (hit max_new_tokens), groups_kept_fraction, num_rollouts
    (so far), step, and every `update` metric (KL to base, entropy, importance weights, grad_norm,
    learning_rate, skipped, ...).
    """
    config = RLConfig.from_config(config)
    population = list(prompt_population) if not isinstance(prompt_population, str) else None
    if population is None:
        raise ValueError("prompt_population must be a list of prompts, not one string; wrap it: [prompt]")
    if not population:
        raise ValueError("fst_step: the prompt population is empty; the RL-only baseline is a population of one")
    group = config.rollouts_per_problem
    if group % len(population):
        raise ValueError(f"fst_step: the population has K = {len(population)} prompts, which does not divide "
                         f"rollouts_per_problem G = {group}; each prompt gets G/K rollouts of every problem")
    if len(batch) == 0:
        raise ValueError("fst_step: the batch of problems is empty")
    per_prompt, num_problems = group // len(population), len(batch)

    prompt_ids = render_prompts(tokenizer, population, batch, user_message=user_message,
                                enable_thinking=config.enable_thinking)
    if stop_token_ids is None:
        stop_token_ids = [t for t in (tokenizer.eos_token_id,) if t is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng, sample_key = jax.random.split(state.rng)
    seed = int(jax.random.randint(sample_key, (), 0, np.iinfo(np.int32).max))
    samples = generate(state.graphdef, state.params, prompt_ids, max_new_tokens=config.max_new_tokens,
                       temperature=config.temperature, seed=seed, stop_token_ids=list(stop_token_ids),
                       num_samples=per_prompt, pad_id=pad_id)
    if len(samples.tokens) != num_problems * group:
        raise ValueError(f"generate returned {len(samples.tokens)} completions for {num_problems} problems × "
                         f"{group} rollouts")
    rewards_pg = score_completions(tokenizer, batch, samples.tokens, reward_fn, per_prompt=per_prompt)
    advantages_pg, valid_p = losses.group_advantages(jnp.asarray(rewards_pg, jnp.float32))
    advantages_pg, valid_p = np.asarray(advantages_pg), np.asarray(valid_p)

    rollouts = build_rollouts([prompt_ids[row // per_prompt] for row in range(num_problems * group)],
                              samples.tokens, samples.logprobs, advantages_pg.reshape(-1),
                              keep=np.repeat(valid_p, group), pad_id=pad_id)
    state = state.replace(rng=rng, num_rollouts=state.num_rollouts + num_problems * group)
    state, update_metrics = update(state, base_params, rollouts, config)

    lengths = np.array([len(t) for t in samples.tokens], np.float64)
    rewards_pkg = rewards_pg.reshape(num_problems, len(population), per_prompt)
    metrics = {name: float(value) for name, value in jax.device_get(update_metrics).items()}
    metrics.update(
        reward_mean=float(rewards_pg.mean()), reward_std=float(rewards_pg.std()),
        **{f"reward_prompt_{k}": float(rewards_pkg[:, k].mean()) for k in range(len(population))},
        response_length=float(lengths.mean()),
        response_truncated_fraction=float(np.mean([not f for f in samples.finished])),
        groups_kept_fraction=float(valid_p.mean()),
        num_rollouts=float(state.num_rollouts), step=float(state.step))
    return state, metrics
