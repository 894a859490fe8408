"""Failures a user of a long run meets, each one clear line and no lost data: bad config values, bad rewards,
bad workdirs, a full disk during a save, SIGKILL during an asynchronous checkpoint write, Ctrl-C, a corrupt
latest checkpoint, and rerunning a finished run. The end-to-end cases run the real `launch/train.py` on the
tiny model the project ships, with small sizes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fst_jax.config import default_config, validate
from fst_jax.tasks.base import RewardError, Score, checked_score

from conftest import TINY_RUN, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "fst_tiny.py")
BAD_REWARD = os.path.join(ROOT, "tests", "data", "bad_reward_config.py")
SMALL = list(TINY_RUN)  # conftest: the tiny run test_wandb makes too, on one device


# ---- config values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, value, message", [
    ("total_steps", -5, "config.total_steps must be an integer ≥ 1, got -5"),
    ("eval.k", 0, "config.eval.k must be an integer ≥ 1"),
    ("sampling.max_new_tokens", 0, "config.sampling.max_new_tokens must be an integer ≥ 1"),
    ("sampling.top_p", 1.5, r"config.sampling.top_p must be a number > 0 and ≤ 1, got 1.5"),
    ("eval.temperature", -0.1, "config.eval.temperature must be a number ≥ 0"),
    ("gepa.epsilon", 2.0, "config.gepa.epsilon must be a number ≥ 0 and ≤ 1"),
    ("rl.learning_rate", 0.0, "config.rl.learning_rate must be a number > 0"),
    ("rl.b2", 1.0, "config.rl.b2 must be a number ≥ 0 and < 1"),
    ("gepa.reflection.max_concurrency", 0, "config.gepa.reflection.max_concurrency must be an integer ≥ 1"),
    ("checkpoint.every_cycles", 0, "config.checkpoint.every_cycles must be an integer ≥ 1"),
    ("tasks.math.val_fraction", 1.0, r"config.tasks.math.val_fraction must be a number in \[0, 1\)"),
    ("rl.loss", "grpo", "config.rl.loss must be one of cispo, ppo_clip; got 'grpo'"),
    ("model.remat", "all", "config.model.remat must be one of none, full, dots_saveable, nothing_saveable"),
    ("model.attention", "flash", "config.model.attention must be one of auto, xla, dot_product, cudnn; got 'flash'"),
    ("gepa.reflection.kind", "anthropic", "config.gepa.reflection.kind must be one of local, openai"),
    ("sampling.prefill_scores_mb", 0, "config.sampling.prefill_scores_mb must be a positive number of MB, got 0"),
])
def test_every_config_value_is_checked_with_its_full_path(path, value, message):
    c = default_config()
    c.model.path = "/models/x"
    validate(c)  # the defaults are valid
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        validate(c)


def test_the_attention_kernel_reaches_the_model_the_run_builds():
    from fst_jax.trainer import dry_run as plan

    c = default_config()
    c.model.preset, c.model.attention = "0.6B", "dot_product"
    assert plan.model_config(c).attention == "dot_product"


def test_val_fraction_with_val_files_is_an_error():
    c = default_config()
    c.model.path = "/models/x"
    c.tasks.math.train_files, c.tasks.math.val_files, c.tasks.math.val_fraction = "a.jsonl", "b.jsonl", 0.1
    with pytest.raises(ValueError, match="config.tasks.math sets both val_files and val_fraction=0.1"):
        validate(c)


# ---- rewards ----------------------------------------------------------------------------------------------

class _Task:
    name = "demo"

    def __init__(self, reward=None, exc=None):
        self.reward, self.exc = reward, exc

    def format_problem(self, problem):
        return problem["question"]

    def score(self, problem, completion):
        if self.exc:
            raise self.exc
        return Score(self.reward, "") if 0 <= self.reward <= 1 else type("S", (), {"reward": self.reward})()


@pytest.mark.parametrize("task, why", [
    (_Task(math.nan), "reward nan is not a finite number in [0, 1]"),
    (_Task(math.inf), "reward inf is not a finite number in [0, 1]"),
    (_Task(-0.5), "reward -0.5 is not a finite number in [0, 1]"),
    (_Task(exc=KeyError("answer")), "score() raised KeyError: 'answer'"),
])
def test_a_bad_reward_names_task_problem_and_completion(task, why):
    with pytest.raises(RewardError) as info:
        checked_score(task, {"id": "train.jsonl:7", "question": "q"}, "The answer is 42 " * 10, task_name="math")
    info.value.step = 12
    text = str(info.value)
    assert text.startswith(f"task 'math', problem train.jsonl:7 at step 12: {why}; the completion starts "
                           "'The answer is 42 The answer is 42 The answer is 42 The answe…'. Fix the task's score()")
    assert "\n" not in text
    assert checked_score(_Task(0.25), {"id": "1"}, "x").reward == 0.25


# ---- checkpoint writes ----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's closed-loop teardown
@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_write_is_one_error_and_the_previous_step_stays_latest(tmp_path, async_save):
    import jax.numpy as jnp

    from fst_jax.runtime.checkpoint import Checkpointer, CheckpointWriteError
    from fault_injection import install

    state = {"w": jnp.arange(6.0).reshape(2, 3)}
    ckpt = Checkpointer(tmp_path, async_save=async_save)
    ckpt.save(1, state, meta={"s": 1}, force=True)
    ckpt.wait()
    undo = install("enospc:2")
    try:
        with pytest.raises(CheckpointWriteError) as info:
            ckpt.save(2, state, meta={"s": 2}, force=True)
            ckpt.save(3, state, meta={"s": 3}, force=True)  # an async failure surfaces here at the latest
    finally:
        undo()
        ckpt.close()  # quiet after a reported failure
    assert str(info.value) == (
        f"could not write checkpoint step 2 to {tmp_path}/checkpoints: the disk is full; the latest complete "
        "checkpoint is step 1 (intact); free space (or point --workdir at a larger disk) and rerun the same "
        "command to resume")
    with Checkpointer(tmp_path) as again:
        restored = again.restore_latest({"w": jnp.zeros((2, 3))})
    assert restored.step == 1 and restored.meta == {"s": 1}


def test_quiet_stderr_drops_only_closed_event_loop_tracebacks():
    import io

    from fst_jax.runtime.storage_errors import QuietTeardownStderr

    out = io.StringIO()
    err = QuietTeardownStderr(out)
    closed = ("Traceback (most recent call last):\n  File \"base_events.py\", line 806\n"
              "RuntimeError: Event loop is closed\n")
    err.write("step 3\r")
    for piece in closed.split("\n"):  # written piecewise, as C code prints a traceback
        err.write(piece + "\n" if piece else "")
    err.write("Traceback (most recent call last):\n  File \"x.py\"\nValueError: real\n" + closed + "done\n")
    assert out.getvalue() == "step 3\rTraceback (most recent call last):\n  File \"x.py\"\nValueError: real\ndone\n"
    # three threads' tracebacks interleaved line by line, the run's one-line error in the middle of them
    out.seek(0), out.truncate()
    lines = closed.splitlines()
    for row in range(len(lines)):
        for thread in range(3):
            err.write(lines[row] + "\n")
            if row == 1 and thread == 1:
                err.write("error: could not write checkpoint step 2: the disk is full\n")
    err.write("next\n")
    assert out.getvalue() == "error: could not write checkpoint step 2: the disk is full\nnext\n"


# ---- the real launch/train.py ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(jax_cache_env):
    """The environment of a user's shell (one CPU device) plus the session's persistent compilation cache."""
    e = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(1), **jax_cache_env)
    e.pop("FST_JAX_TRACEBACK", None)
    return e


def _train(env, workdir, *args, config=TINY, fault=None, timeout=600):
    prefix = [os.path.join("tests", "fault_injection.py"), fault] if fault else []
    cmd = [sys.executable, *prefix, os.path.join("launch", "train.py"), "--config", config,
           "--workdir", str(workdir), *SMALL, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _errors(result) -> list[str]:
    """stderr without absl's INFO/WARNING log lines: what a user reads as the failure."""
    return [line for line in result.stderr.splitlines() if line.strip() and not line[:1] in "IW"]


def _complete_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isfile(
        os.path.join(d, n, "_CHECKPOINT_METADATA"))) if os.path.isdir(d) else []


def _records(workdir, kind):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.slow
def test_bad_workdirs_and_config_fail_in_one_line_before_the_model_loads(env, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    tail = "  (set FST_JAX_TRACEBACK=1 for the traceback)"
    cases = [(a_file, f"error: --workdir {a_file} is a file, not a directory; choose another path{tail}"),
             (a_file / "run", f"error: --workdir {a_file / 'run'} lies under {a_file}, which is a file; choose "
                              f"another path{tail}")]
    if os.geteuid() != 0:  # root writes through permission bits
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
        cases.append((read_only / "run", f"error: --workdir {read_only / 'run'} is not writable: permission "
                                         f"denied ({read_only / 'run'}); choose a writable directory{tail}"))
    for workdir, line in cases:
        start = time.perf_counter()
        r = _train(env, workdir)
        assert r.returncode == 1 and _errors(r) == [line], r.stderr
        assert time.perf_counter() - start < 60  # no model load, no compile
    r = _train(env, tmp_path / "neg", "--config.total_steps=-5")
    assert r.returncode == 1 and _errors(r) == [
        "error: config.total_steps must be an integer ≥ 1, got -5  (set FST_JAX_TRACEBACK=1 for the traceback)"]
    assert not (tmp_path / "neg").exists()
    model = tmp_path / "model"  # a checkpoint copied without its tokenizer
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).symlink_to(os.path.join(ROOT, "assets", "tiny-qwen3", name))
    r = _train(env, tmp_path / "tok", f"--config.model.path={model}")
    assert r.returncode == 1 and _errors(r) == [
        f"error: config.model.path={str(model)!r}: missing {model}/tokenizer.json (copy the checkpoint's full "
        f"directory, tokenizer files included){tail}"]


@pytest.mark.slow
def test_command_line_errors_name_the_full_path(env, tmp_path):
    r = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/fst_qwen3.py",
                        "--config.tasks.nothere.train_files=x"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert _errors(r)[0].startswith("error: bad command line: unknown config field config.tasks.nothere (in "
                                    "--config.tasks.nothere.train_files); config.tasks has: ")
    assert "\\" not in _errors(r)[0] and "\"'" not in _errors(r)[0]


@pytest.mark.slow
def test_bad_rewards_stop_rl_and_gepa_in_one_line_keeping_the_checkpoint(env, tmp_path):
    # RL: the first step's 8 rollouts score normally and are checkpointed; step 2 meets a NaN
    r = _train(env, tmp_path / "rl", "--config.method=rl", "--config.tasks.rule.options.bad_after=8",
               config=BAD_REWARD)
    assert r.returncode == 1, r.stderr
    [line] = _errors(r)
    assert line.startswith("error: task 'rule', problem ") and " at step 2: reward nan is not a finite number" in line
    assert "the completion starts '" in line and "Traceback" not in r.stderr
    assert _complete_steps(tmp_path / "rl") == [1]
    # GEPA: its evaluations score through the same check
    r = _train(env, tmp_path / "gepa", "--config.method=gepa", "--config.tasks.rule.options.mode=raise",
               config=BAD_REWARD)
    assert r.returncode == 1, r.stderr
    [line] = _errors(r)
    assert line.startswith("error: task 'rule', problem ") and \
        " at step 1: score() raised ZeroDivisionError: division by zero; the completion starts '" in line


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_the_previous_checkpoint_and_resumes(env, tmp_path):
    workdir = tmp_path / "run"
    r = _train(env, workdir, "--config.method=rl", fault="enospc:2")
    assert r.returncode == 1
    assert _errors(r) == [
        f"error: could not write checkpoint step 2 to {workdir}/checkpoints: the disk is full; the latest complete "
        "checkpoint is step 1 (intact); free space (or point --workdir at a larger disk) and rerun the same "
        "command to resume  (set FST_JAX_TRACEBACK=1 for the traceback)"]
    assert _complete_steps(workdir) == [1]
    r = _train(env, workdir, "--config.method=rl")  # space freed: the same command resumes and finishes
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "at RL step 1" in r.stderr
    assert _complete_steps(workdir) == [1, 2]
    assert [t["step"] for t in _records(workdir, "train")] == [1, 2]
    # and the same command once more reports the finished run's last evaluation instead of `{}`
    r = _train(env, workdir, "--config.method=rl")
    assert r.returncode == 0
    head, _, body = r.stdout.partition("\n")
    assert head == f"already finished: 2 steps in {workdir} (nothing to do); its last evaluation (step 2):"
    final = json.loads((workdir / "final_eval.json").read_text())
    assert final == _records(workdir, "eval")[-1] and final["rl_steps"] == 2
    assert f"  seed prompt     {final['val/reward']:.3f}  (method rl: the prompt stays the seed)" in body


@pytest.mark.slow
def test_sigkill_during_an_async_checkpoint_write_resumes_from_the_previous_one(env, tmp_path):
    workdir, marker = tmp_path / "run", tmp_path / "writing"
    cmd = [sys.executable, "tests/fault_injection.py", f"stall:2:{marker}", "launch/train.py", "--config", TINY,
           "--workdir", str(workdir), "--config.method=rl", "--config.checkpoint.async_save=True", *SMALL]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the write of step 2 never started"
        proc.kill()  # SIGKILL in the middle of step 2's write
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _complete_steps(workdir) == [1]
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in os.listdir(workdir / "checkpoints"))
    r = _train(env, workdir, "--config.method=rl")
    assert r.returncode == 0, r.stderr
    assert "at RL step 1" in r.stderr
    assert _complete_steps(workdir) == [1, 2]
    assert not any("tmp" in n for n in os.listdir(workdir / "checkpoints"))
    assert [t["step"] for t in _records(workdir, "train")] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, what", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
                         ids=["sigint", "sigterm"])
def test_a_stop_signal_exits_in_one_line_naming_the_step(env, tmp_path, sig, code, what):
    """Ctrl-C (SIGINT) and a scheduler's SIGTERM stop the run with one line and the checkpoint to resume from.
    The run starts with both ignored, as `nohup train.py &` from a script leaves them (an ignored signal is
    inherited across exec): train.py installs its own handlers."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", "--config", TINY, "--workdir", str(workdir), "--config.method=rl",
           *SMALL[1:], "--config.total_steps=400"]  # never ends first

    def ignore_stop_signals():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore_stop_signals)
    try:
        deadline = time.time() + 600
        while not _complete_steps(workdir) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert _complete_steps(workdir), "no checkpoint appeared"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    errors = [line for line in err.splitlines() if line.strip() and line[:1] not in "IW"]
    assert len(errors) == 1 and "Traceback" not in err, err
    step = int(errors[0].split(f"{what} at step ")[1].split(";")[0])
    saved = _complete_steps(workdir)[-1]
    assert errors[0] == (f"{what} at step {step}; rerun the same command to resume (from the checkpoint at "
                         f"step {saved})")
    assert step >= saved >= 1


def test_a_bad_reward_in_an_evaluation_names_the_problem_too():
    """mean@k scores through the same check as training: a NaN at evaluation is a RewardError naming the task's
    problem, not a NaN in the metrics."""
    from fst_jax.trainer import evals
    from fst_jax.models.char_tokenizer import make_char_tokenizer
    from fst_jax.sampling import SampleOutput

    class _Sampler:
        def generate(self, prompts, *, num_samples, **_):
            n = len(prompts) * num_samples
            return SampleOutput(tokens=[[70, 71]] * n, logprobs=[np.zeros(2, np.float32)] * n, finished=[True] * n)

    problems = [{"id": "val.jsonl:3", "question": "q"}]
    with pytest.raises(RewardError, match=r"task 'demo', problem val.jsonl:3.*reward nan is not a finite"):
        evals.mean_at_k(_Sampler(), make_char_tokenizer(), _Task(math.nan), problems, "Be exact.", k=2)
    good = evals.mean_at_k(_Sampler(), make_char_tokenizer(), _Task(0.5), problems, "Be exact.", k=2)
    assert good["mean_at_k"] == 0.5
