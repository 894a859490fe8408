"""The sampler's planning API: weights in the compute dtype, row and slot buckets, and programs lowered without
arrays that are exactly the ones `Sampler.generate` runs (compiling them ahead leaves generate nothing to
compile)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fst_jax.runtime import parallel
from fst_jax.models.qwen3 import Qwen3, Qwen3Config
from fst_jax.sampling import (Sampler, abstract_sampling_weights, bucket_length, call_slots,
                              lower_sampler_programs, row_bucket, sampling_weights)

TINY = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, tie_word_embeddings=False, dtype="bfloat16", param_dtype="float32")


def _numpy_model(config: Qwen3Config, seed: int = 0) -> Qwen3:
    """A random model initialised with numpy (no PRNG program to compile)."""
    model = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape).astype(a.dtype)), state)
    return nnx.merge(graphdef, state)


def _abstract_params(config: Qwen3Config, mesh=None):
    with jax.set_mesh(mesh) if mesh is not None else _nothing():
        return nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))), nnx.Param)[1]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def tiny():
    return _numpy_model(TINY)


def _prompts(n, seed=0, lengths=(3, 9, 6, 12, 5, 7, 11, 4)):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, TINY.vocab_size, lengths[i % len(lengths)]).tolist() for i in range(n)]


class _Compiles:
    """Counts XLA backend compilations while active."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)
        return False


def test_sampler_weights_are_held_in_the_compute_dtype(tiny):
    weights = Sampler(tiny).weights
    leaves = jax.tree.leaves(weights)
    assert len(leaves) == 3 + 11 * TINY.num_layers
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}
    # the values are the fp32 parameters rounded once, in the decode layout (q_proj [D, N, H] → [N, H, D])
    q0 = np.asarray(tiny.layers.q_proj[...][0], np.float32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(weights["layers"][0]["q_proj"], np.float32),
                                  np.asarray(jnp.asarray(q0).astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("mesh_config", [None, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["one_device", "fsdp8", "data2_fsdp2_tensor2"])
def test_abstract_sampling_weights_match_the_real_layout(tiny, mesh_config):
    mesh = None if mesh_config is None else parallel.make_mesh(mesh_config)
    real = sampling_weights(nnx.split(tiny, nnx.Param)[1], TINY, mesh)
    abstract = abstract_sampling_weights(TINY, _abstract_params(TINY, mesh), mesh)
    assert jax.tree.structure(real) == jax.tree.structure(abstract)
    for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract)):
        assert (r.shape, r.dtype) == (a.shape, a.dtype)
        if mesh is not None:
            assert r.sharding.is_equivalent_to(a.sharding, r.ndim), (r.sharding, a.sharding)
    if mesh_config and "tensor" in mesh_config:  # q_proj [N, H, D]: the heads split by tensor
        assert abstract["layers"][0]["q_proj"].sharding.spec == jax.sharding.PartitionSpec("tensor", None, None)


def test_row_bucket():
    assert [row_bucket(n) for n in (1, 2, 3, 4, 5, 9, 256, 257)] == [1, 2, 4, 4, 8, 16, 256, 512]
    fsdp8 = parallel.make_mesh({"fsdp": 8})
    assert [row_bucket(n, fsdp8) for n in (1, 8, 9, 17, 256)] == [8, 8, 16, 32, 256]
    data2 = parallel.make_mesh({"data": 2, "tensor": 4})
    assert [row_bucket(n, data2) for n in (1, 3, 5)] == [2, 4, 8]
    with pytest.raises(ValueError, match="positive integer"):
        row_bucket(0)


def test_call_slots():
    """A call starts with the smallest row bucket (64, 16, 8 for 64 slots; at least 8 per shard) holding its rows."""
    assert [call_slots(n, 64) for n in (1, 8, 9, 16, 17, 64, 500)] == [8, 8, 16, 16, 64, 64, 64]
    fsdp8 = parallel.make_mesh({"fsdp": 8})
    assert [call_slots(n, 256, fsdp8) for n in (1, 64, 65, 256)] == [64, 64, 256, 256]


@pytest.mark.parametrize("mesh_config", [None, {"fsdp": 8}], ids=["one_device", "fsdp8"])
def test_lowered_programs_are_the_ones_generate_runs(tiny, mesh_config):
    """Compile the lowered programs, then generate at that shape: no backend compilation happens."""
    mesh = None if mesh_config is None else parallel.make_mesh(mesh_config)
    sampler = Sampler(tiny, mesh=mesh)  # lays the weights out (its own, already counted, program)
    prompts = _prompts(3)
    slots = 8 if mesh is None else 64  # 6 rows: 8 of 64 slots; on 8 shards at least 8 each
    with _Compiles() as compiles:
        programs = lower_sampler_programs(TINY, _abstract_params(TINY, mesh), mesh=mesh, rows=3,
                                          prompt_buckets=[bucket_length(max(map(len, prompts)))], max_new_tokens=5,
                                          num_samples=2, fixed=True)
        inserts = {8: ["I1", "I4"], 64: ["I8", "I32"]}[slots]  # one (per shard), the most that fit, ¼ (≥ one)
        assert sorted(programs) == sorted([f"decode_B{slots}_C21_W21", f"empty_B{slots}_C21"]
                                          + [f"insert_B{slots}_C21_{i}_P16_n2" for i in inserts])
        for lowered in programs.values():
            assert isinstance(lowered, jax.stages.Lowered)
            assert lowered.compile().memory_analysis() is not None
    assert compiles.count == len(programs)  # a shape no other test uses, so all really compiled
    with _Compiles() as compiles:
        out = sampler.generate(prompts, max_new_tokens=5, num_samples=2, temperature=0.7, seed=1,
                               stop_token_ids=[5, 6], pad_id=3)
    assert compiles.count == 0
    assert len(out.tokens) == 6


def test_other_prompts_in_a_call_change_no_sample(tiny):
    """Sample i of a call draws from its own key (seed, i, position): more prompts after it change nothing."""
    sampler = Sampler(tiny)
    kw = dict(max_new_tokens=5, temperature=1.0, seed=3, num_samples=2)
    three = sampler.generate(_prompts(3), **kw)
    five = sampler.generate(_prompts(5), **kw)
    assert three.tokens == five.tokens[:6]
    for a, b in zip(three.logprobs, five.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_qwen3_8b_programs_lower_without_allocating():
    config = Qwen3Config.preset("8B", dtype="bfloat16")
    mesh = parallel.make_mesh({"fsdp": 8})
    params = _abstract_params(config, mesh)
    weights = abstract_sampling_weights(config, params, mesh)
    assert {leaf.dtype for leaf in jax.tree.leaves(weights)} == {jnp.dtype(jnp.bfloat16)}
    assert weights["unembed_vd"].shape == (151936, 4096) and weights["layers"][35]["o_proj"].shape == (4096, 32, 128)
    nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(weights))
    assert nbytes == 2 * config.num_params()  # bf16, whole on each device under SAMPLE_RULES
    programs = lower_sampler_programs(config, params, mesh=mesh, rows=100, prompt_buckets=[512], max_new_tokens=64)
    # 100 rows in 64 slots (8 per shard), prompt bucket 512 + 64 new tokens; attended widths 64 … 512, 576
    assert sorted(programs) == sorted(["empty_B64_C576", "insert_B64_C576_I16_P512_n1", "insert_B64_C576_I64_P512_n1",
                                       "insert_B64_C576_I8_P512_n1"]
                                      + [f"decode_B64_C576_W{w}" for w in (64, 128, 256, 512, 576)])
    assert "tensor<64x8x576x128xbf16>" in programs["decode_B64_C576_W128"].as_text()  # the [B, K, S, H] buffer
    assert "tensor<64x64xi32>" in programs["decode_B64_C576_W128"].as_text()          # [B, M] tokens
