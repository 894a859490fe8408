"""The policy-gradient update: `update(state, base_params, rollouts, config)` is one optimizer step on a batch
of scored rollouts:

    loss = Σ_mb policy_sum(mb) / Σ_mb denominator(mb)  +  kl_coef · Σ_mb kl_sum(mb) / Σ_mb denominator(mb)

Sums, denominators and gradients are added up over micro-batches of whole rows and divided once, so any split
into micro-batches — of any sizes and lengths — gives the full-batch loss and gradient. `update` sorts the rows
by length and computes each micro-batch at the smallest of a few planned lengths that holds it (one jitted
gradient program per length, a host loop, one jitted optimizer step); `compute_gradients` is the same loss over
one padded batch in a single traceable `lax.scan`. Per-token log-probs come from the model's final hidden
state (`losses.token_logprobs`, chunked: no [B, T, V] logits when `logprob_chunk_size` is set); KL(π_θ ‖ π_base)
against a forward pass of the frozen base parameters.

`TrainState` holds what the update changes; `abstract_state` / `lower_update` let the dry run compile the same
programs without arrays. Shape letters: B rows (responses), T tokens, V vocab.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fst_jax.rl import losses
from fst_jax.rl.config import RLConfig, learning_rate_schedule, make_optimizer
from fst_jax.rl.rollouts import Rollouts, length_buckets, micro_batches, padding_ratio
from fst_jax.rl.train_state import TrainState, abstract_state, program_config
from fst_jax.runtime import parallel
from fst_jax.runtime.parallel import mesh_of

__all__ = ["TrainState", "abstract_state", "bucketed_gradients", "compute_gradients", "lower_update",
           "micro_batch_rows", "planned_lengths", "update"]


# ---------------------------------------------------------------------------------------------------------
# Loss and gradients


def _shifted(rollouts: Rollouts):
    """Targets, masks and old log-probs for predicting token t+1 from position t (last position: no loss)."""
    shift = lambda x: jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
    return (shift(rollouts.input_ids), shift(rollouts.loss_mask).astype(jnp.float32),
            shift(rollouts.old_logprobs).astype(jnp.float32))


def _sequence_logprobs(graphdef, params, rollouts: Rollouts, targets_bt, config: RLConfig, with_entropy: bool):
    model = nnx.merge(graphdef, params)
    # Rows are right-padded (`rollouts.build_rollouts`), so their lengths say what the mask says, in the form
    # a fused attention kernel takes.
    lengths_b = jnp.sum(rollouts.attention_mask, axis=1, dtype=jnp.int32)
    out = model.forward(rollouts.input_ids, lengths=lengths_b, compute_logits=False)
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
    """(gradient of the batch loss, metrics) of one padded [B, T] batch, accumulated over micro-batches of
    whole rows with `lax.scan`: every row computed at T tokens.

    Rows are split into B / micro_batch_size consecutive micro-batches, each spread over the mesh's batch
    axes; a micro-batch without a single loss token (padding, dropped groups) is skipped by `lax.cond`.
    Traceable (jit it yourself); `update` computes the same loss and gradient from length-bucketed
    micro-batches instead (see `accumulated_gradients`). `base_params` None skips the KL term (allowed only
    when kl_coef = 0).
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
        return _add_sums(carry, out), None

    accumulator, _ = jax.lax.scan(body, zeros, micro_batches)
    return _finish(accumulator)


def _add_sums(accumulator, out):
    """Gradient sums and statistic sums of two micro-batches combined (maxima stay maxima)."""
    grads = jax.tree.map(jnp.add, accumulator[0], out[0])
    sums = {k: (jnp.maximum if k.endswith("_max") else jnp.add)(accumulator[1][k], v) for k, v in out[1].items()}
    return grads, sums


def _finish(accumulator):
    """Divide once: (gradient sums, statistic sums) over all micro-batches → (gradient, metrics)."""
    grad_sums, sums = accumulator
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


# ---------------------------------------------------------------------------------------------------------
# The update as a run calls it: a host loop over length-bucketed micro-batches, three kinds of jitted program


def _zero_accumulator(params, *, graphdef, config: RLConfig, with_base: bool):
    """Zero gradient sums (laid out like the params) and zero statistic sums: what `_accumulate` adds to."""
    dummy = Rollouts(*(jax.ShapeDtypeStruct((1, 16), d) for d in (jnp.int32, jnp.int32, jnp.float32, jnp.float32)),
                     advantages=jax.ShapeDtypeStruct((1,), jnp.float32))
    shapes = jax.eval_shape(functools.partial(_micro_batch_sums, graphdef=graphdef, config=config),
                            params, params if with_base else None, dummy)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _accumulate(accumulator, params, base_params, micro_batch: Rollouts, *, graphdef, config: RLConfig):
    """The accumulator plus one micro-batch's gradient and statistic sums; one program per bucket length."""
    return _add_sums(accumulator, _micro_batch_sums(params, base_params, micro_batch, graphdef=graphdef,
                                                    config=config))


def _apply_update(state: TrainState, accumulator, config: RLConfig):
    """Divide once, then the optimizer step — unless the loss or gradient is non-finite or no token carried
    loss: then the old state is kept and `skipped` reads 1 (one decision per step)."""
    grads, metrics = _finish(accumulator)
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


_GRADIENT_STATIC = ("graphdef", "config", "with_base")
_zero_single = jax.jit(_zero_accumulator, static_argnames=_GRADIENT_STATIC)
_accumulate_single = jax.jit(_accumulate, static_argnames=("graphdef", "config"), donate_argnums=(0,))
_apply_single = jax.jit(_apply_update, static_argnames=("config",), donate_argnums=(0,))


# On a mesh, `out_shardings` state that the gradient sums and the new state keep the params' layout and scalars
# are replicated: left to propagation, XLA may hand back a replicated (per-device full-size) copy.
@functools.lru_cache(maxsize=16)
def _mesh_gradient_programs(treedef, leaf_shardings: tuple):
    """(zero, accumulate) for params laid out by `leaf_shardings`."""
    mesh = next(s.mesh for s in leaf_shardings if isinstance(s, NamedSharding))
    accumulator = (jax.tree.unflatten(treedef, leaf_shardings), NamedSharding(mesh, P()))  # statistics replicated
    return (jax.jit(_zero_accumulator, static_argnames=_GRADIENT_STATIC, out_shardings=accumulator),
            jax.jit(_accumulate, static_argnames=("graphdef", "config"), donate_argnums=(0,),
                    out_shardings=accumulator))


@functools.lru_cache(maxsize=16)
def _mesh_apply_program(treedef, leaf_shardings: tuple):
    """The optimizer step for a state laid out by `leaf_shardings`."""
    mesh = next(s.mesh for s in leaf_shardings if isinstance(s, NamedSharding))
    return jax.jit(_apply_update, static_argnames=("config",), donate_argnums=(0,),
                   out_shardings=(jax.tree.unflatten(treedef, leaf_shardings), NamedSharding(mesh, P())))


def _gradient_programs(params):
    if mesh_of(params) is None:
        return _zero_single, _accumulate_single
    leaves, treedef = jax.tree.flatten(params)
    return _mesh_gradient_programs(treedef, tuple(leaf.sharding for leaf in leaves))


def _apply_program(state: TrainState):
    if mesh_of(state.params) is None:
        return _apply_single
    leaves, treedef = jax.tree.flatten(state)
    return _mesh_apply_program(treedef, tuple(leaf.sharding for leaf in leaves))


def planned_lengths(config: RLConfig) -> tuple[int, ...] | None:
    """The sequence lengths the update computes micro-batches at: `num_length_buckets` evenly spaced lengths
    up to `sequence_length` (None when it is None: each micro-batch at its own `length_bucket`)."""
    if config.sequence_length is None:
        return None
    return length_buckets(config.sequence_length, config.num_length_buckets)


def micro_batch_rows(config: RLConfig, num_rows: int, mesh) -> int:
    """Rows per micro-batch: micro_batch_size, or (None) the whole batch rounded up to the mesh's batch axes."""
    multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
    if config.micro_batch_size is not None and config.micro_batch_size % multiple:
        raise ValueError(f"micro_batch_size {config.micro_batch_size} must be a multiple of the mesh's batch "
                         f"axes (data × fsdp = {multiple})")
    return config.micro_batch_size or -(-num_rows // multiple) * multiple


def lower_update(state: TrainState, base_params, config: RLConfig, *, rows: int,
                 lengths: Sequence[int], platform: str | None = None) -> dict[str, Any]:
    """Lower (without arrays) every program `update` runs for this state and base: "zero" (fresh gradient
    sums), "gradients@T" (one micro-batch of `rows` rows at T tokens, for each T in `lengths`) and "apply" (the
    optimizer step). The same jitted functions, static config and shardings as `update`, so compiling them
    fills the caches it hits. `platform` ("cuda", "tpu"): lower for that backend instead of this machine's
    (for inspection; such programs cannot be compiled here)."""
    config = program_config(RLConfig.from_config(config))
    mesh = mesh_of(state.params)
    zero_program, accumulate_program = _gradient_programs(state.params)
    sharding = (lambda ndim: None) if mesh is None else (lambda ndim: parallel.batch_sharding(mesh, ndim))
    lower = functools.partial(parallel.lower_for, platform=platform)
    with_base = base_params is not None
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        zero = lower(zero_program, state.params, graphdef=state.graphdef, config=config, with_base=with_base)
        accumulator = zero.out_info
        lowered = {"zero": zero}
        for length in lengths:
            sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding(len(shape)))
            batch = Rollouts(input_ids=sds((rows, length), jnp.int32), attention_mask=sds((rows, length), jnp.int32),
                             loss_mask=sds((rows, length), jnp.float32),
                             old_logprobs=sds((rows, length), jnp.float32), advantages=sds((rows,), jnp.float32))
            lowered[f"gradients@{length}"] = lower(accumulate_program, accumulator, state.params, base_params, batch,
                                                   graphdef=state.graphdef, config=config)
        lowered["apply"] = lower(_apply_program(state), state, accumulator, config)
    return lowered


def update(state: TrainState, base_params, rollouts: Rollouts,
           config: RLConfig | Mapping[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `rollouts`; returns (new state, metrics as device scalars).

    The rows that carry loss are sorted by length and cut into micro-batches of micro_batch_size rows (None:
    one micro-batch of the whole batch), each computed at the smallest planned length that holds its longest
    row (`planned_lengths`; `rollouts.micro_batches`): one jitted gradient program per length, called once per
    micro-batch and adding into donated gradient sums, then one jitted optimizer step that divides once. The
    loss and gradient are those of the whole batch padded to one length (`compute_gradients`), under every
    aggregation: each row's tokens stay in one micro-batch and sums and denominators are divided once.

    The state is donated (do not touch the old one afterwards). On a mesh (the params' NamedShardings;
    `base_params` laid out the same way, e.g. both by `parallel.param_shardings(..., TRAIN_RULES)`) each
    micro-batch is split over the batch axes with `parallel.shard_batch`. A NaN/inf loss or gradient is never
    applied: the state is returned unchanged (step not advanced) and `metrics["skipped"]` and
    `metrics["nonfinite"]` are 1.

    Metrics: loss, policy_loss, kl (to the base), entropy (token mean), importance_weight_mean/_max,
    truncated_fraction (CISPO: ρ > τ) or clip_fraction/_low/_high (PPO), grad_norm (before clipping),
    learning_rate (of this update), num_tokens, num_rows, skipped, nonfinite; update_padding_ratio (tokens
    computed / prompt + response tokens of the rows that carry loss; 0 when none does) and
    update_micro_batches. Token statistics are over the loss tokens (response tokens of kept groups) and read
    0 when there are none.
    """
    config = RLConfig.from_config(config)
    if base_params is None and config.kl_coef > 0:
        raise ValueError(f"update needs base_params for the KL term (kl_coef = {config.kl_coef}); "
                         "pass the frozen base parameters, or set kl_coef = 0")
    if base_params is not None and _shares_buffers(state.params, base_params):
        raise ValueError("base_params share buffers with state.params, which update donates; build the state "
                         "with TrainState.create (it copies the params) or pass a separate base copy")
    accumulator, measures = _accumulate_micro_batches(state.params, base_params, rollouts, graphdef=state.graphdef,
                                                      config=config)
    mesh = mesh_of(state.params)
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        state, metrics = _apply_program(state)(state, accumulator, program_config(config))
    metrics.update(measures)
    return state, metrics


def bucketed_gradients(params, base_params, rollouts: Rollouts, *, graphdef, config: RLConfig):
    """(gradient, metrics) exactly as `update` computes them before its optimizer step: length-bucketed
    micro-batches of the rows that carry loss (host loop), divided once. Equals `compute_gradients` of the same
    rollouts up to float32 summation order."""
    config = RLConfig.from_config(config)
    accumulator, measures = _accumulate_micro_batches(params, base_params, rollouts, graphdef=graphdef,
                                                      config=config)
    grads, metrics = _finish_program(accumulator)
    return grads, {**metrics, **measures}


_finish_program = jax.jit(_finish)


def _accumulate_micro_batches(params, base_params, rollouts: Rollouts, *, graphdef, config: RLConfig):
    """(gradient and statistic sums over the micro-batches, {update_padding_ratio, update_micro_batches})."""
    rollouts.check()
    mesh = mesh_of(params)
    rows = micro_batch_rows(config, rollouts.input_ids.shape[0], mesh)
    groups = micro_batches(rollouts, rows, planned_lengths(config))
    zero_program, accumulate_program = _gradient_programs(params)
    static = {"graphdef": graphdef, "config": program_config(config)}
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        accumulator = zero_program(params, with_base=base_params is not None, **static)
        for group in groups:
            if mesh is not None:
                group = parallel.shard_batch(group, mesh)
            accumulator = accumulate_program(accumulator, params, base_params, group, **static)
    return accumulator, {"update_padding_ratio": np.float32(padding_ratio(rollouts, groups)),
                         "update_micro_batches": np.float32(len(groups))}


def _shares_buffers(a, b) -> bool:
    ids = {id(x) for x in jax.tree.leaves(a)}
    return any(id(x) in ids for x in jax.tree.leaves(b))
