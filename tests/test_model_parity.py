"""Qwen3 parity with transformers' Qwen3ForCausalLM (torch, fp32) on small random checkpoints."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fst_jax.models.hf import load_pretrained, save_pretrained
from fst_jax.models.qwen3 import init_cache

CONFIGS = ["tied", "untied", "odd_head_dim"]
REL_TOL = 1e-4


def _rel_err(ours, ref, valid):
    ours, ref = np.asarray(ours), np.asarray(ref)
    return float(np.abs(ours - ref)[valid].max() / np.abs(ref)[valid].max())


def _batch(vocab, padded, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (3, 11))
    mask = np.ones_like(ids)
    if padded:  # left padding of different lengths, as the sampler produces
        mask[1, :4] = 0
        mask[2, :7] = 0
        ids[mask == 0] = 0
    return ids, mask


def _torch_forward(model, ids, mask):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_hidden_states_and_logits_match_transformers(hf_checkpoints, name, padded):
    path, torch_model = hf_checkpoints[name]
    model = load_pretrained(path)
    ids, mask = _batch(model.config.vocab_size, padded)
    ref_logits, ref_hidden = _torch_forward(torch_model, ids, mask)
    out = model.forward(jnp.asarray(ids), attention_mask=jnp.asarray(mask), output_hidden_states=True)
    valid = mask.astype(bool)
    L = model.config.num_layers
    assert out.hidden_states.shape[0] == L + 1 == len(ref_hidden)
    # transformers reports embeddings, layers 0..L-2, and the final *normed* state last.
    for i in range(L):
        err = _rel_err(out.hidden_states[i], ref_hidden[i], valid)
        assert err <= REL_TOL, f"hidden state {i}: rel err {err:.2e}"
    assert _rel_err(out.last_hidden, ref_hidden[L], valid) <= REL_TOL
    err = _rel_err(out.logits, ref_logits, valid)
    assert err <= REL_TOL, f"logits rel err {err:.2e}"
    assert np.abs(ref_logits).max() > 0.5  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("name", CONFIGS)
def test_weights_are_exact_after_mapping(hf_checkpoints, name):
    path, torch_model = hf_checkpoints[name]
    model = load_pretrained(path)
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    c = model.config
    np.testing.assert_array_equal(np.asarray(model.embed[...]), sd["model.embed_tokens.weight"])
    q = np.asarray(model.layers.q_proj[...])[1]  # [D, N, H]
    np.testing.assert_array_equal(q.reshape(c.hidden_size, -1).T, sd["model.layers.1.self_attn.q_proj.weight"])
    o = np.asarray(model.layers.o_proj[...])[0]  # [N, H, D]
    np.testing.assert_array_equal(o.reshape(-1, c.hidden_size).T, sd["model.layers.0.self_attn.o_proj.weight"])
    np.testing.assert_array_equal(np.asarray(model.layers.down_proj[...])[1].T,
                                  sd["model.layers.1.mlp.down_proj.weight"])
    if not c.tie_word_embeddings:
        np.testing.assert_array_equal(np.asarray(model.lm_head[...]).T, sd["lm_head.weight"])


@pytest.mark.parametrize("name", ["untied", "odd_head_dim"])
def test_kv_cache_decode_matches_full_forward(hf_checkpoints, name):
    path, _ = hf_checkpoints[name]
    model = load_pretrained(path)
    ids, mask = _batch(model.config.vocab_size, padded=True, seed=1)
    full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    prefix = 5  # prefill the first 5 slots (pads included), then feed one token at a time
    cache = init_cache(model.config, ids.shape[0], ids.shape[1] + 3)
    step = jax.jit(lambda ids, m, c: model.forward(ids, attention_mask=m, cache=c))
    out = step(jnp.asarray(ids[:, :prefix]), jnp.asarray(mask[:, :prefix]), cache)
    logits = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(prefix, ids.shape[1]):
        out = step(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        logits.append(np.asarray(out.logits))
        cache = out.cache
    stepwise = np.concatenate(logits, axis=1)
    valid = mask.astype(bool)
    assert _rel_err(stepwise, full, valid) <= 1e-5
    assert int(cache.index) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.next_position), mask.sum(1))


@pytest.mark.parametrize("max_shard_bytes", [None, 20_000], ids=["single_file", "sharded_index"])
def test_round_trip_through_transformers(hf_checkpoints, tmp_path, max_shard_bytes):
    path, torch_model = hf_checkpoints["untied"]
    model = load_pretrained(path)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    save_pretrained(model, tmp_path / "out", **kwargs)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert ("model.safetensors.index.json" in files) == (max_shard_bytes is not None)
    reloaded_torch = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = _batch(model.config.vocab_size, padded=True)
    ref_logits, _ = _torch_forward(torch_model, ids, mask)
    new_logits, _ = _torch_forward(reloaded_torch, ids, mask)
    np.testing.assert_array_equal(new_logits, ref_logits)
    reloaded_ours = load_pretrained(tmp_path / "out")  # and our loader reads the sharded index back
    np.testing.assert_array_equal(np.asarray(reloaded_ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask))),
                                  np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))))


def test_bf16_checkpoint_loads_and_computes(hf_checkpoints, tmp_path):
    path, torch_model = hf_checkpoints["tied"]
    # a copy: the session-scoped reference model must keep its fp32 weights for the other tests
    copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = load_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    ids, mask = _batch(model.config.vocab_size, padded=False)
    ref_logits, _ = _torch_forward(torch_model, ids, mask)
    logits = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32))
    assert _rel_err(logits, ref_logits, mask.astype(bool)) < 0.05  # bf16 weights and activations


def test_remat_gives_same_loss_and_gradients(hf_checkpoints):
    from flax import nnx

    path, _ = hf_checkpoints["tied"]
    ids, mask = _batch(128, padded=True)
    grads = []
    for remat in ("none", "full", "dots_saveable"):
        model = load_pretrained(path, remat=remat)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits = nnx.merge(graphdef, p)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
            return jnp.mean(jax.nn.logsumexp(logits, -1))

        grads.append(jax.jit(jax.grad(loss))(params))
    for g in grads[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads[0], g)


def test_dot_product_attention_matches_the_einsums_in_values_and_gradients(hf_checkpoints):
    """`Qwen3Config.attention="dot_product"` (jax.nn.dot_product_attention) against the einsum path: logits,
    the gradient of a masked token loss (left-padded rows, GQA 8 heads on 4), and a prefill into a cache."""
    from flax import nnx

    path, torch_model = hf_checkpoints["untied"]
    ids, mask = _batch(160, padded=True)
    valid = mask.astype(bool)
    results = {}
    for kernel in ("xla", "dot_product"):
        model = load_pretrained(path, attention=kernel)
        assert model.config.attention == kernel
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits = nnx.merge(graphdef, p)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
            nll = jax.nn.logsumexp(logits, -1) - logits[..., 0]
            return jnp.sum(nll * mask) / mask.sum(), logits

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        prefill = jax.jit(lambda i, m, c: model.forward(i, attention_mask=m, cache=c).logits)(
            jnp.asarray(ids), jnp.asarray(mask), init_cache(model.config, ids.shape[0], ids.shape[1] + 5))
        results[kernel] = (float(value), np.asarray(logits), grads, np.asarray(prefill))
    (v0, l0, g0, p0), (v1, l1, g1, p1) = results["xla"], results["dot_product"]
    assert abs(v0 - v1) <= 1e-5 * abs(v0)
    assert _rel_err(l1, l0, valid) <= 1e-5
    assert _rel_err(l1, _torch_forward(torch_model, ids, mask)[0], valid) <= REL_TOL
    assert _rel_err(p1, l0, valid) <= 1e-5 and _rel_err(p0, l0, valid) <= 1e-5
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g0)) > 1e-3  # real gradients
