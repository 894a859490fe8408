"""Batched sampling from a Qwen3 model: one jitted prefill, then one jitted `lax.while_loop` of decode steps.

Prompts are left-padded to a power-of-two length bucket so that all rows share the cache's write index; the
cache holds `bucket + max_new_tokens` slots. Temperature, top-p, top-k, the seed and the stop tokens are
traced values: changing them never recompiles. A program is compiled once per (model, mesh, batch, bucket,
max_new_tokens, num_samples) and reused from jax's jit cache.

The decode path has its own layout (see `sampling_weights` and `_layer`): one buffer per layer for weights
and KV cache instead of the model's stacked arrays, the cache as [B, K, S, H], vocab-major logits. It
computes what `Qwen3.forward` computes (the tests hold it to transformers' generate and to the model's
forward) without the per-step copies that the training layout costs inside a decode loop.

Randomness is per sample: the key of sample `r` at step `t` is `fold_in(fold_in(key(seed), r), t)`, so a
sample's tokens depend on the seed, its index in the request and the model, never on how the batch was
padded or sharded.

Shape letters: B rows (prompts × samples, padded), P prompt bucket, S cache slots, M max new tokens, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fst_jax import parallel
from fst_jax.models.config import canonical_dtype
from fst_jax.models.qwen3 import Qwen3, apply_rope, rms_norm

__all__ = ["SampleOutput", "Sampler", "generate", "sample_logits", "sampling_weights", "abstract_sampling_weights",
           "lower_sampler_programs", "bucket_length", "row_bucket", "MIN_BUCKET"]

MIN_BUCKET = 16
_STOP_SLOTS = 8  # stop-token ids are padded to a multiple of this, so their number rarely changes the shape


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Completions in request order, prompt-major: prompt i's samples sit at i·num_samples … +num_samples-1.

    tokens: each completion's ids, *including* the stop token that ended it (the policy chose it, so the RL
      loss needs its log-prob). logprobs: float32, one per token, log softmax(logits / temperature) of the
      chosen token before top-p/top-k filtering (temperature 1 when greedy). finished: a stop token was
      produced (False: the row hit max_new_tokens).
    """

    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    finished: list[bool]


def bucket_length(n: int, min_bucket: int = MIN_BUCKET) -> int:
    """The padded prompt length: the next power of two ≥ max(n, min_bucket)."""
    return max(min_bucket, 1 << max(n - 1, 0).bit_length())


# ----------------------------------------------------------------------------------------------- sampling step

def _filter_top_k_top_p(scaled_bv: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Set logits outside the top-k set, then outside the top-p nucleus of what is left, to -inf.

    One descending sort gives both thresholds, so k needs no static value. Top-k keeps every logit ≥ the k-th
    largest (ties at the boundary stay in); top-p keeps the shortest prefix of the sorted top-k tokens whose
    renormalised mass reaches top_p (the most likely token always stays).
    """
    V = scaled_bv.shape[-1]
    sorted_bv = -jnp.sort(-scaled_bv, axis=-1)
    rank_v = jnp.arange(V)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_k_bv = jnp.broadcast_to(rank_v < k, sorted_bv.shape)
    probs_bv = jax.nn.softmax(jnp.where(in_k_bv, sorted_bv, -jnp.inf), axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    keep_bv = in_k_bv & ((mass_before_bv < top_p) | (rank_v == 0))
    threshold_b = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1)
    return jnp.where(scaled_bv >= threshold_b[:, None], scaled_bv, -jnp.inf)


def sample_logits(logits_bv: jax.Array, keys_b: jax.Array, temperature, top_p, top_k):
    """One sampling step: (tokens [B] int32, logprobs [B] float32).

    temperature ≤ 0 is greedy (argmax, first index on ties). Otherwise a Gumbel-max draw from
    softmax(logits / temperature) restricted by top-k (0 = off) and top-p (1 = off); the sort that filtering
    needs is skipped by `lax.cond` when both are off. `keys_b` holds one PRNG key per row. The log-prob is
    always that of the unfiltered softmax(logits / temperature), temperature 1 when greedy.
    """
    return _sample_vb(jnp.asarray(logits_bv).T, keys_b, temperature, top_p, top_k)


def _first_argmax_v(x_vb: jax.Array) -> jax.Array:
    """argmax over the vocab axis (0), first index on ties: two plain reductions, which XLA:CPU vectorises
    (its (value, index) pair reduction for jnp.argmax took ~5x longer on a 151936 × 8 array)."""
    best_b = jnp.max(x_vb, axis=0)
    index_v = jax.lax.broadcasted_iota(jnp.int32, x_vb.shape, 0)
    return jnp.min(jnp.where(x_vb == best_b, index_v, x_vb.shape[0]), axis=0)


def _sample_vb(logits_vb: jax.Array, keys_b: jax.Array, temperature, top_p, top_k):
    """`sample_logits` on vocab-major logits [V, B], the layout the LM head produces cheaply (see `_logits_vb`):
    the greedy path then needs no transpose of the [V, B] array."""
    logits_vb = logits_vb.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)
    greedy = temperature <= 0
    scaled_vb = logits_vb / jnp.where(greedy, 1.0, temperature)

    def draw(scaled_vb):
        scaled_bv = scaled_vb.T
        filtered_bv = jax.lax.cond((top_p < 1) | (top_k > 0), _filter_top_k_top_p, lambda s, p, k: s,
                                   scaled_bv, top_p, top_k)
        gumbel_bv = jax.vmap(lambda key: jax.random.gumbel(key, scaled_bv.shape[-1:], jnp.float32))(keys_b)
        return _first_argmax_v((filtered_bv + gumbel_bv).T)

    tokens_b = jax.lax.cond(greedy, _first_argmax_v, draw, scaled_vb)
    best_b = jnp.max(scaled_vb, axis=0)
    log_norm_b = best_b + jnp.log(jnp.sum(jnp.exp(scaled_vb - best_b), axis=0))
    chosen_b = jnp.take_along_axis(scaled_vb, tokens_b[None, :], axis=0)[0]
    return tokens_b, chosen_b - log_norm_b


# --------------------------------------------------------------------------------- the sampling weight layout

# How each decode-layout weight derives from the model's (per-layer) parameter: its output dims, each a group of
# the parameter's dims merged in order (q_proj [D, N, H] → [N·H, D]). One table serves the values and the shardings.
_OUT_IN = {"q_proj": ((1, 2), (0,)), "k_proj": ((1, 2), (0,)), "v_proj": ((1, 2), (0,)), "o_proj": ((2,), (0, 1)),
           "gate_proj": ((1,), (0,)), "up_proj": ((1,), (0,)), "down_proj": ((1,), (0,))}
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
    - every projection is a 2-D [out, in] matrix (q_proj [N·H, D], o_proj [D, N·H], gate_proj [F, D], ...)
      applied weight-first to feature-major activations [features, tokens]: for the few-token matmuls of a
      decode step that streams the weights about 1.6x faster than [tokens, in] @ [in, out].
    `unembed_vd` is the LM head as [V, D] (None when tied: the embedding serves). With a mesh, every array
    gets the sharding `rules` give the model's parameter (whole on each batch shard, split by `tensor`);
    parameters already on the mesh's devices go in as they are (e.g. FSDP-sharded training weights), so no
    full-precision replicated copy is ever made. `abstract_sampling_weights` gives this layout's shapes.
    """
    rules = _hashable_rules(rules)
    if mesh is not None:  # arrays elsewhere (host, one device) are first placed on the mesh
        devices = set(mesh.devices.flat)
        target = parallel.param_shardings(params, mesh, rules)
        params = jax.tree.map(lambda x, s: x if isinstance(x, jax.Array) and x.sharding.device_set == devices
                              else jax.device_put(x, s), params, target)
    return _relayout_program(config, mesh, rules)(nnx.to_pure_dict(params))


def abstract_sampling_weights(config, abstract_params: nnx.State, mesh: Mesh | None = None,
                              rules: parallel.Rules = parallel.SAMPLE_RULES) -> dict:
    """`sampling_weights` without the arrays: jax.ShapeDtypeStructs (with their NamedSharding on a mesh) of
    exactly the layout `Sampler.set_params` makes. `abstract_params`: the model's nnx.State of
    ShapeDtypeStructs (`nnx.split(nnx.eval_shape(...), nnx.Param)`), in any dtype and sharding."""
    rules = _hashable_rules(rules)
    flat = nnx.to_pure_dict(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params))
    shapes = jax.eval_shape(_relayout_program(config, None, rules), flat)
    if mesh is None:
        return shapes
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        _layout_shardings(config, mesh, rules))


def _hashable_rules(rules: parallel.Rules) -> tuple:
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


class _Shardings(NamedTuple):
    """Where the jitted programs keep their arrays on a mesh: kv [B, K, S, H] caches, rows [B, ...] and
    columns [features, tokens] (tokens batch-major, so splitting them splits the batch)."""

    kv: NamedSharding
    rows: NamedSharding
    columns: NamedSharding
    scalar: NamedSharding


def _program_shardings(config, mesh: Mesh | None, rules: parallel.Rules) -> _Shardings | None:
    if mesh is None:
        return None
    kv_spec = parallel.logical_to_spec(("batch", "kv_heads", None, "head_dim"), rules, mesh,
                                       (parallel.batch_size_multiple(mesh), config.num_kv_heads, 1, config.head_dim))
    rows = parallel.batch_sharding(mesh, 1)
    return _Shardings(kv=NamedSharding(mesh, kv_spec), rows=rows, columns=NamedSharding(mesh, P(None, *rows.spec)),
                      scalar=NamedSharding(mesh, P()))


class _Cache(NamedTuple):
    """KV cache with one buffer per layer, each updated in place by the decode loop.

    k, v: L × [B, K, S, H] (kv heads before slots, so attention reads each head's keys contiguously and no
    step transposes the cache); key_mask [B, S]: slots holding real tokens; index: the next slot (shared by
    all rows); next_position [B]: each row's next RoPE position.
    """

    k: tuple
    v: tuple
    key_mask: jax.Array
    index: jax.Array
    next_position: jax.Array


# Finite, as in the model, so fully masked (padding) rows stay NaN-free.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _norm_features(x_dn: jax.Array, weight_d: jax.Array, eps: float) -> jax.Array:
    """`rms_norm` over the feature axis (0) of feature-major activations."""
    return rms_norm(x_dn.T, weight_d, eps).T


def _layer(c, p: dict, x_dn, positions_bt, allowed_bts, k_cache, v_cache, index):
    """One Qwen3 decoder layer on B·T new tokens (feature-major x [D, B·T]); their keys and values are written
    into the [B, K, S, H] cache at slot `index`.

    The computation of `fst_jax.models.qwen3.Qwen3`'s layer (same dtypes; float32 norms, RoPE and softmax),
    held by the tests to transformers' generate and to the model's forward, in the decode layout of
    `sampling_weights`.
    """
    dtype = canonical_dtype(c.dtype)
    p = {name: w.astype(dtype) for name, w in p.items()}
    B, T = positions_bt.shape
    N, K, G, H = c.num_heads, c.num_kv_heads, c.queries_per_kv, c.head_dim

    h_dn = _norm_features(x_dn, p["attn_norm"], c.rms_norm_eps)
    with jax.named_scope("qkv"):
        q_btnh = (p["q_proj"] @ h_dn).reshape(N, H, B, T).transpose(2, 3, 0, 1)
        k_btkh = (p["k_proj"] @ h_dn).reshape(K, H, B, T).transpose(2, 3, 0, 1)
        v_bkth = (p["v_proj"] @ h_dn).reshape(K, H, B, T).transpose(2, 0, 3, 1)
        q_btnh = rms_norm(q_btnh, p["q_norm"], c.rms_norm_eps)
        k_btkh = rms_norm(k_btkh, p["k_norm"], c.rms_norm_eps)
    with jax.named_scope("rope"):
        q_btnh = apply_rope(q_btnh, positions_bt, c.rope_theta)
        k_bkth = apply_rope(k_btkh, positions_bt, c.rope_theta).transpose(0, 2, 1, 3)
    with jax.named_scope("cache_update"):
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_bkth.astype(k_cache.dtype), (0, 0, index, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_bkth.astype(v_cache.dtype), (0, 0, index, 0))
    with jax.named_scope("attention"):
        q_bktgh = q_btnh.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4)
        scores = jnp.einsum("bktgh,bksh->bktgs", q_bktgh, k_cache.astype(dtype)).astype(jnp.float32)
        scores = jnp.where(allowed_bts[:, None, :, None, :], scores * c.head_dim ** -0.5, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        attn_bktgh = jnp.einsum("bktgs,bksh->bktgh", probs, v_cache.astype(dtype))
        attn_mn = attn_bktgh.transpose(1, 3, 4, 0, 2).reshape(N * H, B * T)  # query head n = k·G + g
        x_dn = x_dn + p["o_proj"] @ attn_mn
    with jax.named_scope("mlp"):
        h_dn = _norm_features(x_dn, p["mlp_norm"], c.rms_norm_eps)
        x_dn = x_dn + p["down_proj"] @ (jax.nn.silu(p["gate_proj"] @ h_dn) * (p["up_proj"] @ h_dn))
    return x_dn, k_cache, v_cache


def _forward(c, weights: dict, tokens_bt, mask_bt, cache: _Cache, shardings: _Shardings | None):
    """Qwen3 on T new tokens written at cache slots [index, index + T): (the last token's final hidden state
    after the final norm, feature-major [D, B]; the advanced cache). Masks and positions as `Qwen3.forward`."""
    B, T = tokens_bt.shape
    S = cache.key_mask.shape[1]
    positions_bt = cache.next_position[:, None] + jnp.maximum(jnp.cumsum(mask_bt, axis=1, dtype=jnp.int32) - 1, 0)
    key_mask_bs = jax.lax.dynamic_update_slice(cache.key_mask, mask_bt, (0, cache.index))
    query_slot_t = cache.index + jnp.arange(T)
    allowed_bts = key_mask_bs[:, None, :] & (jnp.arange(S)[None, None, :] <= query_slot_t[None, :, None])
    with jax.named_scope("embed"):
        x_dn = jnp.take(weights["embed"], tokens_bt.reshape(B * T), axis=0).astype(canonical_dtype(c.dtype)).T
    kv, columns = (None, None) if shardings is None else (shardings.kv, shardings.columns)
    ks, vs = [], []
    for p, k, v in zip(weights["layers"], cache.k, cache.v):
        x_dn, k, v = _layer(c, p, _constrain(x_dn, columns), positions_bt, allowed_bts, k, v, cache.index)
        ks.append(_constrain(k, kv))
        vs.append(_constrain(v, kv))
    last_db = x_dn.reshape(-1, B, T)[:, :, -1]
    hidden_db = _norm_features(last_db, weights["final_norm"], c.rms_norm_eps)
    return hidden_db, _Cache(k=tuple(ks), v=tuple(vs), key_mask=key_mask_bs, index=cache.index + T,
                             next_position=cache.next_position + mask_bt.sum(axis=1, dtype=jnp.int32))


def _logits_vb(c, weights: dict, hidden_db: jax.Array) -> jax.Array:
    """LM-head logits, vocab-major [V, B], in float32 (computed in the compute dtype, as `Qwen3.forward`).

    Weight-first ("vd,db->vb") like the layers: on XLA:CPU that streams the 151936 × 1024 embedding about
    twice as fast as "bd,vd->bv"; the sampling step consumes [V, B] as it is.
    """
    dtype = canonical_dtype(c.dtype)
    unembed_vd = weights["embed"] if weights["unembed_vd"] is None else weights["unembed_vd"]
    with jax.named_scope("unembed"):
        return (unembed_vd.astype(dtype) @ hidden_db).astype(jnp.float32)


# ----------------------------------------------------------------------------------------- jitted programs

def _constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _prefill(weights, prompt_ids_bp, prompt_mask_bp, *, config, cache_len, num_samples, cache_dtype, shardings):
    """Run the prompts into a fresh cache; repeat it `num_samples` times along the batch.

    Returns the cache (L × [B·n, K, S, H]) and the float32 logits [V, B·n] at each prompt's last token, every
    output with the sharding `_prefill_out_shardings` states.
    """
    B = prompt_ids_bp.shape[0]
    shape = (B, config.num_kv_heads, cache_len, config.head_dim)
    dtype = canonical_dtype(cache_dtype)
    kv_sharding, row_sharding = (None, None) if shardings is None else (shardings.kv, shardings.rows)
    zeros = tuple(_constrain(jnp.zeros(shape, dtype), kv_sharding) for _ in range(config.num_layers))
    cache = _Cache(k=zeros, v=zeros, key_mask=jnp.zeros((B, cache_len), bool), index=jnp.zeros((), jnp.int32),
                   next_position=jnp.zeros((B,), jnp.int32))
    hidden_db, cache = _forward(config, weights, prompt_ids_bp, prompt_mask_bp, cache, shardings)
    logits_vb = _logits_vb(config, weights, hidden_db)
    if num_samples > 1:
        with jax.named_scope("repeat_samples"):
            rep = lambda x: _constrain(jnp.repeat(x, num_samples, axis=0), kv_sharding)  # noqa: E731
            cache = _Cache(k=tuple(map(rep, cache.k)), v=tuple(map(rep, cache.v)),
                           key_mask=jnp.repeat(cache.key_mask, num_samples, axis=0), index=cache.index,
                           next_position=jnp.repeat(cache.next_position, num_samples, axis=0))
            logits_vb = jnp.repeat(logits_vb, num_samples, axis=1)
    cache = cache._replace(key_mask=_constrain(cache.key_mask, row_sharding),
                           next_position=_constrain(cache.next_position, row_sharding))
    return cache, logits_vb


def _prefill_out_shardings(config, shardings: _Shardings | None):
    """The shardings of `_prefill`'s outputs (the jit's out_shardings, so arrays carry exactly these)."""
    if shardings is None:
        return None
    kv = (shardings.kv,) * config.num_layers
    return (_Cache(k=kv, v=kv, key_mask=shardings.rows, index=shardings.scalar, next_position=shardings.rows),
            shardings.columns)


def _decode(weights, cache, logits_vb, row_active_b, sample_index_b, seed, temperature, top_p, top_k, stop_ids,
            pad_id, *, config, max_new_tokens, shardings):
    """Sample the first token from the prefill logits, then loop: forward one token, sample the next.

    The loop stops when every row has produced a stop token or `max_new_tokens` tokens; rows that are done
    keep running (static shapes) but write nothing. Returns (tokens [B, M], logprobs [B, M], lengths [B],
    finished [B]) and the final cache, which aliases the donated input cache so the loop updates it in place.
    """
    B, M = logits_vb.shape[1], max_new_tokens
    row_sharding = None if shardings is None else shardings.rows
    base_key = jax.random.key(seed)
    row_keys_b = jax.vmap(jax.random.fold_in, (None, 0))(base_key, sample_index_b)

    def sample(logits, step):
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys_b, step)
        return _sample_vb(logits, keys, temperature, top_p, top_k)

    def record(state, step, tok_b, logprob_b):
        tokens, logprobs, lengths, finished, done = state
        live_b = ~done
        tokens = jax.lax.dynamic_update_slice(tokens, jnp.where(live_b, tok_b, pad_id)[:, None], (0, step))
        logprobs = jax.lax.dynamic_update_slice(logprobs, jnp.where(live_b, logprob_b, 0.0)[:, None], (0, step))
        stopped_b = live_b & jnp.any(tok_b[:, None] == stop_ids[None, :], axis=-1)
        return (tokens, logprobs, lengths + live_b.astype(jnp.int32), finished | stopped_b, done | stopped_b)

    out0 = (jnp.full((B, M), pad_id, jnp.int32), jnp.zeros((B, M), jnp.float32), jnp.zeros((B,), jnp.int32),
            jnp.zeros((B,), bool), ~row_active_b)
    out0 = jax.tree.map(lambda x: _constrain(x, row_sharding), out0)
    tok_b, logprob_b = sample(logits_vb, 0)
    out0 = record(out0, 0, tok_b, logprob_b)

    def cond(carry):
        step, _, _, out = carry
        return (step < M) & ~jnp.all(out[-1])

    def body(carry):
        step, cache, tok_b, out = carry
        hidden_db, cache = _forward(config, weights, tok_b[:, None], jnp.ones((B, 1), bool), cache, shardings)
        tok_b, logprob_b = sample(_logits_vb(config, weights, hidden_db), step)
        return step + 1, cache, tok_b, record(out, step, tok_b, logprob_b)

    _, cache, _, (tokens, logprobs, lengths, finished, _) = jax.lax.while_loop(
        cond, body, (jnp.ones((), jnp.int32), cache, tok_b, out0))
    return (tokens, logprobs, lengths, finished), cache


@functools.lru_cache(maxsize=64)
def _programs(config, shardings: _Shardings | None):
    """The jitted (prefill, decode) of one model config and mesh layout, shared by every Sampler of it.

    Prefill states its out_shardings: an output's sharding is then exactly that object, so the decode program
    lowered ahead of time for it (`lower_sampler_programs`) is the one a call finds in jax's caches (jax
    otherwise reports e.g. P('fsdp') for P('fsdp', None, None, None), a different cache key).
    """
    prefill = jax.jit(functools.partial(_prefill, config=config, shardings=shardings),
                      static_argnames=("cache_len", "num_samples", "cache_dtype"),
                      out_shardings=_prefill_out_shardings(config, shardings))
    decode = jax.jit(functools.partial(_decode, config=config, shardings=shardings),
                     static_argnames=("max_new_tokens",), donate_argnames=("cache",))
    return prefill, decode


def _statics(cache_dtype: str, bucket: int, max_new_tokens: int, num_samples: int):
    """The static arguments of (prefill, decode) for a request: with the shapes, all that selects a program."""
    return (dict(cache_len=bucket + max_new_tokens, num_samples=num_samples, cache_dtype=cache_dtype),
            dict(max_new_tokens=max_new_tokens))


def row_bucket(n_rows: int, mesh: Mesh | None = None) -> int:
    """The number of prompt rows a `generate` call of `n_rows` prompts runs: the rows per batch shard rounded
    up to a power of two, times the mesh's batch multiple (data × fsdp). A run thus compiles a few programs
    (one per power of two), all known in advance; the extra rows are inactive and change no real row."""
    if not (isinstance(n_rows, (int, np.integer)) and n_rows >= 1):
        raise ValueError(f"the number of rows must be a positive integer, got {n_rows!r}")
    multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
    per_shard = -(-int(n_rows) // multiple)
    return (1 << (per_shard - 1).bit_length()) * multiple


def lower_sampler_programs(config, abstract_params: nnx.State, *, mesh: Mesh | None = None,
                           rules: parallel.Rules = parallel.SAMPLE_RULES, rows: int, prompt_len: int,
                           max_new_tokens: int, num_samples: int = 1, cache_dtype=None) -> dict:
    """Lower, without any array, the two programs `Sampler(model, mesh=mesh, rules=rules,
    cache_dtype=cache_dtype).generate` runs for `rows` prompts whose longest has `prompt_len` tokens:
    {"prefill": jax.stages.Lowered, "decode": jax.stages.Lowered}.

    Same row and prompt buckets, static arguments, dtypes, shardings and donation as `generate` (with up to
    8 stop tokens), so compiling them fills jax's compilation cache and that `generate` then compiles
    nothing. `abstract_params`: as for `abstract_sampling_weights`. `.compile().memory_analysis()` of each
    gives its per-device memory.
    """
    n = num_samples
    shardings = _program_shardings(config, mesh, _hashable_rules(rules))
    weights = abstract_sampling_weights(config, abstract_params, mesh, rules)
    Bp, bucket = row_bucket(rows, mesh), bucket_length(prompt_len)
    cache_dtype = canonical_dtype(cache_dtype or config.dtype).name
    prefill_static, decode_static = _statics(cache_dtype, bucket, max_new_tokens, n)
    prefill_jit, decode_jit = _programs(config, shardings)

    def batched(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=None if mesh is None else
                                    parallel.batch_sharding(mesh, len(shape)))

    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731  (host scalars in `generate`)
    with _mesh_context(mesh):
        prompt = (batched((Bp, bucket), jnp.int32), batched((Bp, bucket), jnp.bool_))
        prefill = prefill_jit.lower(weights, *prompt, **prefill_static)
        cache, logits = jax.eval_shape(functools.partial(prefill_jit, **prefill_static), weights, *prompt)
        if shardings is not None:
            cache, logits = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                         (cache, logits), _prefill_out_shardings(config, shardings))
        decode = decode_jit.lower(weights, cache, logits, batched((Bp * n,), jnp.bool_),
                                   batched((Bp * n,), jnp.int32), scalar(jnp.uint32), scalar(jnp.float32),
                                   scalar(jnp.float32), scalar(jnp.int32),
                                   jax.ShapeDtypeStruct((_STOP_SLOTS,), jnp.int32), scalar(jnp.int32),
                                   **decode_static)
    return {"prefill": prefill, "decode": decode}


# ------------------------------------------------------------------------------------------------ the sampler

class Sampler:
    """Samples from one Qwen3 model; holds its weights in the sampling layout (see `sampling_weights`).

    `model`: a `Qwen3` or its `nnx.split(model, nnx.Param)` pair. `mesh`: split the batch over its data/fsdp
    axes (the batch is padded to a multiple of data × fsdp) and lay the weights out by `rules` (default
    `parallel.SAMPLE_RULES`: whole on each batch shard, split by `tensor`). `cache_dtype` defaults to the
    model's compute dtype. Compiled programs live in jax's jit cache, keyed by the config, the mesh layout
    and the shapes, so they are shared by every Sampler of the same model shape.
    """

    def __init__(self, model: Qwen3 | tuple[nnx.GraphDef, nnx.State], *, mesh: Mesh | None = None,
                 rules: parallel.Rules = parallel.SAMPLE_RULES, cache_dtype=None):
        if isinstance(model, nnx.Module):
            self.config = model.config
            _, params = nnx.split(model, nnx.Param)
        else:
            graphdef, params = model
            self.config = nnx.merge(graphdef, params).config
        self.mesh, self.rules = mesh, _hashable_rules(rules)
        self.cache_dtype = canonical_dtype(cache_dtype or self.config.dtype).name
        self._shardings = _program_shardings(self.config, mesh, self.rules)
        self.set_params(params)

    def set_params(self, params: nnx.State) -> None:
        """Replace the weights (e.g. after an RL update; any layout) with a copy in the sampling layout."""
        self.weights = None  # drop the old copy first: at most one sampling copy is alive at a time
        self.weights = sampling_weights(params, self.config, self.mesh, self.rules)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_token_ids: Sequence[int] = (),
                 num_samples: int = 1, pad_id: int = 0) -> SampleOutput:
        """Sample `num_samples` completions of each prompt (token ids). See `SampleOutput` for the result.

        temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off. None of these, nor the seed,
        the stop tokens or pad_id, is compiled in: only the row bucket (`row_bucket`), the prompt bucket
        (`bucket_length`), max_new_tokens and num_samples select a program (`lower_sampler_programs` lowers
        the same programs ahead of time).
        """
        _check_request(prompts, max_new_tokens, temperature, top_p, top_k, num_samples)
        n = num_samples
        B = len(prompts)
        Bp = row_bucket(B, self.mesh)
        bucket = bucket_length(max(len(p) for p in prompts))
        ids = np.full((Bp, bucket), pad_id, np.int32)
        mask = np.zeros((Bp, bucket), bool)
        for i, prompt in enumerate(prompts):
            ids[i, bucket - len(prompt):] = prompt
            mask[i, bucket - len(prompt):] = True
        outside = (ids < 0) | (ids >= self.config.vocab_size)
        if outside.any():
            row = int(np.nonzero(outside.any(axis=1))[0][0])
            raise ValueError(f"prompt {row} has token id {ids[row][outside[row]][0]} outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        row_active = np.arange(Bp * n) < B * n
        stops = np.full(max(1, -(-len(stop_token_ids) // _STOP_SLOTS)) * _STOP_SLOTS, -1, np.int32)
        stops[:len(stop_token_ids)] = stop_token_ids

        prefill_static, decode_static = _statics(self.cache_dtype, bucket, max_new_tokens, n)
        prefill_jit, decode_jit = _programs(self.config, self._shardings)
        with _mesh_context(self.mesh):
            cache, logits = prefill_jit(self.weights, self._place(ids), self._place(mask), **prefill_static)
            result, _ = decode_jit(self.weights, cache, logits, self._place(row_active),
                                    self._place(np.arange(Bp * n, dtype=np.int32)), np.uint32(seed % 2**32),
                                    np.float32(temperature), np.float32(top_p), np.int32(top_k), stops,
                                    np.int32(pad_id), **decode_static)
        tokens, logprobs, lengths, finished = (_to_host(x) for x in result)
        return SampleOutput(tokens=[tokens[r, :lengths[r]].tolist() for r in range(B * n)],
                            logprobs=[logprobs[r, :lengths[r]].copy() for r in range(B * n)],
                            finished=[bool(f) for f in finished[:B * n]])

    def _place(self, x: np.ndarray) -> Any:
        if self.mesh is None:
            return x
        sharding = parallel.batch_sharding(self.mesh, x.ndim)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def generate(model: Qwen3 | tuple[nnx.GraphDef, nnx.State], prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             stop_token_ids: Sequence[int] = (), num_samples: int = 1, pad_id: int = 0,
             mesh: Mesh | None = None) -> SampleOutput:
    """`Sampler(model, mesh=mesh).generate(prompts, ...)`. This lays the weights out anew on every call; for
    repeated sampling keep one `Sampler` (the compiled programs are shared either way)."""
    return Sampler(model, mesh=mesh).generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop_token_ids=stop_token_ids, num_samples=num_samples, pad_id=pad_id)


def _check_request(prompts, max_new_tokens, temperature, top_p, top_k, num_samples):
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompt(s) {empty[:5]} are empty; every prompt needs at least one token")
    if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be ≥ 0 (0 = off), got {top_k!r}")


def _mesh_context(mesh: Mesh | None):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
