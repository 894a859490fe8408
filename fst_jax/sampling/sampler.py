"""Batched sampling from a Qwen3 model: one jitted prefill, then one jitted `lax.while_loop` of decode steps.

Prompts are left-padded to a power-of-two length bucket so that all rows share the cache's write index; the
cache holds `bucket + max_new_tokens` slots; the rows are padded to a power of two per batch shard
(`row_bucket`). Temperature, top-p, top-k, the seed, the stop tokens and the pad id are traced values:
changing them never recompiles. A program is compiled once per (model, mesh, row bucket, prompt bucket,
max_new_tokens, num_samples) and reused from jax's caches; `lower_sampler_programs` lowers the same programs
ahead of time, without weights.

Both programs run the model's own `decoder_layer` (`fst_jax.models.qwen3`), in its feature-major layout (see
`sampling_weights`): one buffer per layer for weights and KV cache instead of the model's stacked arrays,
weights outputs-first, vocab-major logits. The tests hold it to transformers' generate and to the model's
forward; the layout spares the decode loop the per-step copies the training layout costs there.

Randomness is per sample: the key of sample `r` at step `t` is `fold_in(fold_in(key(seed), r), t)`, so a
sample's tokens depend on the seed, its index in the request and the model, never on how the batch was
padded or sharded.

Shape letters: B rows (prompts × samples, padded), P prompt bucket, S cache slots, M max new tokens, V vocab.

Just over 400 lines: the static sampler's prefill, decode and their planning stay together until the request engine
(`engine.py`) replaces it as the run's sampler.
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

from fst_jax.runtime import parallel
from fst_jax.models.config import canonical_dtype
from fst_jax.models.qwen3 import FEATURE_MAJOR, KVCache, Qwen3, decoder_layer, rms_norm, step_masks
from fst_jax.sampling.weights import hashable_rules, abstract_sampling_weights, sampling_weights
from fst_jax.sampling.token_choice import sample_logits, sample_vb

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



class _Shardings(NamedTuple):
    """Where the jitted programs keep their arrays on a mesh: kv [B, K, S, H] caches, rows [B], columns
    [V, B] logits, features [D, B, T] activations, scalars."""

    kv: NamedSharding
    rows: NamedSharding
    columns: NamedSharding
    features: NamedSharding
    scalar: NamedSharding


def _program_shardings(config, mesh: Mesh | None, rules: parallel.Rules) -> _Shardings | None:
    if mesh is None:
        return None
    kv_spec = parallel.logical_to_spec(("batch", "kv_heads", None, "head_dim"), rules, mesh,
                                       (parallel.batch_size_multiple(mesh), config.num_kv_heads, 1, config.head_dim))
    rows = parallel.batch_sharding(mesh, 1)
    return _Shardings(kv=NamedSharding(mesh, kv_spec), rows=rows, columns=NamedSharding(mesh, P(None, *rows.spec)),
                      features=NamedSharding(mesh, P(None, *rows.spec, None)), scalar=NamedSharding(mesh, P()))


def _forward(c, weights: dict, tokens_bt, mask_bt, cache: KVCache, shardings: _Shardings | None):
    """Qwen3 on T new tokens written at cache slots [index, index + T): (the last token's final hidden state
    after the final norm, feature-major [D, B]; the advanced cache). The model's `decoder_layer` in the
    `FEATURE_MAJOR` layout, one unrolled call per layer (each updates its own cache buffer in place)."""
    B, T = tokens_bt.shape
    positions_bt, key_mask_bs, allowed_bts = step_masks(mask_bt, cache)
    with jax.named_scope("embed"):
        x_dbt = jnp.take(weights["embed"], tokens_bt.reshape(B * T), axis=0).astype(canonical_dtype(c.dtype))
        x_dbt = x_dbt.T.reshape(-1, B, T)
    kv_sharding, features = (None, None) if shardings is None else (shardings.kv, shardings.features)
    ks, vs = [], []
    for p, k, v in zip(weights["layers"], cache.k, cache.v):
        x_dbt, (k, v) = decoder_layer(c, FEATURE_MAJOR, p, _constrain(x_dbt, features), positions_bt, allowed_bts,
                                      (k, v), cache.index)
        ks.append(_constrain(k, kv_sharding))
        vs.append(_constrain(v, kv_sharding))
    hidden_db = rms_norm(x_dbt[:, :, -1], weights["final_norm"], c.rms_norm_eps, axis=0)
    return hidden_db, cache.advanced(tuple(ks), tuple(vs), key_mask_bs, mask_bt)


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
    cache = KVCache(k=zeros, v=zeros, key_mask=jnp.zeros((B, cache_len), bool), index=jnp.zeros((), jnp.int32),
                    next_position=jnp.zeros((B,), jnp.int32))
    hidden_db, cache = _forward(config, weights, prompt_ids_bp, prompt_mask_bp, cache, shardings)
    logits_vb = _logits_vb(config, weights, hidden_db)
    if num_samples > 1:
        with jax.named_scope("repeat_samples"):
            rep = lambda x: _constrain(jnp.repeat(x, num_samples, axis=0), kv_sharding)  # noqa: E731
            cache = KVCache(k=tuple(map(rep, cache.k)), v=tuple(map(rep, cache.v)),
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
    return (KVCache(k=kv, v=kv, key_mask=shardings.rows, index=shardings.scalar, next_position=shardings.rows),
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
        return sample_vb(logits, keys, temperature, top_p, top_k)

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


def row_bucket(n_rows: int, mesh: Mesh | None = None, *, exact: bool = False) -> int:
    """The number of prompt rows a `generate` call of `n_rows` prompts runs: the rows per batch shard rounded
    up to a power of two, times the mesh's batch multiple (data × fsdp). A run thus compiles a few programs
    (one per power of two), all known in advance; the extra rows are inactive and change no real row.
    `exact`: only rounded up to the batch multiple (for calls whose sizes the run plans itself)."""
    if not (isinstance(n_rows, (int, np.integer)) and n_rows >= 1):
        raise ValueError(f"the number of rows must be a positive integer, got {n_rows!r}")
    multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
    per_shard = -(-int(n_rows) // multiple)
    return (per_shard if exact else 1 << (per_shard - 1).bit_length()) * multiple


def lower_sampler_programs(config, abstract_params: nnx.State, *, mesh: Mesh | None = None,
                           rules: parallel.Rules = parallel.SAMPLE_RULES, rows: int, prompt_len: int,
                           max_new_tokens: int, num_samples: int = 1, cache_dtype=None,
                           exact_rows: bool = False, platform: str | None = None) -> dict:
    """Lower, without any array, the two programs `Sampler(model, mesh=mesh, rules=rules,
    cache_dtype=cache_dtype).generate` runs for `rows` prompts whose longest has `prompt_len` tokens:
    {"prefill": jax.stages.Lowered, "decode": jax.stages.Lowered}.

    Same row and prompt buckets, static arguments, dtypes, shardings and donation as `generate` (with up to
    8 stop tokens), so compiling them fills jax's compilation cache and that `generate` then compiles
    nothing. `abstract_params`: as for `abstract_sampling_weights`. `.compile().memory_analysis()` of each
    gives its per-device memory. `platform` ("cuda", "tpu"): lower for that backend instead (not compilable
    here; a check that the programs hold nothing CPU-only).
    """
    n = num_samples
    shardings = _program_shardings(config, mesh, hashable_rules(rules))
    weights = abstract_sampling_weights(config, abstract_params, mesh, rules)
    Bp, bucket = row_bucket(rows, mesh, exact=exact_rows), bucket_length(prompt_len)
    cache_dtype = canonical_dtype(cache_dtype or config.dtype).name
    prefill_static, decode_static = _statics(cache_dtype, bucket, max_new_tokens, n)
    prefill_jit, decode_jit = _programs(config, shardings)

    def batched(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=None if mesh is None else
                                    parallel.batch_sharding(mesh, len(shape)))

    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731  (host scalars in `generate`)
    with _mesh_context(mesh):
        prompt = (batched((Bp, bucket), jnp.int32), batched((Bp, bucket), jnp.bool_))
        lower = functools.partial(parallel.lower_for, platform=platform)
        prefill = lower(prefill_jit, weights, *prompt, **prefill_static)
        cache, logits = jax.eval_shape(functools.partial(prefill_jit, **prefill_static), weights, *prompt)
        if shardings is not None:
            cache, logits = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                         (cache, logits), _prefill_out_shardings(config, shardings))
        decode = lower(decode_jit, weights, cache, logits, batched((Bp * n,), jnp.bool_),
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
        self.mesh, self.rules = mesh, hashable_rules(rules)
        self.cache_dtype = canonical_dtype(cache_dtype or self.config.dtype).name
        self._shardings = _program_shardings(self.config, mesh, self.rules)
        self.set_params(params)

    def set_params(self, params: nnx.State) -> None:
        """Replace the weights (e.g. after an RL update; any layout) with a copy in the sampling layout."""
        self.weights = None  # drop the old copy first: at most one sampling copy is alive at a time
        self.weights = sampling_weights(params, self.config, self.mesh, self.rules)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_token_ids: Sequence[int] = (),
                 num_samples: int = 1, pad_id: int = 0, exact_rows: bool = False) -> SampleOutput:
        """Sample `num_samples` completions of each prompt (token ids). See `SampleOutput` for the result.

        temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off. None of these, nor the seed,
        the stop tokens or pad_id, is compiled in: only the row bucket (`row_bucket`), the prompt bucket
        (`bucket_length`), max_new_tokens and num_samples select a program (`lower_sampler_programs` lowers
        the same programs ahead of time). `exact_rows`: run exactly as many rows as prompts (rounded up to the
        mesh's batch multiple) instead of the power-of-two bucket, for callers that plan their sizes.
        """
        _check_request(prompts, max_new_tokens, temperature, top_p, top_k, num_samples)
        n = num_samples
        B = len(prompts)
        Bp = row_bucket(B, self.mesh, exact=exact_rows)
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
        tokens, logprobs, lengths, finished = (parallel.to_host(x) for x in result)
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


