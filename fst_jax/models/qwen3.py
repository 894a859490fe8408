"""Qwen3 (dense) in Flax NNX, used functionally.

Every parameter carries its logical axes (`logical_axes` metadata); `fst_jax.runtime.parallel` maps them to mesh
axes. The decoder layers' parameters are stacked along a leading `layers` axis and the forward pass scans over
them, so tracing and compile time stay flat as depth grows.

One decoder layer, `decoder_layer`, serves training (no cache), prefill and decode (a KV cache). It is
parameterised by a `Layout`: the model's own token-major layout ([B, T, D] activations, [in, ..., out]
weights), or the feature-major one the sampler decodes with ([D, B, T] activations, [out, ..., in] weights
applied weight-first: for the few tokens of a decode step XLA:CPU streams the weights ~1.6x faster that way).
The layout only names the axes of each contraction; the math is written once. `Qwen3Config.attention`
picks the attention kernel for query blocks of more than one token (`fst_jax.models.attention`: cuDNN's
fused kernel for training-style forwards on a CUDA GPU, einsums elsewhere).

Shape letters: B batch, T query tokens, S key slots (cache length), D hidden, N query heads, K kv heads,
G queries per kv head (N = K·G), H head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fst_jax.models import attention
from fst_jax.models.config import Qwen3Config, canonical_dtype

__all__ = ["Qwen3", "Qwen3Config", "Qwen3Output", "KVCache", "Layout", "TOKEN_MAJOR", "FEATURE_MAJOR",
           "decoder_layer", "step_masks", "init_cache", "rms_norm", "apply_rope"]

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully-masked pad rows stay NaN-free


class KVCache(NamedTuple):
    """Decode state. Slots fill left to right; all rows share `index` (prompts are left-padded).

    k, v: each layer's [B, K, S, H] buffer (kv heads before slots: attention reads a head's keys
    contiguously), stacked as [L, B, K, S, H] for `Qwen3.forward`'s scan, or a tuple of L arrays (the
    sampler's decode loop updates each in place); key_mask: [B, S] which slots hold real tokens; index: next
    slot to write (int32 scalar); next_position: [B] the RoPE position of each row's next real token.
    """

    k: jax.Array | tuple
    v: jax.Array | tuple
    key_mask: jax.Array
    index: jax.Array
    next_position: jax.Array

    def advanced(self, k, v, key_mask_bs: jax.Array, mask_bt: jax.Array) -> "KVCache":
        """The cache after T new tokens (`mask_bt` real) were written at slots [index, index + T)."""
        return KVCache(k=k, v=v, key_mask=key_mask_bs, index=self.index + mask_bt.shape[1],
                       next_position=self.next_position + mask_bt.sum(axis=1, dtype=jnp.int32))


class Qwen3Output(NamedTuple):
    logits: jax.Array | None          # [B, T, V], None when only hidden states were asked for
    last_hidden: jax.Array            # [B, T, D], after the final norm
    hidden_states: jax.Array | None   # [L+1, B, T, D]: embeddings, then each layer's output (pre final norm)
    cache: KVCache | None


def init_cache(config: Qwen3Config, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generation), layers stacked."""
    dtype = canonical_dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   key_mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                   next_position=jnp.zeros((batch,), jnp.int32))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """x / sqrt(mean(x²) + eps) · weight over `axis`, the statistics in float32 whatever x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    shape = [1] * x.ndim
    shape[axis] = -1
    return normed.astype(x.dtype) * weight.astype(x.dtype).reshape(shape)


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


# ---------------------------------------------------------------------------------------- the decoder layer

class Layout(NamedTuple):
    """How one decoder layer's activations and weights are stored, as einsum subscripts.

    x: the residual stream ("btd" token-major, "dbt" feature-major; the MLP's hidden activations are x with
    f for d). The weights: q_proj (d → n h), kv_proj (k_proj and v_proj, d → k h), o_proj (n h → d),
    up_proj (gate_proj and up_proj, d → f), down_proj (f → d). weight_first: the weight is the left operand
    of each projection's dot (the output's weight dims lead, so the weight streams row by row).
    """

    x: str
    q_proj: str
    kv_proj: str
    o_proj: str
    up_proj: str
    down_proj: str
    weight_first: bool


# The model's parameters (`DecoderStack`, one layer's slice) and `Qwen3.forward`.
TOKEN_MAJOR = Layout(x="btd", q_proj="dnh", kv_proj="dkh", o_proj="nhd", up_proj="df", down_proj="fd",
                     weight_first=False)
# The sampler's decode weights (`fst_jax.sampling.sampling_weights`): every projection [out..., in].
FEATURE_MAJOR = Layout(x="dbt", q_proj="nhd", kv_proj="khd", o_proj="dnh", up_proj="fd", down_proj="df",
                       weight_first=True)


def _project(layout: Layout, x: jax.Array, x_axes: str, w: jax.Array, w_axes: str, out_axes: str) -> jax.Array:
    if not layout.weight_first:
        return jnp.einsum(f"{x_axes},{w_axes}->{out_axes}", x, w)
    # Weight-first as one 2-D matmul [out, in] @ [in, tokens], the weight stored outputs-first so that it is a
    # free reshape: given 3-D operands, XLA:CPU chose to transpose (copy) the whole weight every decode step.
    contracted = [a for a in w_axes if a in x_axes]
    w_free, x_free = [a for a in w_axes if a not in x_axes], [a for a in x_axes if a not in w_axes]
    size = dict(zip(w_axes, w.shape)) | dict(zip(x_axes, x.shape))
    prod = lambda axes: int(np.prod([size[a] for a in axes]))  # noqa: E731
    w_2d = w.transpose([w_axes.index(a) for a in w_free + contracted]).reshape(prod(w_free), prod(contracted))
    x_2d = x.transpose([x_axes.index(a) for a in contracted + x_free]).reshape(prod(contracted), prod(x_free))
    y = (w_2d @ x_2d).reshape([size[a] for a in w_free + x_free])
    return y.transpose([(w_free + x_free).index(a) for a in out_axes])


def step_masks(mask_bt: jax.Array, cache: KVCache | None):
    """(positions [B, T], key_mask [B, S], allowed [B, T, S]) for T new tokens (`mask_bt`: real ones).

    Positions count the real tokens before each one (left padding takes no position). Without a cache,
    attention is causal over the T tokens; with one, the tokens sit at slots [index, index + T) and attend to
    every real token already cached and to each other causally.
    """
    B, T = mask_bt.shape
    before_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=1, dtype=jnp.int32) - 1, 0)
    if cache is None:
        slot_t = jnp.arange(T)
        return before_bt, mask_bt, mask_bt[:, None, :] & (slot_t[None, :, None] >= slot_t[None, None, :])
    S = cache.key_mask.shape[1]
    key_mask_bs = jax.lax.dynamic_update_slice(cache.key_mask, mask_bt, (0, cache.index))
    query_slot_t = cache.index + jnp.arange(T)
    allowed_bts = key_mask_bs[:, None, :] & (jnp.arange(S)[None, None, :] <= query_slot_t[None, :, None])
    return cache.next_position[:, None] + before_bt, key_mask_bs, allowed_bts


def decoder_layer(config: Qwen3Config, layout: Layout, p: dict, x: jax.Array, positions_bt: jax.Array,
                  allowed_bts: jax.Array, kv: tuple | None = None, index: jax.Array | None = None,
                  lengths_b: jax.Array | None = None, query_chunk: int | None = None):
    """One Qwen3 decoder layer on B·T tokens: (x after the layer, the updated (k, v) cache or None).

    `p`: the layer's weights in `layout`; `x`: the residual stream in `layout.x`. With `kv` (two [B, K, S, H]
    buffers), the tokens' keys and values are written at slot `index` (a scalar; or, for one token per row,
    each row's own slot [B], a slot past the buffer writing nothing) and attention reads the cache;
    without, it reads the T tokens themselves (`allowed_bts` [B, T, S] says which keys each query sees;
    `lengths_b`, when the rows are right-padded, says the same as per-row lengths, which lets a fused kernel
    run instead — `fst_jax.models.attention`). `query_chunk` (a divisor of T): the einsum attention scores
    that many queries at a time, so no [B, N, T, S] score tensor is built whole. Norms, RoPE and softmax run in
    float32, the rest in `config.dtype`.
    """
    c = config
    dtype = canonical_dtype(c.dtype)
    p = {name: w.astype(dtype) for name, w in p.items()}
    features = layout.x.index("d")
    hidden = layout.x.replace("d", "f")

    h = rms_norm(x, p["attn_norm"], c.rms_norm_eps, axis=features)
    with jax.named_scope("qkv"):
        q_btnh = _project(layout, h, layout.x, p["q_proj"], layout.q_proj, "btnh")
        k_btkh = _project(layout, h, layout.x, p["k_proj"], layout.kv_proj, "btkh")
        v_btkh = _project(layout, h, layout.x, p["v_proj"], layout.kv_proj, "btkh")
        q_btnh = rms_norm(q_btnh, p["q_norm"], c.rms_norm_eps)
        k_btkh = rms_norm(k_btkh, p["k_norm"], c.rms_norm_eps)
    with jax.named_scope("rope"):
        q_btnh = apply_rope(q_btnh, positions_bt, c.rope_theta)
        k_btkh = apply_rope(k_btkh, positions_bt, c.rope_theta)
    if kv is None:
        keys, values, kv_axes = k_btkh, v_btkh, "bskh"
    else:
        with jax.named_scope("cache_update"):
            k_cache, v_cache = kv
            if jnp.ndim(index) == 1:  # one token per row, each at its own slot (slots past the end: dropped)
                rows = jnp.arange(k_btkh.shape[0])
                k_cache = k_cache.at[rows, :, index].set(k_btkh[:, 0].astype(k_cache.dtype), mode="drop")
                v_cache = v_cache.at[rows, :, index].set(v_btkh[:, 0].astype(v_cache.dtype), mode="drop")
            else:
                k_cache = jax.lax.dynamic_update_slice(
                    k_cache, k_btkh.transpose(0, 2, 1, 3).astype(k_cache.dtype), (0, 0, index, 0))
                v_cache = jax.lax.dynamic_update_slice(
                    v_cache, v_btkh.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, index, 0))
            kv = (k_cache, v_cache)
        keys, values, kv_axes = k_cache.astype(dtype), v_cache.astype(dtype), "bksh"
    with jax.named_scope("attention"):
        attn_btnh = _attention(c, q_btnh, keys, values, kv_axes, allowed_bts, lengths_b, query_chunk)
        x = x + _project(layout, attn_btnh, "btnh", p["o_proj"], layout.o_proj, layout.x)
    with jax.named_scope("mlp"):
        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps, axis=features)
        gate = _project(layout, h, layout.x, p["gate_proj"], layout.up_proj, hidden)
        up = _project(layout, h, layout.x, p["up_proj"], layout.up_proj, hidden)
        x = x + _project(layout, jax.nn.silu(gate) * up, hidden, p["down_proj"], layout.down_proj, layout.x)
    return x, kv


def _attention(c: Qwen3Config, q_btnh, keys, values, kv_axes: str, allowed_bts, lengths_b=None,
               query_chunk: int | None = None) -> jax.Array:
    """Grouped-query attention [B, T, N, H] of the queries over `keys`/`values` ("bskh" or "bksh").

    Query head n reads kv head n // G. The kernel is `attention.select_kernel`'s choice for
    `config.attention`: cuDNN's fused causal attention with per-row lengths (a CUDA GPU, no cache, right
    padding, bf16/fp16), `jax.nn.dot_product_attention`'s XLA implementation, or the einsums below.
    Rows with no allowed key (left padding) give finite values that nothing reads. `query_chunk`: the einsums
    run over that many queries at a time (`lax.map` over the blocks), each block's softmax over every key.
    """
    B, T, N, H = q_btnh.shape
    K, G = c.num_kv_heads, c.queries_per_kv
    platform = attention.current_platform()
    kernel, reason = attention.select_kernel(c.attention, platform=platform, dtype=jnp.dtype(q_btnh.dtype).name,
                                             head_dim=H, num_queries=T, cached=kv_axes == "bksh",
                                             right_padded=lengths_b is not None)
    if reason is not None and platform != "cpu" and T > 1:
        attention.log_fallback(kernel, reason)
    if kernel == attention.CUDNN:
        # A row of length 0 (an all-padding row) still gets one key: its output is never read, and cuDNN's
        # backward pass is not defined for an empty row.
        lengths_b = jnp.maximum(lengths_b, 1).astype(jnp.int32)
        return jax.nn.dot_product_attention(q_btnh, keys, values, scale=H ** -0.5, is_causal=True,
                                            query_seq_lengths=lengths_b, key_value_seq_lengths=lengths_b,
                                            implementation="cudnn")
    if kernel == attention.JAX_XLA:
        if kv_axes == "bksh":
            keys, values = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)
        return jax.nn.dot_product_attention(q_btnh, keys, values, mask=allowed_bts[:, None], scale=H ** -0.5,
                                            implementation="xla")
    if query_chunk is not None and query_chunk < T:
        if T % query_chunk:
            raise ValueError(f"query_chunk={query_chunk} does not divide the {T} queries")
        blocks = T // query_chunk
        split = lambda a: a.reshape(B, blocks, query_chunk, *a.shape[2:]).swapaxes(0, 1)  # noqa: E731
        out = jax.lax.map(lambda qa: _attention(c, qa[0], keys, values, kv_axes, qa[1]),
                          (split(q_btnh), split(allowed_bts)))
        return out.swapaxes(0, 1).reshape(B, T, N, H)
    q_btkgh = q_btnh.reshape(B, T, K, G, H)
    scores = jnp.einsum(f"btkgh,{kv_axes}->bkgts", q_btkgh, keys).astype(jnp.float32) * H ** -0.5
    scores = jnp.where(allowed_bts[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_btnh.dtype)
    # Probabilities as the left operand, output in its natural order, then the (small) transpose: asked for
    # btkgh directly, XLA:CPU swapped the operands and read the values cache across its slot axis (~4x slower).
    attn_bkgth = jnp.einsum(f"bkgts,{kv_axes}->bkgth", probs, values)
    return attn_bkgth.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


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

    def forward(self, input_ids, *, attention_mask=None, lengths=None, positions=None, cache: KVCache | None = None,
                output_hidden_states: bool = False, compute_logits: bool = True) -> Qwen3Output:
        """Run the decoder on `input_ids` [B, T].

        Without a cache, attention is causal over the T tokens. With a cache (`init_cache`), the T tokens are
        written at slots [index, index + T) and attend to every real token already in the cache and to each
        other causally; the returned cache has advanced by T. See `step_masks`. Padding: `attention_mask`
        [B, T] (1 = real token, anywhere), or `lengths` [B] for right-padded rows (the first lengths[b]
        tokens are real) — the form a fused attention kernel takes (`fst_jax.models.attention`).
        """
        c = self.config
        dtype = canonical_dtype(c.dtype)
        B, T = input_ids.shape
        if lengths is not None and attention_mask is not None:
            raise ValueError("Qwen3.forward: pass attention_mask or lengths, not both")
        if lengths is not None:
            mask_bt = jnp.arange(T)[None, :] < lengths[:, None]
        else:
            mask_bt = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        default_positions, key_mask_bs, allowed_bts = step_masks(mask_bt, cache)
        positions = default_positions if positions is None else positions

        layer_lengths = lengths if cache is None and lengths is not None else None
        if cache is None and attention_mask is None and lengths is None:
            layer_lengths = jnp.full((B,), T, jnp.int32)  # no padding at all: every row is T tokens
        with jax.named_scope("embed"):
            x_btd = jnp.take(self.embed[...], input_ids, axis=0).astype(dtype)
        x_btd = _constrain_batch(x_btd)

        def layer(x_btd, layer_in):
            p, kv = layer_in if cache is not None else (layer_in, None)
            x_btd, kv = decoder_layer(c, TOKEN_MAJOR, p, x_btd, positions, allowed_bts, kv,
                                      None if cache is None else cache.index, layer_lengths)
            x_btd = _constrain_batch(x_btd)
            return x_btd, (x_btd if output_hidden_states else None, kv)

        if c.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[c.remat], prevent_cse=False)
        xs = self.layers.stacked()
        if cache is not None:
            xs = (xs, (cache.k, cache.v))
        x_btd, (layer_out_lbtd, kv) = jax.lax.scan(layer, x_btd, xs)

        hidden_states = None
        if output_hidden_states:
            hidden_states = jnp.concatenate([jnp.take(self.embed[...], input_ids, axis=0).astype(dtype)[None],
                                             layer_out_lbtd], axis=0)
        new_cache = None if cache is None else cache.advanced(*kv, key_mask_bs, mask_bt)
        last_hidden = rms_norm(x_btd, self.final_norm[...], c.rms_norm_eps)
        logits = None
        if compute_logits:
            with jax.named_scope("unembed"):
                logits = jnp.einsum("btd,dv->btv", last_hidden, self.unembed_matrix())
        return Qwen3Output(logits=logits, last_hidden=last_hidden, hidden_states=hidden_states, cache=new_cache)


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
