"""Qwen3 (dense) in Flax NNX, used functionally.

Every parameter carries its logical axes (`logical_axes` metadata); `fst_jax.parallel` maps them to mesh
axes. The decoder layers' parameters are stacked along a leading `layers` axis and the forward pass scans over
them, so tracing and compile time stay flat as depth grows.

Shape letters: B batch, T query tokens, S key slots (cache length), D hidden, N query heads, K kv heads,
G queries per kv head (N = K·G), H head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fst_jax.models.config import Qwen3Config, canonical_dtype

__all__ = ["Qwen3", "Qwen3Config", "Qwen3Output", "KVCache", "init_cache", "rms_norm", "apply_rope"]

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully-masked pad rows stay NaN-free


class KVCache(NamedTuple):
    """Decode state. Slots fill left to right; all rows share `index` (prompts are left-padded).

    k, v: [L, B, S, K, H]; key_mask: [B, S] which slots hold real tokens; index: next slot to write
    (int32 scalar); next_position: [B] the RoPE position of each row's next real token.
    """

    k: jax.Array
    v: jax.Array
    key_mask: jax.Array
    index: jax.Array
    next_position: jax.Array


class Qwen3Output(NamedTuple):
    logits: jax.Array | None          # [B, T, V], None when only hidden states were asked for
    last_hidden: jax.Array            # [B, T, D], after the final norm
    hidden_states: jax.Array | None   # [L+1, B, T, D]: embeddings, then each layer's output (pre final norm)
    cache: KVCache | None


def init_cache(config: Qwen3Config, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generation)."""
    dtype = canonical_dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   key_mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                   next_position=jnp.zeros((batch,), jnp.int32))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x²) + eps) · weight, the statistics in float32 whatever x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in HF's rotate-half convention: the two halves of head_dim form the pairs."""
    half = x_btnh.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x_btnh.shape[-1]))
    angles_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles_bth)[:, :, None, :], jnp.sin(angles_bth)[:, :, None, :]
    x32 = x_btnh.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_btnh.dtype)


def _param(rngs: nnx.Rngs, shape, axes, dtype, *, std: float | None = 0.02) -> nnx.Param:
    value = jnp.ones(shape, dtype) if std is None else std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=axes)


class DecoderStack(nnx.Module):
    """All decoder layers, each parameter stacked along a leading `layers` axis."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        c, pd = config, canonical_dtype(config.param_dtype)
        L, D, N, K, H, F = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                            c.intermediate_size)
        self.attn_norm = _param(rngs, (L, D), ("layers", "norm"), pd, std=None)
        self.q_proj = _param(rngs, (L, D, N, H), ("layers", "embed", "q_heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (L, N, H, D), ("layers", "q_heads", "head_dim", "embed"), pd)
        self.q_norm = _param(rngs, (L, H), ("layers", "norm"), pd, std=None)
        self.k_norm = _param(rngs, (L, H), ("layers", "norm"), pd, std=None)
        self.mlp_norm = _param(rngs, (L, D), ("layers", "norm"), pd, std=None)
        self.gate_proj = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd)
        self.up_proj = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd)
        self.down_proj = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), pd)

    def stacked(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in _LAYER_PARAMS}


_LAYER_PARAMS = ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "mlp_norm",
                 "gate_proj", "up_proj", "down_proj")

_REMAT = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


class Qwen3(nnx.Module):
    """Qwen3 causal LM.

    `model(input_ids, attention_mask=..., positions=...)` returns logits [B, T, V]; `model.forward(...)`
    also returns hidden states and threads a `KVCache` for step-by-step decoding. Left padding is handled by
    `attention_mask` (1 = real token); positions default to the count of real tokens before each one.
    """

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.config = config
        pd = canonical_dtype(config.param_dtype)
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), pd)
        self.layers = DecoderStack(config, rngs=rngs)
        self.final_norm = _param(rngs, (config.hidden_size,), ("norm",), pd, std=None)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), pd)

    def unembed_matrix(self) -> jax.Array:
        """[D, V]: the LM head (the transposed embedding when tied), in the compute dtype."""
        dtype = canonical_dtype(self.config.dtype)
        w = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return w.astype(dtype)

    def __call__(self, input_ids, *, attention_mask=None, positions=None) -> jax.Array:
        return self.forward(input_ids, attention_mask=attention_mask, positions=positions).logits

    def forward(self, input_ids, *, attention_mask=None, positions=None, cache: KVCache | None = None,
                output_hidden_states: bool = False, compute_logits: bool = True) -> Qwen3Output:
        """Run the decoder on `input_ids` [B, T].

        Without a cache, attention is causal over the T tokens. With a cache, the T tokens are written at
        slots [index, index + T) and attend to every real token already in the cache and to each other
        causally; the returned cache has advanced by T.
        """
        c = self.config
        dtype = canonical_dtype(c.dtype)
        B, T = input_ids.shape
        mask_bt = (jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool))
        if positions is None:
            start_b = jnp.zeros((B,), jnp.int32) if cache is None else cache.next_position
            positions = start_b[:, None] + jnp.maximum(jnp.cumsum(mask_bt, axis=1, dtype=jnp.int32) - 1, 0)

        with jax.named_scope("embed"):
            x_btd = jnp.take(self.embed[...], input_ids, axis=0).astype(dtype)
        x_btd = _constrain_batch(x_btd)

        if cache is None:
            key_mask_bs = mask_bt
            slot_t = jnp.arange(T)
            allowed_bts = key_mask_bs[:, None, :] & (slot_t[None, :, None] >= slot_t[None, None, :])
        else:
            S = cache.k.shape[2]
            slots = jnp.arange(S)
            new_in_window = (slots >= cache.index) & (slots < cache.index + T)
            written = jax.lax.dynamic_update_slice(jnp.zeros((B, S), bool), mask_bt, (0, cache.index))
            key_mask_bs = jnp.where(new_in_window[None, :], written, cache.key_mask)
            query_slot_t = cache.index + jnp.arange(T)
            allowed_bts = key_mask_bs[:, None, :] & (slots[None, None, :] <= query_slot_t[None, :, None])

        layer_fn = self._layer_fn(positions, allowed_bts, cache, output_hidden_states)
        if c.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=_REMAT[c.remat], prevent_cse=False)
        xs = self.layers.stacked()
        if cache is not None:
            xs = (xs, cache.k, cache.v)
        x_btd, (layer_out_lbtd, k_new, v_new) = jax.lax.scan(
            layer_fn, x_btd, xs)

        hidden_states = None
        if output_hidden_states:
            hidden_states = jnp.concatenate([jnp.take(self.embed[...], input_ids, axis=0).astype(dtype)[None],
                                             layer_out_lbtd], axis=0)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=k_new, v=v_new, key_mask=key_mask_bs, index=cache.index + T,
                                next_position=cache.next_position + mask_bt.sum(axis=1, dtype=jnp.int32))
        last_hidden = rms_norm(x_btd, self.final_norm[...], c.rms_norm_eps)
        logits = None
        if compute_logits:
            with jax.named_scope("unembed"):
                logits = jnp.einsum("btd,dv->btv", last_hidden, self.unembed_matrix())
        return Qwen3Output(logits=logits, last_hidden=last_hidden, hidden_states=hidden_states, cache=new_cache)

    def _layer_fn(self, positions_bt, allowed_bts, cache, keep_hidden: bool):
        c = self.config
        dtype = canonical_dtype(c.dtype)
        scale = c.head_dim ** -0.5

        def layer(x_btd, layer_in):
            if cache is None:
                p, k_cache, v_cache = layer_in, None, None
            else:
                p, k_cache, v_cache = layer_in
            p = {name: w.astype(dtype) for name, w in p.items()}
            B, T, _ = x_btd.shape

            h_btd = rms_norm(x_btd, p["attn_norm"], c.rms_norm_eps)
            with jax.named_scope("qkv"):
                q_btnh = jnp.einsum("btd,dnh->btnh", h_btd, p["q_proj"])
                k_btkh = jnp.einsum("btd,dkh->btkh", h_btd, p["k_proj"])
                v_btkh = jnp.einsum("btd,dkh->btkh", h_btd, p["v_proj"])
                q_btnh = rms_norm(q_btnh, p["q_norm"], c.rms_norm_eps)
                k_btkh = rms_norm(k_btkh, p["k_norm"], c.rms_norm_eps)
            with jax.named_scope("rope"):
                q_btnh = apply_rope(q_btnh, positions_bt, c.rope_theta)
                k_btkh = apply_rope(k_btkh, positions_bt, c.rope_theta)

            if cache is not None:
                with jax.named_scope("cache_update"):
                    idx = (0, cache.index, 0, 0)
                    k_cache = jax.lax.dynamic_update_slice(k_cache, k_btkh.astype(k_cache.dtype), idx)
                    v_cache = jax.lax.dynamic_update_slice(v_cache, v_btkh.astype(v_cache.dtype), idx)
                keys, values = k_cache.astype(dtype), v_cache.astype(dtype)
            else:
                keys, values = k_btkh, v_btkh

            with jax.named_scope("attention"):
                q_btkgh = q_btnh.reshape(B, T, c.num_kv_heads, c.queries_per_kv, c.head_dim)
                scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, keys).astype(jnp.float32) * scale
                scores = jnp.where(allowed_bts[:, None, None, :, :], scores, _MASK_VALUE)
                probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
                attn_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs, values)
                attn_btnh = attn_btkgh.reshape(B, T, c.num_heads, c.head_dim)
                x_btd = x_btd + jnp.einsum("btnh,nhd->btd", attn_btnh, p["o_proj"])

            with jax.named_scope("mlp"):
                h_btd = rms_norm(x_btd, p["mlp_norm"], c.rms_norm_eps)
                gate_btf = jnp.einsum("btd,df->btf", h_btd, p["gate_proj"])
                up_btf = jnp.einsum("btd,df->btf", h_btd, p["up_proj"])
                x_btd = x_btd + jnp.einsum("btf,fd->btd", jax.nn.silu(gate_btf) * up_btf, p["down_proj"])
            x_btd = _constrain_batch(x_btd)
            return x_btd, (x_btd if keep_hidden else None, k_cache, v_cache)

        return layer


def _constrain_batch(x: jax.Array) -> jax.Array:
    """Keep activations split over the batch axes when a mesh is active (jax.set_mesh); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    if not batch_axes:
        return x
    size = 1
    for a in batch_axes:
        size *= mesh.shape[a]
    if x.shape[0] % size:
        return x
    spec = jax.sharding.PartitionSpec(batch_axes, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)
