"""The request engine's jitted programs: continuous batching over a fixed number of slots, attention bounded by
the live length. The host loop that drives them is `fst_jax.sampling.engine`.

A call streams requests (a prompt, its number of samples and token limit) through `slots` rows in flight:

    insert   one jitted program per (prompt rows I, prompt bucket P, samples n): prefill I prompts over their
             own P keys (a fresh [I, K, P, H] cache, never the slot buffer; in query chunks when the scores
             would exceed `prefill_scores_mb`) and scatter the KV of all but the prompt's last token into its n
             free slots (`.at[slot_ids]`): the samples share one prefill. The last prompt token is each slot's
             token to feed: the first decode step writes its KV and draws the sample's first token, so an
             insertion holds no LM head and no token draw (a third of its compile time on the CPU).
    decode   one jitted `lax.while_loop` per (rows, length bucket W): each step feeds every live row's last
             token, writes its KV at the row's own column and attends over the first W columns only; the
             loop stops after `max_steps`, when `want_free` slots are free (the host then inserts), when every
             row is done, or when a live row reaches column W (the host picks a larger W).
    compact  when no request waits and the live rows fit a smaller row bucket (¾, ½, ⅜, ¼ … of the slots on
             one CPU device, halves on a mesh, down to 4 per shard: `tail_buckets`), gather them into it.

The host touches the device once per chunk (a few scalars and the finished rows' tokens), never per token.

Cache: per-slot contiguous buffers, each layer's [slots, K, S, H] (S = the longest prompt bucket + the longest
completion). With every row's tokens in columns [0, length), a decode step's attention reads a static prefix
[0, W) of the buffer — one dense slice, no page table to gather through — and an insertion is one scatter.
Pages would share prefixes and waste no columns on short rows; at our lengths (≤ 8 K columns, one prompt
prefix per G samples copied once) the contiguous buffer costs at most a prompt bucket of padding per row.

Randomness: a sample's id is its index in the caller's output (request r's sample j: the samples of requests
0 … r-1, plus j), and its token t is drawn with fold_in(fold_in(key(seed), id), t) — a function of the seed,
the request's position in the caller's list, the sample's index and the token's position only, so a
completion never depends on its slot, its neighbours in flight, the slot count or the schedule, and two
identical prompts in one call get different noise. (It is the key the static sampler that the engine replaced gave
row id of a call, so a run's records did not change with the switch beyond float rounding.)

`draw`: "gumbel" (Gumbel-max over the vocabulary, the run's default; its noise is made inside the reduction that
picks the token, `noise`) or "inverse_cdf" (one uniform per row; `token_choice`). Same distribution, different
noise.

Shape letters: B slots (rows), I inserted prompts, P prompt bucket, S cache columns, W attended columns,
M longest completion, V vocab, K kv heads, H head dim, D hidden.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from fst_jax.models.config import canonical_dtype
from fst_jax.models.qwen3 import FEATURE_MAJOR, KVCache, decoder_layer, rms_norm, step_masks
from fst_jax.sampling.token_choice import sample_vb

__all__ = ["BLOCK", "PREFILL_SCORES_MB", "EngineState", "empty_state", "length_buckets", "prefill_chunk", "programs",
           "row_buckets", "tail_buckets"]

BLOCK = 64  # attended columns are a power-of-two multiple of this (or the whole buffer)
PREFILL_SCORES_MB = 2048  # the largest float32 score block [prompts, heads, chunk, bucket] of a prefill, all devices


class EngineState(NamedTuple):
    """The slots on the device. k, v: L × [B, K, S, H]; key_mask [B, S]: columns holding real tokens; token
    [B]: the last sampled token (fed next); column [B]: where its KV goes; position [B]: its RoPE position;
    count [B]: tokens generated; limit [B]: the row's max_new_tokens; live [B]: still decoding; finished
    [B]: ended by a stop token; keys [B, 2]: the sample's PRNG key data; out_tokens, out_logprobs [B, M]."""

    k: tuple
    v: tuple
    key_mask: jax.Array
    token: jax.Array
    column: jax.Array
    position: jax.Array
    count: jax.Array
    limit: jax.Array
    live: jax.Array
    finished: jax.Array
    keys: jax.Array
    out_tokens: jax.Array
    out_logprobs: jax.Array


def length_buckets(columns: int) -> list[int]:
    """The attended widths a decode chunk can run at: BLOCK·2^i below `columns`, then `columns` itself."""
    out, w = [], BLOCK
    while w < columns:
        out.append(w)
        w *= 2
    return out + [columns]


def row_buckets(slots: int, multiple: int = 1, smallest: int = 8, factor: int = 4) -> list[int]:
    """The row counts a call starts with and its tail is compacted to: slots, slots/factor, … while a multiple
    of `multiple` and ≥ `smallest` rows per shard, then `smallest` per shard itself when the last is at least 2×
    that (largest first), so that a small call never holds all the slots, nor more than twice its rows once it
    has at least `smallest` (at 64 slots an 8-row call started with 16 and ran 1.24× slower per token: the CPU
    decode step of `bench.py sampler`'s model took 62.9 ms at 16 rows, 50.9 ms at 8). Steps of 4 keep the
    programs few (each row count has its own decode per width) at the price of compacting later in the tail."""
    out, floor = [slots], smallest * multiple
    while out[-1] % (factor * multiple) == 0 and out[-1] // factor >= floor:
        out.append(out[-1] // factor)
    if out[-1] >= 2 * floor:
        out.append(floor)
    return out


TAIL_ROWS = 4  # per batch shard: the smallest batch a call's tail is compacted to


def tail_buckets(slots: int, multiple: int = 1, fine: bool = False) -> list[int]:
    """The row counts a call's tail is compacted to once no request waits: halving from `slots` down to
    `TAIL_ROWS` per shard (`row_buckets` with factor 2); `fine`: also the 3·2^k per shard between them (steps of
    ¾ and ⅔: 128, 96, 64, 48, … 6, 4), for a single CPU device. A CPU decode step costs nearly in proportion to
    its rows (the rollout benchmark's model at width 512: 22.4 ms at 32 rows, 12.0 at 16, 6.7 at 8, 3.9 at 4),
    and with geometric completion lengths the last long rows decode alone for hundreds of steps: halving gave
    87% row utilisation at 64 slots against 76% in quarters down to 8; the finer steps took the rollout
    benchmark's 128 slots from 80% to 87.5% (A/B alternating: medians 15.3 -> 13.6 s). On an accelerator a decode
    step costs about the same at any small row count (it reads the weights), so a mesh keeps the fewer
    programs of halving. Only calls that compact (completions that may outlast two chunks, `engine.compacts`) run
    these programs, so short calls compile none of them."""
    halving = row_buckets(slots, multiple, smallest=TAIL_ROWS, factor=2)
    if not fine:
        return halving
    per_shard = {slots // multiple}
    size = TAIL_ROWS
    while size < slots // multiple:
        per_shard |= {size} | ({size * 3 // 2} if size * 3 // 2 < slots // multiple else set())
        size *= 2
    return sorted((b * multiple for b in per_shard), reverse=True)


def prefill_chunk(config, prompts: int, bucket: int, scores_mb: float = PREFILL_SCORES_MB) -> int:
    """Query tokens per prefill chunk: the whole bucket when the float32 scores [prompts, heads, bucket, bucket]
    fit `scores_mb`, else the largest power-of-two divisor of the bucket (at least BLOCK) whose scores
    [prompts, heads, chunk, bucket] do."""
    chunk = bucket
    while chunk > BLOCK and chunk % 2 == 0 and prompts * config.num_heads * chunk * bucket * 4 > scores_mb * 2**20:
        chunk //= 2
    return chunk


def empty_state(config, rows: int, columns: int, max_new_tokens: int, cache_dtype) -> EngineState:
    """Free slots (host-side zeros are enough: every program overwrites what it reads)."""
    dtype = canonical_dtype(cache_dtype)
    kv = lambda: tuple(jnp.zeros((rows, config.num_kv_heads, columns, config.head_dim), dtype)  # noqa: E731
                       for _ in range(config.num_layers))
    zeros = lambda: jnp.zeros((rows,), jnp.int32)  # noqa: E731  (distinct buffers: every one is donated)
    return EngineState(k=kv(), v=kv(), key_mask=jnp.zeros((rows, columns), bool), token=zeros(), column=zeros(),
                       position=zeros(), count=zeros(), limit=zeros(), live=jnp.zeros((rows,), bool),
                       finished=jnp.zeros((rows,), bool), keys=jnp.zeros((rows, 2), jnp.uint32),
                       out_tokens=jnp.zeros((rows, max_new_tokens), jnp.int32),
                       out_logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32))


def _logits_vb(c, weights: dict, hidden_db: jax.Array) -> jax.Array:
    """LM-head logits [V, B] in float32, weight-first (on XLA:CPU it streams the embedding ~2x faster)."""
    unembed_vd = weights["embed"] if weights["unembed_vd"] is None else weights["unembed_vd"]
    with jax.named_scope("unembed"):
        return (unembed_vd.astype(canonical_dtype(c.dtype)) @ hidden_db).astype(jnp.float32)


def _embed_db(c, weights: dict, tokens: jax.Array) -> jax.Array:
    """Feature-major embeddings [D, tokens...] of int ids of any shape."""
    x = jnp.take(weights["embed"], tokens.reshape(-1), axis=0).astype(canonical_dtype(c.dtype))
    return x.T.reshape(-1, *tokens.shape)


def _sample_keys(seed, sample_id_b) -> jax.Array:
    """Key data [B, 2] of fold_in(key(seed), sample id)."""
    base = jax.random.key(seed)
    return jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(base, i))(sample_id_b))


def _choose(keys_b2, count_b, logits_vb, params, draw):
    """Sample each row's token number `count_b` from its own key: (tokens [B], logprobs [B])."""
    temperature, top_p, top_k = params
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys_b2), count_b)
    return sample_vb(logits_vb, keys, temperature, top_p, top_k, draw=draw)


# -------------------------------------------------------------------------------------------- the programs

def _insert(weights, state: EngineState, prompt_ids_ip, prompt_mask_ip, slot_ids, first_ids, limits, seed, *,
            config, num_samples, shardings, prefill_scores_mb=PREFILL_SCORES_MB):
    """Prefill I prompts over their own keys and place each one's `num_samples` samples in `slot_ids` [I·n]
    (index B = no slot: padding prompts); `first_ids` [I]: the sample id of each prompt's sample 0. Prompts are
    left-padded to P: a slot holds the KV of columns [0, P-1) and feeds the prompt's last token (column P-1)
    at its first decode step, which draws token 0 of the sample's key. Each layer's attention runs in query
    chunks (`prefill_chunk`) when its scores would exceed `prefill_scores_mb`."""
    c, n = config, num_samples
    I, P = prompt_ids_ip.shape
    dtype = state.k[0].dtype
    zeros = jnp.zeros((I, c.num_kv_heads, P, c.head_dim), dtype)
    Q = prefill_chunk(c, I, P, prefill_scores_mb)
    cache = KVCache(k=None, v=None, key_mask=jnp.zeros((I, P), bool), index=jnp.zeros((), jnp.int32),
                    next_position=jnp.zeros((I,), jnp.int32))
    # the last token's KV is the first decode step's to write: the prefill stops before it
    positions_ip, key_mask_ip, allowed_ipp = step_masks(prompt_mask_ip.at[:, -1].set(False), cache)
    x = _embed_db(c, weights, prompt_ids_ip)
    new_k, new_v = [], []
    for p in weights["layers"]:
        x, (k, v) = decoder_layer(c, FEATURE_MAJOR, p, x, positions_ip, allowed_ipp, (zeros, zeros), 0,
                                  query_chunk=Q if Q < P else None)
        new_k.append(k)
        new_v.append(v)

    rep = lambda a: jnp.repeat(a, n, axis=0)  # noqa: E731  (prompt-major: prompt i's samples at i·n … i·n+n-1)
    sample_r = rep(first_ids) + jnp.tile(jnp.arange(n, dtype=jnp.int32), I)
    length_r = rep(prompt_mask_ip.sum(axis=1, dtype=jnp.int32))
    S = state.key_mask.shape[1]
    key_mask_rs = jnp.zeros((I * n, S), bool).at[:, :P].set(rep(key_mask_ip))
    put = lambda buf, rows: buf.at[slot_ids].set(rows, mode="drop")  # noqa: E731
    zeros_r = jnp.zeros((I * n,), jnp.int32)
    with jax.named_scope("insert_kv"):
        ks = tuple(buf.at[slot_ids, :, :P].set(rep(k), mode="drop") for buf, k in zip(state.k, new_k))
        vs = tuple(buf.at[slot_ids, :, :P].set(rep(v), mode="drop") for buf, v in zip(state.v, new_v))
    return _constrain_state(shardings, EngineState(
        k=ks, v=vs, key_mask=put(state.key_mask, key_mask_rs), token=put(state.token, rep(prompt_ids_ip[:, -1])),
        column=put(state.column, jnp.full((I * n,), P - 1, jnp.int32)), position=put(state.position, length_r - 1),
        count=put(state.count, zeros_r), limit=put(state.limit, rep(limits)),
        live=put(state.live, jnp.ones((I * n,), bool)), finished=put(state.finished, jnp.zeros((I * n,), bool)),
        keys=put(state.keys, _sample_keys(seed, sample_r)), out_tokens=state.out_tokens,
        out_logprobs=state.out_logprobs))


def _decode(weights, state: EngineState, max_steps, want_free, temperature, top_p, top_k, stop_ids, *, config,
            width, draw, shardings):
    """Decode steps over the first `width` columns until `max_steps` (static: a chunk's length), `want_free` free
    rows, no live row, or a live row reaching column `width`. Returns (state, steps run)."""
    c, W = config, width
    B = state.live.shape[0]
    rows = jnp.arange(B)
    params = (temperature, top_p, top_k)
    # float32 slots (the CPU's): each step writes every live row's KV at the row's own column (a done row's, past
    # the window, is dropped) and attends over the first W columns, the whole buffer carried uncopied when W is
    # all of it (XLA had copied the window twice per layer per step around a shared scratch column). 16-bit
    # slots keep that scratch column W: the layer writes every row's new KV there, then each row's is moved to
    # its own column — XLA:CPU scatters bfloat16 only through a float32 copy of the whole buffer, which the
    # plan of a bf16 run (planned on the CPU for an accelerator) would count as +24 GB at 8B.
    per_row = jnp.dtype(state.k[0].dtype).itemsize == 4
    whole = per_row and W == state.key_mask.shape[1]
    if whole:
        window = (state.k, state.v, state.key_mask)
    elif per_row:
        window = (tuple(buf[:, :, :W] for buf in state.k), tuple(buf[:, :, :W] for buf in state.v),
                  state.key_mask[:, :W])
    else:
        pad = lambda buf: jnp.concatenate([buf[:, :, :W], jnp.zeros_like(buf[:, :, :1])], axis=2)  # noqa: E731
        window = (tuple(map(pad, state.k)), tuple(map(pad, state.v)), state.key_mask[:, :W])

    def cond(carry):
        step, _, s = carry
        return ((step < max_steps) & jnp.any(s.live) & (jnp.sum(~s.live) < want_free)
                & ~jnp.any(s.live & (s.column >= W)))

    def body(carry):
        step, (ks, vs, key_mask_bw), s = carry
        column_b = jnp.where(s.live, s.column, W if per_row else W + 1)  # a done row writes nothing (dropped)
        if per_row:
            key_mask_bw = key_mask_bw.at[rows, column_b].set(True, mode="drop")
            allowed_b1w = key_mask_bw[:, None, :]
        else:
            allowed_b1w = jnp.concatenate([key_mask_bw, jnp.ones((B, 1), bool)], axis=1)[:, None, :]
        x = _embed_db(c, weights, s.token[:, None])
        new_ks, new_vs = [], []
        for p, k, v in zip(weights["layers"], ks, vs):
            x, (k, v) = decoder_layer(c, FEATURE_MAJOR, p, x, s.position[:, None], allowed_b1w, (k, v),
                                      column_b if per_row else W)
            if not per_row:
                with jax.named_scope("cache_update"):
                    k = k.at[rows, :, column_b].set(k[:, :, W], mode="drop")
                    v = v.at[rows, :, column_b].set(v[:, :, W], mode="drop")
            new_ks.append(k)
            new_vs.append(v)
        if not per_row:
            key_mask_bw = key_mask_bw.at[rows, column_b].set(True, mode="drop")
        hidden_db = rms_norm(x[:, :, -1], weights["final_norm"], c.rms_norm_eps, axis=0)
        token_b, logprob_b = _choose(s.keys, s.count, _logits_vb(c, weights, hidden_db), params, draw)
        at_b = jnp.where(s.live, s.count, s.out_tokens.shape[1])
        stopped_b = s.live & jnp.any(token_b[:, None] == stop_ids[None, :], axis=-1)
        count_b = s.count + s.live
        s = s._replace(token=jnp.where(s.live, token_b, s.token), column=s.column + s.live,
                       position=s.position + s.live, count=count_b,
                       live=s.live & ~stopped_b & (count_b < s.limit), finished=s.finished | stopped_b,
                       out_tokens=s.out_tokens.at[rows, at_b].set(token_b, mode="drop"),
                       out_logprobs=s.out_logprobs.at[rows, at_b].set(logprob_b, mode="drop"))
        return step + 1, (tuple(new_ks), tuple(new_vs), key_mask_bw), s

    start_b = state.column
    rest = state._replace(k=(), v=(), key_mask=None)  # the buffers travel once: in the window
    steps, (ks, vs, key_mask_bw), rest = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), window, rest))
    if whole:
        return _constrain_state(shardings, rest._replace(k=ks, v=vs, key_mask=key_mask_bw)), steps
    # Back into the full buffers go only the columns a row can have written: `max_steps` from its column at the
    # chunk's start (clamped into the window; the rest of a slice rewrites what it held), not the whole window.
    L = min(max_steps, W)
    start_b = jnp.clip(start_b, 0, W - L)

    def unpad(full_bksh, win_bksh):
        piece = jax.vmap(lambda w, s: jax.lax.dynamic_slice_in_dim(w, s, L, axis=1))(win_bksh, start_b)
        return jax.vmap(lambda f, p, s: jax.lax.dynamic_update_slice_in_dim(f, p, s, axis=1))(full_bksh, piece,
                                                                                            start_b)
    state = rest._replace(k=tuple(map(unpad, state.k, ks)), v=tuple(map(unpad, state.v, vs)),
                          key_mask=jax.lax.dynamic_update_slice(state.key_mask, key_mask_bw, (0, 0)))
    return _constrain_state(shardings, state), steps


def _compact(state: EngineState, keep, *, shardings):
    """The rows `keep` [B'] of every slot array (the tail's live rows in a smaller batch)."""
    take = lambda x: jnp.take(x, keep, axis=0)  # noqa: E731
    return _constrain_state(shardings, jax.tree.map(take, state))


def _empty(*, config, rows, columns, max_new_tokens, cache_dtype, shardings):
    return _constrain_state(shardings, empty_state(config, rows, columns, max_new_tokens, cache_dtype))


def _constrain_state(shardings: EngineState | None, state: EngineState) -> EngineState:
    """On a mesh, every slot array keeps the layout `shardings` names (rows over the batch axes, KV heads
    over `tensor`), so each program's outputs are the next one's inputs as they were planned."""
    if shardings is None:
        return state
    return jax.tree.map(jax.lax.with_sharding_constraint, state, shardings)


@functools.lru_cache(maxsize=64)
def programs(config, draw: str = "gumbel", shardings: EngineState | None = None,
             prefill_scores_mb: float = PREFILL_SCORES_MB):
    """The engine's jitted (insert, decode, compact, empty) for one model config, token draw and slot layout
    (`shardings`: an `EngineState` of NamedShardings on a mesh, else None) and prefill score limit
    (`prefill_chunk`); statics select the compiled
    variant: insert by (I, P, num_samples), decode by (rows, width), compact by (rows, kept rows), empty (the
    free slots, made on the device) by its shapes."""
    statics = dict(config=config, draw=draw, shardings=shardings)
    # On a mesh the outputs carry exactly `shardings` (out_shardings): then the programs lowered ahead of time for
    # those shardings are the ones a call finds in jax's caches (an inferred sharding may be spelled differently).
    out = {} if shardings is None else dict(out_shardings=shardings)
    steps = {} if shardings is None else dict(out_shardings=(shardings, NamedSharding(shardings.token.mesh, P())))
    insert_jit = jax.jit(functools.partial(_insert, prefill_scores_mb=prefill_scores_mb, config=config,
                                           shardings=shardings),
                         static_argnames=("num_samples",),
                         donate_argnames=("state",), **out)
    decode_jit = jax.jit(functools.partial(_decode, **statics), static_argnames=("max_steps", "width"),
                         donate_argnames=("state",), **steps)
    compact_jit = jax.jit(functools.partial(_compact, shardings=shardings), **out)  # a gather into fewer rows
    empty_jit = jax.jit(functools.partial(_empty, config=config, shardings=shardings),
                        static_argnames=("rows", "columns", "max_new_tokens", "cache_dtype"), **out)
    return insert_jit, decode_jit, compact_jit, empty_jit

