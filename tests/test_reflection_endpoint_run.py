"""`launch/train.py` with the hosted reflection LM (`gepa.reflection.kind=openai`) end to end, against an
OpenAI-compatible server this test starts on 127.0.0.1: a prompt the server wrote is accepted and trains the
tiny model; an endpoint that cannot be reached stops the run at start-up in one line; one that fails during
the run stops it, saved, in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import xla_flags
from test_gepa_reflection_openai import ChatServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-loopback-SECRET-42"
RULE = "reverse, then shift 2"  # the hidden rule of configs/fst_tiny.py's task


def command(workdir, url, *extra):
    return [sys.executable, os.path.join(ROOT, "launch", "train.py"),
            f"--config={os.path.join(ROOT, 'configs', 'fst_tiny.py')}", f"--workdir={workdir}",
            "--config.gepa.reflection.kind=openai", f"--config.gepa.reflection.base_url={url}",
            "--config.gepa.reflection.model=loopback", "--config.gepa.reflection.api_key_env=FST_LOOPBACK_KEY",
            "--config.gepa.reflection.timeout_s=10", "--config.total_steps=2", "--config.cycle.rl_steps=2",
            "--config.cycle.problems_per_step=4", "--config.cycle.rollouts_per_problem=4",
            "--config.cycle.population_size=2", "--config.gepa.budget_rollouts=40",
            "--config.gepa.proposals_per_iteration=2", "--config.eval.k=1", "--config.eval.num_problems=4",
            "--config.eval.kl_prompts=0", "--config.eval.at_start=false", "--config.forgetting_tasks=",
            "--config.log.progress=false", "--noplot", *extra]


@pytest.fixture(scope="module")
def cache(jax_cache_env):
    """The session's persistent compilation cache (conftest): the same programs compile once."""
    return jax_cache_env["JAX_COMPILATION_CACHE_DIR"]


def run(cmd, cache, timeout=600):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), FST_LOOPBACK_KEY=KEY,
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def records(workdir, kind):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_training_reflects_through_a_loopback_endpoint(tmp_path, cache):
    server = ChatServer()
    server.script = [("ok", f"A better instruction:\n```\n{RULE}\n```")] * 1000
    try:
        done = run(command(tmp_path / "run", server.url), cache)
    finally:
        server.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert server.requests and all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert server.requests[0]["body"]["max_tokens"] == 1  # the start-up preflight
    accepted = [r for r in records(tmp_path / "run", "gepa") if r["status"] == "accepted"]
    assert accepted and accepted[0]["new_texts"] == {"system_prompt": RULE}  # the server's reply, adopted
    (cycle,) = records(tmp_path / "run", "gepa_cycle")
    assert cycle["population"][0] == RULE and cycle["reflection_failures"] == 0
    for path, _, files in os.walk(tmp_path / "run"):  # the key is nowhere: metrics, checkpoints, config
        for name in files:
            with open(os.path.join(path, name), "rb") as f:
                assert KEY.encode() not in f.read(), os.path.join(path, name)
    assert KEY not in done.stdout + done.stderr


def test_unreachable_endpoint_fails_at_start_in_one_line(tmp_path, cache):
    dead = ChatServer()
    dead.close()  # a port nobody listens on: connection refused
    start = time.monotonic()
    out = run(command(tmp_path / "dead", dead.url), cache, timeout=120)
    assert out.returncode == 1 and time.monotonic() - start < 60
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: reflection request to") and "cannot connect" in lines[-1]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "dead" / "checkpoints").exists()  # stopped before anything heavy

    server = ChatServer()
    server.script = [("status", 401)]
    try:
        out = run(command(tmp_path / "denied", server.url), cache, timeout=120)
    finally:
        server.close()
    assert out.returncode == 1 and "HTTP 401" in out.stderr.splitlines()[-1] and KEY not in out.stderr


def test_endpoint_failing_during_the_run_stops_it_saved_in_one_line(tmp_path, cache):
    server = ChatServer()
    server.script = [("ok", "OK")] + [("status", 503)] * 1000  # the preflight passes, then the endpoint is down
    try:
        out = run(command(tmp_path / "outage", server.url, "--config.gepa.reflection.max_retries=0",
                          "--config.gepa.reflection.max_consecutive_failures=2"), cache)
    finally:
        server.close()
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.splitlines()[-1]
    assert last.startswith("error: stopped at RL step 0: 2 reflection calls failed in a row") and "HTTP 503" in last
    assert "rerun the same command to resume" in last and "Traceback" not in out.stderr
    (cycle,) = records(tmp_path / "outage", "gepa_cycle")
    assert cycle["reflection_failures"] == 2 and cycle["stop_reason"] == "reflection_failures"
    assert (tmp_path / "outage" / "checkpoints" / "0").is_dir()
