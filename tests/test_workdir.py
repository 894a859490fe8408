"""One workdir, one run: the lock against a second process, config.json and the resume check, and a KL that
cannot read negative — through `launch/train.py` as a user runs it (tiny model, 2 fake CPU devices, RL for
2 steps), plus the lock's stale rule and the comparison rules on their own."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
SMALL = ["--config.method=rl", "--config.total_steps=2", "--config.cycle.rl_steps=1",
         "--config.cycle.problems_per_step=2", "--config.cycle.rollouts_per_problem=4",
         "--config.cycle.population_size=2", "--config.eval.at_start=False", "--config.eval.every=1",
         "--config.eval.num_problems=2", "--config.eval.k=1", "--config.eval.kl_prompts=2",
         "--config.forgetting_tasks=", "--config.log.progress=False", "--config.log.tensorboard=False", "--noplot"]
NEW_RULE = '--config.tasks.rule.options={"rule": "sort, then shift 3"}'


@pytest.fixture(scope="module")
def env(jax_cache_env):
    e = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(2),
             **jax_cache_env,
             FST_JAX_LOCK_HEARTBEAT_S="1", FST_JAX_LOCK_STALE_S="60")
    e.pop("FST_JAX_TRACEBACK", None)
    return e


def command(workdir, *extra) -> list[str]:
    return [sys.executable, "launch/train.py", "--config", "configs/fst_tiny.py", "--workdir", str(workdir),
            *SMALL, *extra]


def train(env, workdir, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, *extra), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)


def errors(stderr: str) -> list[str]:
    """What a user reads as the failure: stderr without absl's log lines."""
    return [line for line in stderr.splitlines() if line.strip() and line[:1] not in "IW"]


def files(workdir) -> dict[str, bytes]:
    root = Path(workdir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def records(workdir, kind) -> list[dict]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def first_run(env, tmp_path_factory):
    """Run A on a fresh workdir; once its first checkpoint exists, A is paused (SIGSTOP) and run B, the same
    command on the same workdir, is started; then A continues to the end."""
    workdir = tmp_path_factory.mktemp("first") / "run"
    a = subprocess.Popen(command(workdir), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        wait_for(workdir / "checkpoints" / "1" / "_CHECKPOINT_METADATA", a)
        os.kill(a.pid, signal.SIGSTOP)  # A holds the lock; nothing in the workdir moves while B runs
        before = files(workdir)
        start = time.monotonic()
        b = train(env, workdir)
        b_seconds = time.monotonic() - start
        after = files(workdir)
        os.kill(a.pid, signal.SIGCONT)
        _, a_err = a.communicate(timeout=TIMEOUT_S)
    finally:
        if a.poll() is None:
            a.kill()
    return {"workdir": workdir, "a": a, "a_err": a_err, "b": b, "b_seconds": b_seconds, "before": before,
            "after": after}


def copy_of(first_run, tmp_path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(first_run["workdir"], workdir)
    return workdir


# ---- the lock --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_process_is_refused_in_one_line_and_the_first_run_is_untouched(first_run):
    b, a, workdir = first_run["b"], first_run["a"], first_run["workdir"]
    assert b.returncode == 1, b.stderr
    [line] = errors(b.stderr)
    assert re.fullmatch(
        rf"error: --workdir {re.escape(str(workdir))} is in use by another run \(host {re.escape(socket.gethostname())}"
        rf", pid {a.pid}, since \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ, heartbeat \d+ s ago\); wait for it to end or "
        r"stop it, or choose another --workdir \(a lock whose heartbeat stops for 60 s is taken over: "
        rf"{re.escape(str(workdir))}/run.lock\)", line), line
    assert first_run["b_seconds"] < 30  # no model load, no compile
    assert first_run["after"] == first_run["before"]  # not one byte written, the lock included
    assert "run.lock" in first_run["before"] and "config.json" in first_run["before"]
    # A went on as if alone: one config record, its steps once each, and its lock gone at the end
    assert a.returncode == 0, first_run["a_err"][-3000:]
    assert len(records(workdir, "config")) == 1
    assert [r["step"] for r in records(workdir, "train")] == [1, 2]
    assert not (workdir / "run.lock").exists()


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over(env, first_run, tmp_path):
    """kill -9 leaves the lock behind; the same command again takes it over at once (its pid is gone)."""
    workdir = copy_of(first_run, tmp_path)
    killed = subprocess.Popen(command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(workdir / "run.lock", killed)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(30)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert json.loads((workdir / "run.lock").read_text())["pid"] == killed.pid
    r = train(env, workdir)
    assert r.returncode == 0, r.stderr
    assert f"taking over the stale lock {workdir}/run.lock" in r.stderr
    assert f"its process {killed.pid} on this host is gone" in r.stderr
    assert r.stdout.startswith(f"already finished: 2 steps in {workdir}")
    assert not (workdir / "run.lock").exists()


def test_stale_rule_heartbeat_age_and_a_live_holder(tmp_path):
    """A lock from another host is stale once its heartbeat is older than the stale age (a lost node); a
    fresh one refuses. The heartbeat refreshes the file; release removes it only while it is ours."""
    from fst_jax.runtime.workdir_lock import WorkdirBusyError, WorkdirLock, read_lock

    path = tmp_path / "run.lock"
    now = time.time()
    path.write_text(json.dumps({"host": "lost-node", "pid": 1, "run_id": "old", "started_at": "then",
                                "heartbeat_unix": now - 3.0}))
    live = WorkdirLock(str(tmp_path), heartbeat_s=0.05, stale_s=10.0)
    with pytest.raises(WorkdirBusyError, match=r"in use by another run \(host lost-node, pid 1, since then, "
                                               r"heartbeat 3 s ago\)"):
        live.acquire()
    assert json.loads(path.read_text())["run_id"] == "old"  # a refusal writes nothing
    lock = WorkdirLock(str(tmp_path), heartbeat_s=0.05, stale_s=2.0)
    lock.acquire()
    try:
        first = read_lock(str(path))
        assert first["run_id"] == lock.record["run_id"] and first["host"] == socket.gethostname()
        time.sleep(0.3)
        assert read_lock(str(path))["heartbeat_unix"] > first["heartbeat_unix"]  # the heartbeat beats
        with pytest.raises(WorkdirBusyError, match=rf"pid {os.getpid()}"):
            WorkdirLock(str(tmp_path), stale_s=2.0).acquire()
    finally:
        lock.release()
    assert not path.exists()


def test_a_run_whose_lock_was_taken_over_stops_itself(tmp_path, monkeypatch, capsys):
    """Two writers must never go on together: a heartbeat that finds another run's id in the lock file (this
    run stalled past the stale age and was taken over) sends this process SIGTERM and says why."""
    from fst_jax.runtime import workdir_lock

    sent = []
    monkeypatch.setattr(workdir_lock.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    lock = workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05, stale_s=2.0)
    lock.acquire()
    (tmp_path / "run.lock").write_text(json.dumps({"host": "other", "pid": 42, "run_id": "theirs"}))
    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:
        time.sleep(0.05)
    lock.release()
    assert sent == [(os.getpid(), signal.SIGTERM)]
    assert f"the lock on --workdir {tmp_path} was taken over by host other, pid 42" in capsys.readouterr().err
    assert json.loads((tmp_path / "run.lock").read_text())["run_id"] == "theirs"  # theirs stays


# ---- config.json and the resume check ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_resume_with_another_task_is_refused_naming_the_field(env, first_run, tmp_path):
    workdir = copy_of(first_run, tmp_path)
    before = files(workdir)
    start = time.monotonic()
    r = train(env, workdir, NEW_RULE, "--config.total_steps=4")
    assert r.returncode == 1
    change = 'config.tasks.rule.options.rule: "reverse, then shift 2" → "sort, then shift 3"'
    assert errors(r.stderr) == [(
        f"error: cannot resume {workdir}: the config changes what its run computes (compared with its "
        f"config.json): {change}; rerun with the original values, start a new run in another --workdir, or pass "
        "--allow_config_change to resume anyway (the change is logged in metrics.jsonl)")]
    assert time.monotonic() - start < 30 and files(workdir) == before  # before the model loads; nothing written
    # a workdir without config.json (older runs): the checkpoint's own copy refuses it
    (workdir / "config.json").unlink()
    r = train(env, workdir, NEW_RULE, "--config.total_steps=4", "--config.seed=7")
    assert r.returncode == 1
    [line] = errors(r.stderr)
    assert f"(compared with its checkpoint at step 2): config.seed: 0 → 7; {change}; rerun" in line
    # --allow_config_change resumes anyway and says so in the records and in config.json
    r = train(env, workdir, NEW_RULE, "--config.total_steps=3", "--allow_config_change")
    assert r.returncode == 0, r.stderr
    [_, resumed] = records(workdir, "config")
    assert [(c["field"], c["accepted"]) for c in resumed["config_changes"]] == [
        ("tasks.rule.options.rule", "allowed by --allow_config_change"), ("total_steps", "the run's length")]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["config"]["tasks"]["rule"]["options"]["rule"] == "sort, then shift 3"
    assert saved["resumed_at_step"] == 2 and saved["config_changes"] == resumed["config_changes"]


@pytest.mark.slow
def test_a_resume_with_more_steps_on_another_mesh_continues(env, first_run, tmp_path):
    workdir = copy_of(first_run, tmp_path)
    r = train(env, workdir, "--config.total_steps=3", "--config.mesh.data=2", "--config.mesh.fsdp=1")
    assert r.returncode == 0, r.stderr
    assert "at RL step 2" in r.stderr and f"done: 3 steps in {workdir}" in r.stdout
    first, resumed = records(workdir, "config")
    assert first["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and resumed["mesh"] == {"data": 2, "fsdp": 1,
                                                                                        "tensor": 1}
    assert [(c["field"], c["old"], c["new"]) for c in resumed["config_changes"]] == [
        ("mesh.data", 1, 2), ("mesh.fsdp", -1, 1), ("total_steps", 2, 3)]
    assert [r["step"] for r in records(workdir, "train")] == [1, 2, 3]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["config"]["total_steps"] == 3 and saved["resumed_at_step"] == 2
    assert saved["command"][-3:] == ["--config.total_steps=3", "--config.mesh.data=2", "--config.mesh.fsdp=1"]
    assert all(r["kl_to_base"] >= 0 for r in records(workdir, "eval"))


def test_config_json_is_written_without_credentials(tmp_path, monkeypatch):
    import fst_jax
    from fst_jax.config import default_config
    from fst_jax.trainer import run_config

    secret = "sk-test-0123456789abcdefghijklmnop"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    c = default_config()
    c.gepa.reflection.options = {"api_key": secret, "organization": "lab"}
    path = run_config.write_config_json(str(tmp_path), c, command=["launch/train.py", f"--key={secret}"])
    text = Path(path).read_text()
    assert secret not in text
    doc = json.loads(text)
    assert doc["config"]["gepa"]["reflection"]["options"] == {"api_key": "<redacted>", "organization": "lab"}
    assert doc["config"]["gepa"]["reflection"]["api_key_env"] == "<redacted>"
    assert doc["command"] == ["launch/train.py", "<redacted>"] and doc["fst_jax_version"] == fst_jax.__version__
    assert doc["command_line"] == "python launch/train.py '<redacted>'"
    assert not [p for p in os.listdir(tmp_path) if p != "config.json"]  # no temporary file left


def test_comparison_rules():
    """A field an older config lacks counts as its default; unused tasks and moved paths are accepted;
    the recipe, seeds, method and model are refused."""
    from fst_jax.config import default_config
    from fst_jax.trainer import run_config

    old = run_config.snapshot(default_config())
    old["model"]["path"] = "/data/models/Qwen3-8B"
    del old["sampling"]["slots"], old["sampling"]["draw"], old["eval"]["kl_prompts"]  # fields "added later"
    new = default_config()
    new.model.path = "/scratch/Qwen3-8B/"
    assert run_config.compare(old, new) == [{"field": "model.path", "old": "/data/models/Qwen3-8B",
                                             "new": "/scratch/Qwen3-8B/", "accepted": "a moved path (same file names)"}]
    old["tasks"]["math"]["train_files"] = "<redacted>"  # masked by an older redaction: not comparable
    assert run_config.compare(old, new)[1] == {"field": "tasks.math.train_files", "old": "<redacted>", "new": "",
                                               "accepted": "masked in one copy"}
    new.sampling.slots, new.mesh.tensor, new.tasks.other = 64, 2, {"train_files": "x.jsonl"}
    new.rl.learning_rate, new.seed, new.method, new.model.path = 2e-6, 1, "rl", "/data/models/Qwen3-4B"
    verdict = {c["field"]: c["accepted"] for c in run_config.compare(old, new)}
    assert verdict == {"sampling.slots": "sampler slots", "mesh.tensor": "the mesh (a checkpoint restores on any "
                       "topology)", "tasks.other.train_files": "a task the run does not use", "rl.learning_rate": None,
                       "seed": None, "method": None, "model.path": None, "tasks.math.train_files": "masked in one copy"}
    with pytest.raises(run_config.ConfigChangeError, match=r"config.method: \"fst\" → \"rl\"; config.model.path: "
                       r"\"/data/models/Qwen3-8B\" → \"/data/models/Qwen3-4B\"; config.rl.learning_rate: 1e-06 → "
                       r"2e-06; config.seed: 0 → 1; rerun"):
        run_config.check_resume(old, new, workdir="/w")
    logged = run_config.check_resume(old, new, workdir="/w", allow=True)
    assert [c["field"] for c in logged if c["accepted"] == "allowed by --allow_config_change"] == [
        "method", "model.path", "rl.learning_rate", "seed"]


# ---- KL to base -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_evaluation_reports_a_nonnegative_kl_and_names_its_estimator(first_run):
    evals = records(first_run["workdir"], "eval")
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        assert r["kl_estimator"] == "k3"
        assert r["kl_to_base"] >= 0 and r["kl_to_base_best"] >= 0
    assert evals[-1]["kl_to_base"] > 0  # the policy moved: the check can fail


def test_k3_is_nonnegative_where_k1_reads_negative():
    from fst_jax.trainer.evals import k3

    d = np.array([-0.3, 0.1, -0.05, 0.2, -0.4, 1e-9])  # log π_θ − log π_base of sampled tokens
    assert d.mean() < 0  # k1, the old estimator, would report a negative KL
    assert np.all(k3(d) >= 0) and k3(d).mean() > 0
    np.testing.assert_allclose(k3(d), np.exp(-d) - 1 + d, atol=1e-15)
    assert k3(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]
