"""One FST run over several processes (README "Several hosts"), checked against one process.

Every run is a real `launch/train.py` in subprocesses: 2 processes × 4 CPU devices with the coordinator on
127.0.0.1 (a free port each time), against 1 process × 8 devices, on configs/fst_tiny.py for 2 cycles at
reduced sizes. Every process runs under a timeout. The test session's persistent compilation cache (conftest's
`jax_cache_env`) keeps the later runs short.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TIMEOUT_S = 600  # per process
# 2 cycles of 2 RL steps, evaluations at both cycle ends, checkpoints at both (steps 2 and 4).
SMALL = ["--config.total_steps=4", "--config.cycle.rl_steps=2", "--config.cycle.problems_per_step=4",
         "--config.cycle.rollouts_per_problem=4", "--config.cycle.population_size=2",
         "--config.gepa.budget_rollouts=12", "--config.gepa.proposals_per_iteration=2",
         "--config.eval.every=2", "--config.eval.num_problems=8", "--config.eval.k=1", "--config.eval.kl_prompts=8",
         "--config.forgetting_tasks=", "--config.sampling.max_new_tokens=8", "--config.eval.max_new_tokens=8",
         "--config.eval.kl_max_new_tokens=8", "--config.gepa.reflection.max_new_tokens=24",
         "--config.log.tensorboard=false", "--config.log.progress=false", "--noplot"]
# Values that legitimately differ between runs: wall-clock times and the device layout.
UNCOMPARED = {"time", "devices", "mesh", "resumed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def compile_cache(jax_cache_env):
    return jax_cache_env["JAX_COMPILATION_CACHE_DIR"]


def _env(devices: int, cache: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env["XLA_FLAGS"] = xla_flags(devices)  # not the 8 of conftest
    return env


def launch(workdir, cache, *, processes=2, extra=(), script=None, port=None, tag=""):
    """Start the run's processes; returns [(Popen, log path)]."""
    port = port or free_port()
    command = [PYTHON, str(script or ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "fst_tiny.py"),
               "--workdir", str(workdir), *SMALL, *extra]
    started = []
    for i in range(processes):
        multi = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}",
                 "--heartbeat_timeout_s=10"] if processes > 1 else []
        log = Path(f"{workdir}{tag}.p{i}.log")
        proc = subprocess.Popen([*command, *multi], cwd=ROOT, env=_env(8 // processes, cache),
                                stdout=log.open("w"), stderr=subprocess.STDOUT)
        watchdog = threading.Timer(TIMEOUT_S, proc.kill)  # a hang fails the test instead of the session
        watchdog.daemon = True
        watchdog.start()
        started.append((proc, log))
    return started


def finish(started) -> None:
    for proc, log in started:
        rc = proc.wait()
        assert rc == 0, f"{log} exited {rc}:\n{log.read_text()[-3000:]}"


def records(workdir) -> list[dict]:
    out = []
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] != "config":
            out.append({k: v for k, v in r.items() if k not in UNCOMPARED and not k.startswith("time_")})
    return out


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """Equal records: texts, counts, rewards and populations exactly; float losses/KL to float32 rounding
    (a sum over 8 devices in 2 processes adds in another order than in 1)."""
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w), (g["kind"], g["step"])
        for key in w:
            if isinstance(w[key], float) and not key.startswith(("reward", "train/reward", "val/")):
                assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g["kind"], g["step"], key)
            else:
                assert g[key] == w[key], (g["kind"], g["step"], key)


def params_checksum(workdir, step: int) -> dict[str, float]:
    """Per-parameter float64 sums of a checkpoint's params, restored in this process (8 devices, replicated:
    a layout neither run used)."""
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P

    path = Path(workdir) / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(path).item_metadata.tree
    replicated = NamedSharding(jax.make_mesh((jax.device_count(),), ("x",)), P())
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), meta)
    params = checkpointer.restore(path, target)["params"]
    return {jax.tree_util.keystr(k): float(np.asarray(v, np.float64).sum())
            for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, compile_cache):
    """The reference: the same config in 1 process × 8 devices."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    finish(launch(workdir, compile_cache, processes=1))
    return workdir


@pytest.mark.slow
def test_two_processes_match_one_process_across_a_dead_peer(one_process, compile_cache, tmp_path):
    """Two processes run to the first checkpoint (step 2); process 1 is killed, and process 0 exits within two
    minutes with one line naming it. The same command again resumes from step 2 and runs to step 4 in two
    processes: every record (those before the kill among them) and the final params equal one process's."""
    workdir = tmp_path / "two"
    (p0, log0), (p1, _) = started = launch(workdir, compile_cache)
    first = workdir / "checkpoints" / "2" / "_CHECKPOINT_METADATA"
    deadline = time.monotonic() + TIMEOUT_S
    while not first.exists():
        assert p0.poll() is None and p1.poll() is None, "a process ended before the first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    killed_at = time.monotonic()
    os.kill(p1.pid, signal.SIGKILL)
    rc = p0.wait(timeout=150)
    waited = time.monotonic() - killed_at
    text = log0.read_text()
    assert rc != 0 and waited <= 120, (rc, waited)
    # our message, or (when the survivor was not in a collective) the coordination service's
    assert "lost contact with process(es) [1] of 2" in text or ("unhealthy" in text and "\n1\n" in text), text[-2000:]
    for proc, _ in started:
        proc.wait()

    finish(launch(workdir, compile_cache, tag=".rerun"))  # the same command again: resumes from step 2
    config_records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line)["kind"] == "config"]
    assert [r["resumed"] for r in config_records][-1] is True
    want = records(one_process)
    assert [r["kind"] for r in want].count("train") == 4 and [r["kind"] for r in want].count("eval") == 3
    assert_same_records(records(workdir), want)
    got, ref = params_checksum(workdir, 4), params_checksum(one_process, 4)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name] == pytest.approx(ref[name], rel=1e-5, abs=1e-4), name
    assert ref != params_checksum(one_process, 2)  # the params did move: the checksum can fail
    assert not (workdir / "metrics.jsonl.p1").exists() and (workdir / "gepa").is_dir()
    assert "done: 4 steps" in Path(f"{workdir}.rerun.p0.log").read_text()
    assert "done:" not in Path(f"{workdir}.rerun.p1.log").read_text()  # process 0 alone reports and writes


# ---- a hosted reflection LM: only process 0 asks ---------------------------------------------------------

# Distinct replies, one per request in turn: a process that asked for itself would adopt other prompts.
REPLIES = ("reverse, then shift 2", "Reverse, then shift 2.", "reverse then shift 2")


class _Endpoint(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that answers each request differently."""

    requests: list[str] = []

    def do_GET(self):  # model listing, for clients that check the endpoint first
        self._reply({"object": "list", "data": [{"id": "standin", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = len(self.requests)
        self.requests.append(body["messages"][-1]["content"])
        text = f"```\n{REPLIES[n % len(REPLIES)]}\n```"
        self._reply({"id": f"r{n}", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def _reply(self, doc):
        data = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


# launch/train.py, with today's fst.py → OpenAIReflectionLM keyword mismatch (timeout/max_retries vs
# timeout_s/retries) bridged; where the client takes fst.py's keywords, the client runs as it is.
LAUNCHER = """
import os, runpy, sys
sys.path.insert(0, {root!r})
from fst_jax.gepa import reflection
def openai(**kw):
    try:
        return reflection.OpenAIReflectionLM(**kw)
    except TypeError:
        kw["timeout_s"], kw["retries"] = kw.pop("timeout", 120.0), kw.pop("max_retries", 4)
        return reflection.OpenAIReflectionLM(**kw)
reflection.register_reflection_lm("openai", openai)
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_hosted_reflection_is_asked_once_and_adopted_everywhere(compile_cache, tmp_path):
    _Endpoint.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    launcher = tmp_path / "train_with_endpoint.py"
    launcher.write_text(LAUNCHER.format(root=str(ROOT), train=str(ROOT / "launch" / "train.py")))
    workdir = tmp_path / "hosted"
    try:
        os.environ["FST_TEST_KEY"] = "sk-test"
        finish(launch(workdir, compile_cache, script=launcher, extra=[
            "--config.total_steps=2", "--config.eval.at_start=false", "--config.eval.kl_prompts=0",
            # room for proposals after the seeds' pass: 8 seed + 2 × 6 minibatch + 2 × 8 full-window calls
            "--config.gepa.budget_rollouts=40",
            "--config.gepa.reflection.kind=openai",
            f"--config.gepa.reflection.base_url=http://127.0.0.1:{server.server_port}/v1",
            "--config.gepa.reflection.model=standin", "--config.gepa.reflection.api_key_env=FST_TEST_KEY"]))
    finally:
        os.environ.pop("FST_TEST_KEY", None)
        server.shutdown()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    asked = [r for r in rows if r["kind"] == "gepa" and r.get("event") == "proposal" and r["status"] != "skipped"]
    # one request per reflected proposal, plus process 0's start-up check: process 1 never asked (two
    # processes asking would double it)
    preflights = [r for r in _Endpoint.requests if r == "Reply with OK."]
    assert len(preflights) == 1
    assert asked and len(_Endpoint.requests) - len(preflights) == len(asked)
    population = [r for r in rows if r["kind"] == "gepa_cycle"][-1]["population"]
    # both processes adopted the same population (else the end-of-cycle check stops the run), and it holds
    # the endpoint's replies
    assert set(population) & set(REPLIES), population


# ---- the helpers themselves, in 2 processes ---------------------------------------------------------------

HELPERS = """
import sys
sys.path.insert(0, {root!r})
from fst_jax.runtime import distributed
distributed.initialize("127.0.0.1:" + sys.argv[1], 2, int(sys.argv[2]), heartbeat_timeout_s=10)
import jax, numpy as np
from jax.experimental import multihost_utils
from fst_jax.runtime import parallel
from fst_jax.gepa.reflection import CallableReflectionLM, ReflectionLMError
me = jax.process_index()
batch = np.arange(16).reshape(8, 2)
placed = parallel.shard_batch(batch, parallel.make_mesh({{"fsdp": -1}}))
rows = sorted(int(s.data[:, 0].min()) // 2 for s in placed.addressable_shards)
whole = np.asarray(multihost_utils.process_allgather(placed, tiled=True))
print("placed", placed.shape, rows, whole.tolist() == batch.tolist())
print("broadcast", distributed.broadcast_json({{"from": me, "text": "é" * (3 + me)}}))
lm = distributed.OneReplyForAll(CallableReflectionLM(lambda prompts: [f"process {{me}}: {{p}}" for p in prompts]))
print("replies", lm.complete(["a", "b"]), [r.finished for r in lm.complete(["a"])])
def failing(prompts):
    raise ReflectionLMError("endpoint down")
try:
    distributed.OneReplyForAll(CallableReflectionLM(failing if me == 0 else (lambda p: ["ok"]))).complete(["a"])
except ReflectionLMError as e:
    print("error", e)
distributed.check_same("the start", population=["p"], data_cursor={{"next_index": 3}})
print("same", flush=True)
with distributed.exit_when_a_peer_fails():
    distributed.check_same("cycle 1", population=["p", "q" if me else "p"], data_cursor={{"next_index": 3}})
print("not reached")
"""


def test_broadcast_reflection_and_divergence_check(tmp_path):
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS.format(root=str(ROOT)))
    port = str(free_port())
    procs = [subprocess.Popen([PYTHON, str(script), port, str(i)], cwd=ROOT, env=_env(1, str(tmp_path)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 1, out
        assert f"placed (8, 2) [{4 * i}] True" in out, out  # each process built its own 4 rows
        assert "broadcast {'from': 0, 'text': 'ééé'}" in out, out
        assert "replies ['process 0: a', 'process 0: b'] [True]" in out, out
        assert "error endpoint down" in out and "same" in out and "not reached" not in out, out
        assert (f"error: processes diverged at cycle 1: process(es) [1] of 2 hold a different population than "
                f"process 0 (this process is {i})") in out, out


RESTORE = """
import json, sys
sys.path.insert(0, {root!r})
from fst_jax.runtime import distributed
distributed.initialize("127.0.0.1:" + sys.argv[1], 2, int(sys.argv[2]), heartbeat_timeout_s=10)
import jax, numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from fst_jax.runtime import parallel
from fst_jax.runtime.checkpoint import Checkpointer
workdir, out = sys.argv[3], sys.argv[4]
meta = ocp.StandardCheckpointer().metadata(workdir + "/checkpoints/4/state")
meta = meta.item_metadata.tree
mesh = parallel.make_mesh({{"fsdp": -1}})  # 8 devices over both processes
spec = lambda a: P("fsdp") if len(a.shape) and a.shape[0] % 8 == 0 else P()
target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec(a))), meta)
restored = Checkpointer(workdir, read_only=True).restore(4, target)
sums = {{jax.tree_util.keystr(k): float(np.asarray(multihost_utils.process_allgather(v, tiled=True), np.float64).sum())
        for k, v in jax.tree_util.tree_leaves_with_path(restored.state["params"])}}
if jax.process_index() == 0:
    json.dump({{"sums": sums, "population": restored.meta["population"]}}, open(out, "w"))
"""


@pytest.mark.slow
def test_one_process_checkpoint_restores_into_two(one_process, tmp_path):
    """The other direction of the resharding (2 → 1 is `params_checksum` of a 2-process run)."""
    script, out = tmp_path / "restore.py", tmp_path / "sums.json"
    script.write_text(RESTORE.format(root=str(ROOT)))
    port = str(free_port())
    procs = [subprocess.Popen([PYTHON, str(script), port, str(i), str(one_process), str(out)], cwd=ROOT,
                              env=_env(4, str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    got = json.loads(out.read_text())
    assert got["sums"] == pytest.approx(params_checksum(one_process, 4), rel=1e-6)
    rows = [json.loads(line) for line in (one_process / "metrics.jsonl").read_text().splitlines()]
    assert got["population"] == [r for r in rows if r["kind"] == "gepa_cycle"][-1]["population"]


@pytest.mark.parametrize("flags, message", [
    (["--num_processes=2", "--process_id=1"], "--num_processes/--process_id need --coordinator_address=HOST:PORT"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2"], "--coordinator_address needs --num_processes=N "
                                                                 "and --process_id=I"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"], "--process_id=2 is not in [0, "),
    (["--coordinator_address=nohost", "--num_processes=2", "--process_id=0"], "must be HOST:PORT"),
])
def test_bad_process_flags_are_one_line_errors(flags, message, tmp_path):
    out = subprocess.run([PYTHON, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "fst_tiny.py"),
                          "--workdir", str(tmp_path / "w"), *flags], cwd=ROOT, env=_env(1, str(tmp_path)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and not (tmp_path / "w").exists()
