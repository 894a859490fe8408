"""Which attention kernel a block of queries runs on, and why.

`Qwen3Config.attention` asks; `select_kernel` decides per call from what the kernel can take:

    "auto" (default)  cuDNN's fused flash attention on a CUDA GPU where it applies, else the einsums
    "cudnn"           cuDNN's fused attention, an error (one line, saying why) where it does not apply
    "dot_product"     `jax.nn.dot_product_attention`: cuDNN where it applies (as "auto"), else jax's own XLA
                      implementation (which, like the einsums, builds the [B, N, T, S] scores)
    "xla"             the einsums everywhere

cuDNN applies to self-attention over T > 1 tokens with no KV cache, rows right-padded (`lengths` given, or no
padding), bfloat16/float16 compute and a head dim that is a multiple of 8 and ≤ 128: it runs causal attention
with per-row sequence lengths and never holds a [T, T] score tensor. On TPU and CPU, and on a GPU where cuDNN
does not apply, the einsums run (on TPU a Pallas flash kernel would be the equivalent; not done). A fall-back
on a GPU is logged once, in one line, with its reason. cuDNN cannot be traced without a GPU, so programs
lowered on a CPU for `cuda` (the dry run's cross-lowering) carry the einsums.
"""

from __future__ import annotations

import functools
import logging

import jax

__all__ = ["CUDNN", "JAX_XLA", "XLA", "current_platform", "select_kernel"]

CUDNN, XLA, JAX_XLA = "cudnn", "xla", "jax_xla"  # the einsums are XLA; JAX_XLA: jax.nn's XLA implementation
_CUDNN_DTYPES = ("bfloat16", "float16")
_CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later with recent cuDNN; 128 holds on every GPU jax supports

log = logging.getLogger("fst_jax")


def current_platform() -> str:
    """"cuda", "rocm", "tpu" or "cpu": the backend the default device belongs to."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = getattr(jax.devices()[0].client, "platform_version", "") or ""
        return "rocm" if "rocm" in version.lower() else "cuda"
    return backend


def _cudnn_refusal(*, platform: str, dtype: str, head_dim: int, num_queries: int, cached: bool,
                   right_padded: bool) -> str | None:
    """Why cuDNN's fused attention cannot run this call (None: it can)."""
    if platform != "cuda":
        return f"the platform is {platform} (cuDNN needs a CUDA GPU)"
    if num_queries <= 1:
        return "a single query (decode step)"
    if cached:
        return "attention reads a KV cache (prefill/decode: the sampler's attention)"
    if not right_padded:
        return "an arbitrary attention_mask (cuDNN takes right padding: pass lengths= instead)"
    if dtype not in _CUDNN_DTYPES:
        return f"compute dtype {dtype} (cuDNN takes bfloat16/float16: set model.dtype=bfloat16)"
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        return f"head dim {head_dim} (cuDNN takes multiples of 8 up to {_CUDNN_MAX_HEAD_DIM})"
    return None


def select_kernel(requested: str, *, platform: str, dtype: str, head_dim: int, num_queries: int,
                  cached: bool, right_padded: bool) -> tuple[str, str | None]:
    """(kernel, reason it is not cuDNN or None) for one attention call.

    `requested`: `Qwen3Config.attention`; `platform`: "cuda", "rocm", "tpu" or "cpu" (`current_platform()`);
    `dtype`: the compute dtype's name; `num_queries`: T; `cached`: keys come from a KV cache; `right_padded`:
    each row's real tokens come first and their counts are known. Raises ValueError for "cudnn" where cuDNN
    does not apply.
    """
    if requested == XLA:
        return XLA, None
    refusal = _cudnn_refusal(platform=platform, dtype=dtype, head_dim=head_dim, num_queries=num_queries,
                             cached=cached, right_padded=right_padded)
    if refusal is None:
        return CUDNN, None
    if requested == CUDNN:
        raise ValueError(f"model.attention='cudnn' cannot run here: {refusal}; use model.attention='auto' to "
                         "fall back to XLA")
    if requested == "dot_product":
        return (JAX_XLA if num_queries > 1 else XLA), refusal
    return XLA, refusal


@functools.lru_cache(maxsize=64)
def log_fallback(kernel: str, reason: str) -> None:
    """Log once per distinct reason that an accelerator runs attention without the fused kernel."""
    log.info("attention: %s, not cuDNN: %s", "XLA einsums" if kernel == XLA else "jax.nn XLA attention", reason)
