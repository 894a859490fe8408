"""Checkpointer: round trip, keep-last-N, interval, resharded resume, corruption fallback, redaction."""

import json
import logging
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fst_jax.runtime.checkpoint import (CheckpointError, Checkpointer, CheckpointMismatchError, abstract_like,
                                config_snapshot, redact)
from fst_jax.runtime.metrics import MetricsWriter, read_metrics

from conftest import xla_flags

# orbax leaves un-awaited read coroutines behind when a damaged array fails to load; they are harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SECRET = "sk-test-DO-NOT-WRITE-0123456789abcdef"


class _Tiny(nnx.Module):
    def __init__(self, rngs, width=16):
        self.up = nnx.Linear(8, width, rngs=rngs)
        self.down = nnx.Linear(width, 8, rngs=rngs)


def make_state(seed=0, width=16):
    _, params = nnx.split(_Tiny(nnx.Rngs(seed), width), nnx.Param)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    # One real update so mu/nu/count are non-trivial.
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (seed + 1)), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(7 + seed, jnp.int32),
            "rng": jax.random.key(seed + 11)}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


META = {"population": ["Solve step by step.", "Think, then answer in \\boxed{}."],
        "gepa": {"scores": [[0.5, 1.0], [float("nan"), float("-inf")]], "rng_state": [3, [1, 2, 3], None]},
        "counters": {"rl_steps": 7, "rl_rollouts": np.int64(448), "gepa_rollouts": 960}}


def test_round_trip_state_meta_data_config(tmp_path):
    state = make_state()
    config = {"model": {"path": "/models/q"}, "rl": {"learning_rate": 1e-6, "max_tokens": 512}, "mesh": (2, 4)}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(abstract_like(state)) is None  # fresh workdir
        assert ckpt.save(7, state, meta=META, data={"next_index": 42}, config=config)
    restored = Checkpointer(tmp_path).restore_latest(abstract_like(state))
    assert restored.step == 7
    assert_trees_equal(restored.state, state)
    assert isinstance(restored.state["params"], nnx.State)
    assert isinstance(restored.state["opt_state"][0], optax.ScaleByAdamState)
    assert int(restored.state["opt_state"][0].count) == 1
    assert restored.data == {"next_index": 42}
    assert restored.meta["population"] == META["population"]
    assert restored.meta["counters"] == {"rl_steps": 7, "rl_rollouts": 448, "gepa_rollouts": 960}
    scores = restored.meta["gepa"]["scores"]
    assert scores[0] == [0.5, 1.0] and math.isnan(scores[1][0]) and scores[1][1] == -math.inf
    assert restored.meta["gepa"]["rng_state"] == [3, [1, 2, 3], None]
    assert restored.config == {"model": {"path": "/models/q"}, "rl": {"learning_rate": 1e-6, "max_tokens": 512},
                               "mesh": [2, 4]}
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "7").iterdir()) == [
        "_CHECKPOINT_METADATA", "commit_success.txt", "data", "meta", "state"]


def test_save_is_async_and_survives_donated_buffers(tmp_path):
    state = make_state(seed=3)
    expected = jax.tree.map(np.asarray, jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x, state))
    ckpt = Checkpointer(tmp_path)
    assert ckpt.save(1, state)
    for leaf in jax.tree.leaves(state):  # what a jitted update with donate_argnums does to the old state
        leaf.delete()
    ckpt.close()
    restored = Checkpointer(tmp_path).restore_latest(abstract_like(make_state()))
    got = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
                       restored.state)
    assert_trees_equal(got, expected)


def test_explicit_step_and_missing_step(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state(seed=step), meta={"s": step})
        assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
        old = ckpt.restore(1, abstract_like(make_state()))
        assert old.step == 1 and old.meta == {"s": 1} and old.data is None
        assert_trees_equal(old.state, make_state(seed=1))
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 5 .*available: \[1, 2\]"):
            ckpt.restore(5, abstract_like(make_state()))
        with pytest.raises(CheckpointError, match="already saved"):
            ckpt.save(2, make_state(), force=True)


def test_keep_last_n_and_save_interval(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        saved = [ckpt.save(step, make_state(), meta={"s": step}) for step in range(7)]
        assert saved == [True, False, True, False, True, False, True]
        assert ckpt.save(7, make_state(), force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
    on_disk = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert on_disk == [6, 7]


def test_grain_iterator_state_resumes_exactly(tmp_path):
    grain = pytest.importorskip("grain")
    ds = (grain.MapDataset.source(list(range(20))).shuffle(seed=3).repeat().batch(4)
          .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))
    stream = iter(ds)
    for _ in range(3):
        next(stream)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, make_state(), data=stream)
    expected = [next(stream).tolist() for _ in range(4)]
    restored = Checkpointer(tmp_path).restore_latest(abstract_like(make_state()))
    resumed = iter(ds)
    resumed.set_state(restored.data)
    assert [next(resumed).tolist() for _ in range(4)] == expected


def _auto_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def test_resume_on_a_different_mesh(tmp_path):
    mesh_a, mesh_b = _auto_mesh((2, 4), ("data", "model")), _auto_mesh((8,), ("fsdp",))
    w = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
    state = {"w": jax.device_put(w, NamedSharding(mesh_a, P("data", "model"))), "rng": jax.random.key(0)}
    state["opt"] = optax.adamw(1e-3).init({"w": state["w"]})
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
    new_sharding = NamedSharding(mesh_b, P(None, "fsdp"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(
        new_sharding if x.ndim == 2 else NamedSharding(mesh_b, P()))), state)
    restored = Checkpointer(tmp_path).restore_latest(target)
    assert_trees_equal(restored.state, state)
    assert restored.state["w"].sharding == new_sharding
    assert restored.state["opt"][0].mu["w"].sharding == new_sharding
    assert len({s.device for s in restored.state["w"].addressable_shards}) == 8


def _truncate_arrays(step_dir: Path):
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(7)


def _delete_arrays(step_dir: Path):
    for d in (step_dir / "state").rglob("d"):
        shutil.rmtree(d)


CORRUPTIONS = {
    "missing_checkpoint_metadata": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(), "_CHECKPOINT_METADATA"),
    "truncated_array_files": (_truncate_arrays, ""),
    "deleted_array_files": (_delete_arrays, ""),
    "malformed_meta_json": (lambda d: (d / "meta" / "metadata").write_text("{not json"), "JSONDecodeError"),
    "missing_item": (lambda d: shutil.rmtree(d / "data"), "missing item directory data"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, corruption):
    corrupt, reason = CORRUPTIONS[corruption]
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, make_state(seed=step), meta={"s": step}, data={"next_index": step})
    corrupt(tmp_path / "checkpoints" / "3")

    ckpt = Checkpointer(tmp_path, max_to_keep=3)
    with caplog.at_level(logging.WARNING, logger="fst_jax.runtime.checkpoint"):
        restored = ckpt.restore_latest(abstract_like(make_state()))
    assert restored.step == 2 and restored.meta == {"s": 2} and restored.data == {"next_index": 2}
    assert_trees_equal(restored.state, make_state(seed=2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in m and "unusable" in m and reason in m for m in warnings), warnings
    # The bad step is set aside, so the resumed run can save step 3 again.
    assert (tmp_path / "checkpoints" / "3.corrupt").is_dir()
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.save(3, make_state(seed=5))
    ckpt.close()
    assert_trees_equal(Checkpointer(tmp_path).restore_latest(abstract_like(make_state())).state, make_state(seed=5))


def test_tmp_dir_of_a_killed_async_save_is_ignored(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(seed=1))
    root = tmp_path / "checkpoints"
    # What a process killed mid-save leaves behind: an uncommitted, partial `<step>.orbax-checkpoint-tmp`.
    partial = root / "2.orbax-checkpoint-tmp"
    shutil.copytree(root / "1" / "state", partial / "state")
    _truncate_arrays(partial)
    with caplog.at_level(logging.WARNING, logger="fst_jax.runtime.checkpoint"):
        ckpt = Checkpointer(tmp_path)
        restored = ckpt.restore_latest(abstract_like(make_state()))
    assert restored.step == 1 and ckpt.all_steps() == [1]
    assert not [r for r in caplog.records if r.name == "fst_jax.runtime.checkpoint"]
    assert ckpt.save(2, make_state(seed=2))
    ckpt.close()
    assert sorted(p.name for p in root.iterdir()) == ["1", "2"]  # the leftover was cleaned up


def test_nothing_usable_is_a_clear_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state())
    (tmp_path / "checkpoints" / "2" / "_CHECKPOINT_METADATA").unlink()
    _delete_arrays(tmp_path / "checkpoints" / "1")
    (tmp_path / "checkpoints" / "9").mkdir()  # a stray plain directory: counted by orbax, not a checkpoint
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step 9: .*step 2: .*step 1: "):
        Checkpointer(tmp_path).restore_latest(abstract_like(make_state()))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "9"]  # nothing moved


def test_mismatched_target_is_not_treated_as_corruption(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state())
    with pytest.raises(CheckpointMismatchError, match="step 2 .*does not fit"):
        Checkpointer(tmp_path).restore_latest(abstract_like(make_state(width=32)))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_read_only_never_writes(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state())
    ro = Checkpointer(tmp_path, read_only=True)
    assert ro.restore_latest(abstract_like(make_state())).step == 1
    with pytest.raises(CheckpointError, match="read-only"):
        ro.save(2, make_state())
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        Checkpointer(tmp_path / "elsewhere", read_only=True)


def test_redact_masks_credential_fields_only():
    config = {"api_key": SECRET, "openaiKey": "x" * 20, "HF_TOKEN": "hf", "client-secret": 3, "password": None,
              "max_tokens": 512, "keyword": "fine", "tokenizer": "qwen", "pad_token_id": 0,
              "reflection": {"auth": {"user": "me", "pass": "p"}, "model": "gpt"}}
    out = redact(config)
    assert out == {"api_key": "<redacted>", "openaiKey": "<redacted>", "HF_TOKEN": "<redacted>",
                   "client-secret": "<redacted>", "password": None, "max_tokens": 512, "keyword": "fine",
                   "tokenizer": "qwen", "pad_token_id": "<redacted>",
                   "reflection": {"auth": {"user": "<redacted>", "pass": "<redacted>"}, "model": "gpt"}}
    assert redact({"token_entropy": 0.5, "kl/token": 1.0}, mask_numbers=False) == {"token_entropy": 0.5,
                                                                                 "kl/token": 1.0}


def test_no_secret_reaches_any_file(tmp_path, monkeypatch, caplog):
    env_secret = "env-secret-value-4242"
    monkeypatch.setenv("FST_TEST_OPENAI_API_KEY", env_secret)
    config = {"reflection_lm": {"kind": "openai", "api_key": SECRET, "base_url": "http://h:8000/v1",
                                "headers": {"Authorization": f"Bearer {env_secret}"},
                                "note": f"launched with key {env_secret}"},
              "hf_token": SECRET, "rl": {"max_tokens": 64}}
    with caplog.at_level(logging.WARNING, logger="fst_jax.runtime.checkpoint"):
        with Checkpointer(tmp_path) as ckpt:
            ckpt.save(1, make_state(), config=config,
                      meta={"reflection_lm": {"api_key": SECRET}, "population": ["p"]}, data={"api_key": SECRET})
    assert any("/reflection_lm/api_key" in r.getMessage() for r in caplog.records)
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, "train", {"train/reward": 0.5}, api_key=SECRET, endpoint=f"k={env_secret}")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 5
    for f in files:
        blob = f.read_bytes()
        assert SECRET.encode() not in blob and env_secret.encode() not in blob, f
    restored = Checkpointer(tmp_path).restore_latest(abstract_like(make_state()))
    assert restored.config["reflection_lm"]["api_key"] == "<redacted>"
    assert restored.config["reflection_lm"]["base_url"] == "http://h:8000/v1"
    assert restored.config["rl"] == {"max_tokens": 64}
    assert restored.meta == {"reflection_lm": {"api_key": "<redacted>"}, "population": ["p"]}


def test_config_snapshot_of_a_configdict():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict({"rl": {"lr": 2e-6, "api_key": SECRET}, "schedule": [("math", 100)]})
    assert config_snapshot(cfg) == {"rl": {"lr": 2e-6, "api_key": "<redacted>"}, "schedule": [["math", 100]]}


def test_meta_must_be_json(tmp_path):
    with Checkpointer(tmp_path) as ckpt, pytest.raises(TypeError, match="meta/gepa/obj: object is not JSON"):
        ckpt.save(1, make_state(), meta={"gepa": {"obj": object()}})


# -- two processes: orbax coordinates, process 0 alone writes JSON, both fall back together.
_WORKER = r'''
import json, sys
import jax
i, port, workdir, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=i,
                           coordinator_bind_address=f"127.0.0.1:{port}", initialization_timeout=60,
                           shutdown_timeout_seconds=30)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from fst_jax.runtime.checkpoint import Checkpointer, abstract_like
from fst_jax.runtime.metrics import MetricsWriter, read_metrics

sharding = NamedSharding(jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,)), P("data"))
def state(k):  # a global array split over both processes + a host-local step and RNG key
    local = np.arange(8, dtype=np.float32).reshape(4, 2)[2 * i:2 * i + 2] + k
    return {"w": jax.make_array_from_process_local_data(sharding, local), "step": jax.numpy.asarray(k),
            "rng": jax.random.key(k)}
if mode == "save":
    with Checkpointer(workdir) as ckpt:
        for k in (1, 2, 3):
            ckpt.save(k, state(k), meta={"k": k, "writer": i}, data={"next_index": k})
    with MetricsWriter(workdir) as writer:
        writer.write(3, "train", {"r": 1.0}, writer=i)
else:
    ckpt = Checkpointer(workdir)
    r = ckpt.restore_latest(abstract_like(state(0)))
    w = multihost_utils.process_allgather(r.state["w"], tiled=True)
    print(json.dumps({"step": r.step, "meta": r.meta, "data": r.data, "w": np.asarray(w).ravel().tolist(),
                      "rng": jax.random.key_data(r.state["rng"]).tolist(), "s": int(r.state["step"])}))
    ckpt.save(3, state(30), meta={"k": 30})
    ckpt.close()
jax.distributed.shutdown()
'''


def _run_two_processes(script, workdir, mode):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS=xla_flags())  # one device per process
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(workdir), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outs.append((out, err))
    return outs


@pytest.mark.slow
def test_two_processes_save_fall_back_and_resave(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    workdir = tmp_path / "run"
    _run_two_processes(script, workdir, "save")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2", "3"]
    assert '"writer": 0' in (workdir / "checkpoints" / "3" / "meta" / "metadata").read_text()
    assert [r["writer"] for r in read_metrics(workdir)] == [0]

    _truncate_arrays(workdir / "checkpoints" / "3")
    outs = _run_two_processes(script, workdir, "restore")
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    expected = {"step": 2, "meta": {"k": 2, "writer": 0}, "data": {"next_index": 2},
                "w": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], "rng": [0, 2], "s": 2}
    assert results == [expected, expected]
    assert all("step 3" in err and "unusable" in err for _, err in outs)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2", "3", "3.corrupt"]
    assert '"k": 30' in (workdir / "checkpoints" / "3" / "meta" / "metadata").read_text()
