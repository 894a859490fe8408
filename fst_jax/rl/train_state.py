"""What an RL run updates: `TrainState` (params, optimizer state, step, RNG, rollout count) and its abstract
twin for the dry run. The update itself is `fst_jax.rl.policy_update`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fst_jax.rl.config import RLConfig, make_optimizer

__all__ = ["TrainState", "abstract_state", "program_config"]


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
               *, seed: int = 0) -> TrainState:
        """A fresh state for `model` (or (graphdef, params)) with optimizer state laid out like the params.

        The params are *copied*: `update` donates the state, so the caller's arrays (typically also the frozen
        base copy) stay valid.
        """
        graphdef, params = nnx.split(model, nnx.Param) if isinstance(model, nnx.Module) else model
        leaves, treedef = jax.tree.flatten(params)
        abstract = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in leaves)
        initialize = _state_initializer(program_config(RLConfig.from_config(config)), treedef, abstract)
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


def program_config(config: RLConfig) -> RLConfig:
    """`config` with the sampling-only fields at their defaults: they do not change the update's program, so
    they must not split the jit cache."""
    defaults = RLConfig()
    sampling_only = ("rollouts_per_problem", "max_new_tokens", "enable_thinking", "sequence_length",
                     "num_length_buckets")
    return dataclasses.replace(config, **{name: getattr(defaults, name) for name in sampling_only})


def _replicated_like(params):
    leaf = jax.tree.leaves(params)[0]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P())
    return sharding


def abstract_state(graphdef: nnx.GraphDef, abstract_params: nnx.State, config: RLConfig) -> TrainState:
    """The TrainState `TrainState.create` makes for params of these shapes and shardings, as ShapeDtypeStructs
    (nothing allocated): what the dry run lowers the update with."""
    leaves, treedef = jax.tree.flatten(abstract_params)
    initialize = _state_initializer(program_config(config), treedef, tuple(leaves))
    params, opt_state, step, rng, num_rollouts = jax.eval_shape(initialize, abstract_params, np.uint32(0))
    return TrainState(params=params, opt_state=opt_state, step=step, rng=rng, num_rollouts=num_rollouts,
                      graphdef=graphdef)
