"""Gumbel noise for a decode step, bit for bit what `jax.random.gumbel(key, (V,))` gives each row, written so that
XLA fuses it into one pass.

JAX lowers its Threefry-2x32 hash on the CPU as a rolled five-iteration loop (it compiles faster): every iteration
reads and writes the two [rows, vocab] uint32 words, so a 64-row step at vocab 32 000 moved ~160 MB and took
13.6 ms on this 2-core machine for the bits alone. The same 20 rounds written out in straight-line jnp ops
(the Threefry-2x32 specification: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) fuse
into one elementwise loop: each value is hashed in registers and written once. The counters, the 32-bit output
(the XOR of the two words), the mantissa trick of `jax.random.uniform` and the -log(-log u) of its "low" Gumbel
mode are the ones JAX uses with `jax_threefry_partitionable` (its default), so a run's tokens do not change;
`tests/test_sampling.py` holds the two bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["gumbel_argmax_vb", "gumbel_vb", "matches_jax"]

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, r: int):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry_2x32(k0, k1, x0, x1):
    """The Threefry-2x32 hash of counters (x0, x1) under key (k0, k1): 20 rounds, a key injection every 4."""
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def matches_jax() -> bool:
    """Whether `jax.random` draws with Threefry-2x32 and partitionable counters (the defaults), the scheme
    `gumbel_vb` reproduces; otherwise callers use `jax.random.gumbel` itself."""
    return (jax.config.jax_threefry_partitionable
            and str(jax.config.jax_default_prng_impl) in ("threefry2x32", "threefry"))


def _gumbel(k0, k1, count):
    """The Gumbel value `jax.random.gumbel` draws at flat position `count` (< 2**32) of a key's array."""
    x0, x1 = _threefry_2x32(k0, k1, jnp.zeros_like(count), count)  # the counter's high word is 0
    bits = x0 ^ x1
    floats = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
    tiny = jnp.float32(np.finfo(np.float32).tiny)
    uniform = jnp.maximum(tiny, floats * (jnp.float32(1.0) - tiny) + tiny)
    return -jnp.log(-jnp.log(uniform))


def _key_words(keys_b):
    data = keys_b if keys_b.dtype == jnp.uint32 else jax.random.key_data(keys_b)
    return data[:, 0], data[:, 1]


def gumbel_vb(keys_b, vocab: int) -> jax.Array:
    """Gumbel noise [vocab, B] float32: column b equals `jax.random.gumbel(keys_b[b], (vocab,))` bit for bit.

    `keys_b`: B typed Threefry keys (or their [B, 2] uint32 data)."""
    k0, k1 = _key_words(keys_b)
    return _gumbel(k0[None, :], k1[None, :], jax.lax.broadcasted_iota(jnp.uint32, (vocab, 1), 0))


def _block(vocab: int, largest: int = 256) -> int:
    block = largest
    while block > 8 and vocab % block:
        block //= 2
    return block


def gumbel_argmax_vb(scores_vb: jax.Array, keys_b) -> jax.Array:
    """Per column b, the first index of the largest `scores_vb[:, b] + gumbel_vb(keys_b, V)[:, b]` (the Gumbel-max
    draw), without writing the noisy [V, B] array: one pass takes each block of tokens' noisy maximum (the noise
    made inside the reduction), a second recomputes the noise of the one block holding the winner. The same
    token as the plain argmax, ties included (the first block holding the maximum holds its first index)."""
    V, B = scores_vb.shape
    k0, k1 = _key_words(keys_b)
    Q = _block(V)
    n = -(-V // Q)
    s_nqb = jnp.pad(scores_vb, ((0, n * Q - V), (0, 0)), constant_values=-jnp.inf).reshape(n, Q, B)
    count_nq1 = jax.lax.broadcasted_iota(jnp.uint32, (n, Q, 1), 0) * np.uint32(Q) + jax.lax.broadcasted_iota(
        jnp.uint32, (n, Q, 1), 1)
    block_max_nb = jnp.max(s_nqb + _gumbel(k0[None, None, :], k1[None, None, :], count_nq1), axis=1)
    best_b = jnp.max(block_max_nb, axis=0)
    index_nb = jax.lax.broadcasted_iota(jnp.int32, (n, B), 0)
    block_b = jnp.min(jnp.where(block_max_nb == best_b, index_nb, n - 1), axis=0)
    inner_qb = jnp.take_along_axis(s_nqb, block_b[None, None, :], axis=0)[0]
    count_qb = (block_b * Q).astype(jnp.uint32)[None, :] + jax.lax.broadcasted_iota(jnp.uint32, (Q, B), 0)
    noisy_qb = inner_qb + _gumbel(k0[None, :], k1[None, :], count_qb)
    index_qb = jax.lax.broadcasted_iota(jnp.int32, (Q, B), 0)
    inner_b = jnp.min(jnp.where(noisy_qb == jnp.max(noisy_qb, axis=0), index_qb, Q), axis=0)
    return (block_b * Q + jnp.minimum(inner_b, Q - 1)).astype(jnp.int32)
