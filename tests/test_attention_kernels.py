"""Attention kernels: which kernel each backend and call gets (`models.attention.select_kernel`), the one-line
reason logged when an accelerator falls back, the right-padded `lengths` form equal to the mask it replaces,
and — on a CUDA GPU only — cuDNN's fused attention held to the einsums in values and gradients with no
[T, T] float32 scores in the compiled update."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fst_jax.models import attention
from fst_jax.models.qwen3 import Qwen3, Qwen3Config

TINY = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8)
TRAINING = {"platform": "cuda", "dtype": "bfloat16", "head_dim": 128, "num_queries": 4096, "cached": False,
            "right_padded": True}


def test_each_backend_and_call_gets_its_kernel():
    assert attention.select_kernel("auto", **TRAINING) == ("cudnn", None)
    assert attention.select_kernel("dot_product", **TRAINING) == ("cudnn", None)
    assert attention.select_kernel("xla", **TRAINING) == ("xla", None)
    refusals = {  # what changes from the update's call on an H100 → why cuDNN does not apply
        "platform": ("tpu", "the platform is tpu"), "dtype": ("float32", "compute dtype float32"),
        "head_dim": (256, "head dim 256"), "cached": (True, "reads a KV cache"),
        "right_padded": (False, "an arbitrary attention_mask"), "num_queries": (1, "a single query")}
    for field, (value, reason) in refusals.items():
        kernel, why = attention.select_kernel("auto", **{**TRAINING, field: value})
        assert kernel == "xla" and reason in why, (field, why)
        kernel, _ = attention.select_kernel("dot_product", **{**TRAINING, field: value})
        assert kernel == ("xla" if field == "num_queries" else "jax_xla")
    assert attention.select_kernel("auto", **{**TRAINING, "head_dim": 12})[1].startswith("head dim 12")
    assert attention.select_kernel("auto", **{**TRAINING, "platform": "cpu"})[0] == "xla"
    with pytest.raises(ValueError, match=r"model.attention='cudnn' cannot run here: the platform is cpu "
                                         r"\(cuDNN needs a CUDA GPU\); use model.attention='auto'"):
        attention.select_kernel("cudnn", **{**TRAINING, "platform": "cpu"})
    assert attention.current_platform() == jax.default_backend() == "cpu"


@pytest.fixture(scope="module")
def model():
    return Qwen3(TINY, rngs=nnx.Rngs(0))


def _right_padded(lengths, T=12, seed=0):
    ids = np.random.RandomState(seed).randint(1, 64, (len(lengths), T)).astype(np.int32)
    mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return jnp.asarray(ids * mask), jnp.asarray(mask), jnp.asarray(lengths, jnp.int32)


def test_lengths_say_what_the_right_padded_mask_says(model):
    ids, mask, lengths = _right_padded([12, 5, 1, 0])
    by_mask = model.forward(ids, attention_mask=mask).logits
    by_lengths = model.forward(ids, lengths=lengths).logits
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(by_lengths)[real], np.asarray(by_mask)[real], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="pass attention_mask or lengths, not both"):
        model.forward(ids, attention_mask=mask, lengths=lengths)


def test_an_accelerator_that_cannot_fuse_says_why_once(model, monkeypatch, caplog):
    """The model's real attention call as a CUDA GPU would make it for this float32 model: the einsums run,
    and one line says why, once however many layers and calls trace it."""
    monkeypatch.setattr(attention, "current_platform", lambda: "cuda")
    attention.log_fallback.cache_clear()
    ids, _, lengths = _right_padded([12, 7])
    with caplog.at_level(logging.INFO, logger="fst_jax"):
        jax.jit(lambda i, n: model.forward(i, lengths=n).logits)(ids, lengths)
        jax.jit(lambda i, n: model.forward(i, lengths=n).logits)(ids, lengths + 0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")]
    assert lines == [("attention: XLA einsums, not cuDNN: compute dtype float32 (cuDNN takes bfloat16/float16: "
                      "set model.dtype=bfloat16)")]


on_cuda = pytest.mark.skipif(attention.current_platform() != "cuda", reason="cuDNN attention needs a CUDA GPU")


@on_cuda
def test_cudnn_attention_matches_the_einsums_in_values_and_gradients():
    config = TINY.replace(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    ids, mask, lengths = _right_padded([64, 40, 17, 1], T=64)
    results = {}
    for kernel in ("xla", "auto"):
        m = Qwen3(config.replace(attention=kernel), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(m, nnx.Param)

        def loss(p, graphdef=graphdef):
            logits = nnx.merge(graphdef, p).forward(ids, lengths=lengths).logits.astype(jnp.float32)
            return jnp.sum(jax.nn.logsumexp(logits, -1) * mask) / mask.sum(), logits

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        hlo = jax.jit(jax.grad(lambda p: loss(p)[0])).lower(params).compile().as_text()
        results[kernel] = value, np.asarray(logits), grads, hlo
    (v0, l0, g0, _), (v1, l1, g1, hlo) = results["xla"], results["auto"]
    real = np.asarray(mask, bool)
    assert abs(float(v1) - float(v0)) <= 2e-2 * abs(float(v0))  # bf16 compute, two orders of summation
    np.testing.assert_allclose(l1[real], l0[real], atol=5e-2)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        scale = float(np.max(np.abs(np.asarray(a, np.float32)))) or 1.0
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), atol=5e-2 * scale)
    assert "cudnn" in hlo.lower()  # the fused custom call ran, in the forward and the backward
    assert not re.search(r"f32\[[^\]]*\b64,64\]", hlo)  # no [T, T] float32 scores anywhere
