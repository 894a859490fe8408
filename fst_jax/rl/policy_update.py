"""The jitted policy-gradient update: `update(state, base_params, rollouts, config)` is one optimizer step on a
batch of scored rollouts:

    loss = Σ_mb policy_sum(mb) / Σ_mb denominator(mb)  +  kl_coef · Σ_mb kl_sum(mb) / Σ_mb denominator(mb)

accumulated over micro-batches of whole rows with `lax.scan` (sums, denominators and gradients added up,
divided once at the end, so any micro-batch size gives the full-batch gradient), per-token log-probs taken from
the model's final hidden state by `losses.token_logprobs` (chunked: no [B, T, V] logits when
`logprob_chunk_size` is set), KL(π_θ ‖ π_base) against a forward pass of the frozen base parameters.

`TrainState` holds what the update changes; `abstract_state` / `lower_update` let the dry run compile the same
program without arrays. Shape letters: B rows (responses), T tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fst_jax.rl import losses
from fst_jax.rl.config import RLConfig, learning_rate_schedule, make_optimizer
from fst_jax.rl.rollouts import Rollouts, pad_rows
from fst_jax.runtime import parallel
from fst_jax.runtime.parallel import mesh_of

__all__ = ["TrainState", "abstract_state", "compute_gradients", "lower_update", "update"]


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
    mesh = mesh_of(state.params)
    if mesh is None:
        return _update_jit.lower(state, base_params, rollouts, config)
    with jax.set_mesh(mesh):
        return _program_for(state).lower(state, base_params, rollouts, config)


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
    mesh = mesh_of(state.params)
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
