"""The sampler's weight layout: the model's parameters relaid for the decode loop, in the compute dtype, with
their shardings; and the same layout as abstract arrays (shapes, dtypes, shardings) for planning."""

from __future__ import annotations

import functools
import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fst_jax.runtime import parallel
from fst_jax.models.config import canonical_dtype
from fst_jax.models.qwen3 import Qwen3

__all__ = ["sampling_weights", "abstract_sampling_weights"]


# How each decode-layout weight (`FEATURE_MAJOR`: outputs first) derives from the model's per-layer parameter:
# its dims, each a group of the parameter's dims (q_proj [D, N, H] → [N, H, D]). One table serves the values and
# the shardings.
_OUT_IN = {"q_proj": ((1,), (2,), (0,)), "k_proj": ((1,), (2,), (0,)), "v_proj": ((1,), (2,), (0,)),
           "o_proj": ((2,), (0,), (1,)), "gate_proj": ((1,), (0,)), "up_proj": ((1,), (0,)), "down_proj": ((1,), (0,))}
_TRANSPOSE = ((1,), (0,))


def _regroup(x: jax.Array, groups) -> jax.Array:
    order = [d for group in groups for d in group]
    shape = [math.prod(x.shape[d] for d in group) for group in groups]
    return x.transpose(order).reshape(shape)


def _regroup_spec(spec: P, groups) -> P:
    """The spec of `_regroup`'s result: a merged dim is split over its parts' mesh axes, major first."""
    entries = tuple(spec) + (None,) * (1 + max(max(g) for g in groups) - len(spec))
    out = []
    for group in groups:
        axes = tuple(a for d in group if entries[d] is not None
                     for a in ((entries[d],) if isinstance(entries[d], str) else entries[d]))
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _layout(tree: dict, config, one, layer_of) -> dict:
    """Map the model's pure-dict parameters (or a tree of that structure) to the decode layout: `one(leaf,
    groups)` for each array, applied to `layer_of(leaf, i)` for layer i of a stacked one."""
    layers = tuple({name: one(layer_of(w, i), _OUT_IN.get(name)) for name, w in tree["layers"].items()}
                   for i in range(config.num_layers))
    return {"embed": one(tree["embed"], None), "final_norm": one(tree["final_norm"], None),
            "unembed_vd": None if config.tie_word_embeddings else one(tree["lm_head"], _TRANSPOSE),
            "layers": layers}


@functools.lru_cache(maxsize=64)
def _layout_shardings(config, mesh: Mesh, rules: parallel.Rules) -> dict:
    """NamedShardings of the decode layout: each weight split as `rules` split the model parameter it comes
    from (whole on each batch shard with SAMPLE_RULES, split by `tensor`)."""
    _, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = nnx.to_pure_dict(parallel.param_shardings(abstract, mesh, rules))
    return _layout(shardings, config,
                   lambda s, groups: s if groups is None else NamedSharding(mesh, _regroup_spec(s.spec, groups)),
                   lambda s, i: NamedSharding(mesh, P(*tuple(s.spec)[1:])))  # a layer: the stack's without `layers`


def sampling_weights(params: nnx.State, config, mesh: Mesh | None = None,
                     rules: parallel.Rules = parallel.SAMPLE_RULES) -> dict:
    """The model's parameters laid out for decoding: {"embed", "final_norm", "unembed_vd", "layers"}.

    Every weight is held in the compute dtype (`config.dtype`), never in `param_dtype`: sampling computes in
    that dtype anyway, and a float32 copy of the master weights would double the sampler's memory.
    Two layout differences from the model, both measured on XLA:CPU inside the decode loop:
    - `layers` is a tuple of per-layer dicts, not arrays stacked along a leading axis: scanning over stacked
      weights makes XLA copy each layer's slice out of the stack every step (3x the weight traffic).
    - every projection is stored outputs first (q_proj [N, H, D], o_proj [D, N, H], gate_proj [F, D], ...),
      the `FEATURE_MAJOR` layout of `decoder_layer`: applied weight-first to feature-major activations, the
      few-token matmuls of a decode step stream the weights about 1.6x faster than [tokens, in] @ [in, out].
    `unembed_vd` is the LM head as [V, D] (None when tied: the embedding serves). With a mesh, every array
    gets the sharding `rules` give the model's parameter (whole on each batch shard, split by `tensor`);
    parameters already on the mesh's devices go in as they are (e.g. FSDP-sharded training weights), so no
    full-precision replicated copy is ever made. `abstract_sampling_weights` gives this layout's shapes.
    """
    rules = hashable_rules(rules)
    if mesh is not None:  # arrays elsewhere (host, one device) are first placed on the mesh
        devices = set(mesh.devices.flat)
        target = parallel.param_shardings(params, mesh, rules)
        params = jax.tree.map(lambda x, s: x if isinstance(x, jax.Array) and x.sharding.device_set == devices
                              else jax.device_put(x, s), params, target)
    weights = _relayout_program(config, mesh, rules)(nnx.to_pure_dict(params))
    # without a mesh: committed to the default device whatever the params were, so the engine's programs see one
    # kind of argument (a program lowered ahead of time is keyed by it; `engine.lower_engine_programs`)
    return jax.device_put(weights, jax.devices()[0]) if mesh is None else weights


def abstract_sampling_weights(config, abstract_params: nnx.State, mesh: Mesh | None = None,
                              rules: parallel.Rules = parallel.SAMPLE_RULES) -> dict:
    """`sampling_weights` without the arrays: jax.ShapeDtypeStructs (with their NamedSharding on a mesh) of
    exactly the layout `Sampler.set_params` makes. `abstract_params`: the model's nnx.State of
    ShapeDtypeStructs (`nnx.split(nnx.eval_shape(...), nnx.Param)`), in any dtype and sharding."""
    rules = hashable_rules(rules)
    flat = nnx.to_pure_dict(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params))
    shapes = jax.eval_shape(_relayout_program(config, None, rules), flat)
    if mesh is None:
        return shapes
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        _layout_shardings(config, mesh, rules))


def hashable_rules(rules: parallel.Rules) -> tuple:
    """`rules` as nested tuples, so that it can key jax's and our caches (a static jit argument)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def _relayout(flat: dict, *, config) -> dict:
    dtype = canonical_dtype(config.dtype)
    return _layout(flat, config, lambda w, groups: (w if groups is None else _regroup(w, groups)).astype(dtype),
                   lambda w, i: w[i])


@functools.lru_cache(maxsize=64)
def _relayout_program(config, mesh: Mesh | None, rules: parallel.Rules):
    """The relayout as one jitted program (a new Sampler of a known shape compiles nothing); the cast and the
    regathering happen inside it, so a float32 or FSDP-sharded input is never copied whole. Its explicit
    out_shardings are the exact shardings `abstract_sampling_weights` states."""
    out = None if mesh is None else _layout_shardings(config, mesh, rules)
    return jax.jit(functools.partial(_relayout, config=config), out_shardings=out)
