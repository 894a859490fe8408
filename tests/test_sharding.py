"""The same model on 8 fake CPU devices, under several meshes, as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fst_jax.runtime import parallel
from fst_jax.models.hf import load_pretrained

MESHES = [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}]


def test_eight_fake_devices():
    assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"


@pytest.fixture(scope="module")
def reference(hf_checkpoints):
    path, _ = hf_checkpoints["untied"]
    model = load_pretrained(path)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, model.config.vocab_size, (8, 12))
    mask = np.ones_like(ids)
    mask[3, :5] = 0
    logits = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    return path, ids, mask, logits


@pytest.mark.parametrize("mesh_config", MESHES, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
@pytest.mark.parametrize("rules_name", ["train", "sample"])
def test_sharded_logits_equal_single_device(reference, mesh_config, rules_name):
    path, ids, mask, ref_logits = reference
    rules = parallel.TRAIN_RULES if rules_name == "train" else parallel.SAMPLE_RULES
    mesh = parallel.make_mesh(mesh_config)
    model = load_pretrained(path, mesh=mesh, rules=rules)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = parallel.shard_batch({"ids": ids, "mask": mask}, mesh)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["ids"], attention_mask=b["mask"]))(params, batch)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5)
    # every parameter really is split as the rules say (spot-checked against hand-written expectations)
    tensor = "tensor" if mesh.shape["tensor"] > 1 else None
    fsdp = "fsdp" if rules_name == "train" else None
    expected = {
        "embed": P(tensor, fsdp),
        "lm_head": P(fsdp, tensor),
        "q_proj": P(None, fsdp, tensor, None),
        "o_proj": P(None, tensor, None, fsdp),
        "gate_proj": P(None, fsdp, tensor),
        "down_proj": P(None, tensor, fsdp),
        "attn_norm": P(None, None),
    }
    arrays = {"embed": model.embed, "lm_head": model.lm_head, "q_proj": model.layers.q_proj,
              "o_proj": model.layers.o_proj, "gate_proj": model.layers.gate_proj,
              "down_proj": model.layers.down_proj, "attn_norm": model.layers.attn_norm}
    for name, var in arrays.items():
        got = var[...].sharding.spec
        assert tuple(got) + (None,) * (var[...].ndim - len(got)) == tuple(expected[name]), (name, got)
    # FSDP really splits memory: each device holds 1/8 (fsdp=8) of the gate projection
    shard = model.layers.gate_proj[...].addressable_shards[0].data
    full = model.layers.gate_proj[...].shape
    assert shard.size * (mesh.shape["fsdp"] if fsdp else 1) * mesh.shape["tensor"] == np.prod(full)


def test_mesh_minus_one_takes_the_rest():
    mesh = parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("bad, message", [
    ({"data": 2, "fsdp": 2, "tensor": 4}, "needs 16 devices but 8 are available"),
    ({"data": 3, "fsdp": -1}, "does not divide the 8 available"),
    ({"data": -1, "fsdp": -1}, "only one axis may be -1"),
    ({"pipeline": 2}, "unknown axes"),
    ({"fsdp": 0}, "must be positive or -1"),
])
def test_mesh_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(bad)


def test_rules_refuse_collisions_and_unknown_axes():
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    colliding = parallel.TRAIN_RULES + (("other", "tensor"),)
    with pytest.raises(ValueError, match="collide"):
        parallel.logical_to_spec(("mlp", "other"), colliding, mesh)
    with pytest.raises(ValueError, match="no rule"):
        parallel.logical_to_spec(("embed", "mystery"), parallel.TRAIN_RULES, mesh)
    # a dim the mesh axis does not divide is replicated rather than failing at device_put
    assert parallel.logical_to_spec(("kv_heads",), parallel.TRAIN_RULES, mesh, shape=(3,)) == P(None)
    assert parallel.logical_to_spec(("batch", None), parallel.TRAIN_RULES, mesh) == P("fsdp", None)


def test_shard_batch_checks_divisibility():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(ValueError, match="not a multiple"):
        parallel.shard_batch(np.zeros((6, 3)), mesh)
    x = parallel.shard_batch(np.arange(16).reshape(8, 2), mesh)
    assert x.sharding.spec == P(("data", "fsdp"), None)
