"""The training system end to end on a tiny random model: every method runs, logs, checkpoints and resumes
exactly as an uninterrupted run."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from fst_jax.config import default_config, validate
from fst_jax.models.char_tokenizer import make_char_tokenizer
from fst_jax.models.config import Qwen3Config
from fst_jax.models.hf import save_pretrained
from fst_jax.models.qwen3 import Qwen3

from conftest import xla_flags

DATA = os.path.join(os.path.dirname(__file__), "data", "math_small.jsonl")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    config = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16, max_position_embeddings=2048)
    save_pretrained(Qwen3(config, rngs=nnx.Rngs(0)), path, tokenizer=make_char_tokenizer())
    return str(path)


def tiny_config(checkpoint, method="fst", total_steps=4):
    c = default_config()
    c.method, c.total_steps, c.seed = method, total_steps, 3
    c.model.path = checkpoint
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, -1, 1
    c.tasks.math.train_files = DATA
    c.tasks.math.val_fraction = 0.3
    c.tasks.math.fields = {"question": "problem", "answer": "solution"}
    c.cycle.rl_steps, c.cycle.problems_per_step, c.cycle.rollouts_per_problem, c.cycle.population_size = 2, 2, 4, 2
    c.sampling.max_new_tokens = 6
    c.rl.learning_rate, c.rl.warmup_steps = 1e-2, 0
    c.gepa.budget_rollouts, c.gepa.proposals_per_iteration, c.gepa.minibatch_size = 14, 2, 2
    c.gepa.reflection.max_new_tokens = 8
    c.eval.every, c.eval.k, c.eval.max_new_tokens, c.eval.kl_prompts, c.eval.kl_max_new_tokens = 2, 2, 6, 2, 6
    c.checkpoint.async_save = False
    c.log.progress = c.log.tensorboard = False
    return c


def _records(workdir, kind):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _run(config, workdir):
    from fst_jax.trainer.runner import FSTRunner

    runner = FSTRunner(config, str(workdir))
    runner.run()
    return runner


def test_fst_runs_logs_and_resumes_exactly(tiny_checkpoint, tmp_path):
    full = _run(tiny_config(tiny_checkpoint, total_steps=4), tmp_path / "full")
    assert full.counters.rl_steps == 4 and full.counters.cycles == 2
    assert full.counters.rl_rollouts == 4 * 2 * 4
    cycles = _records(tmp_path / "full", "gepa_cycle")
    assert sum(r["metric_calls"] for r in cycles) == full.counters.gepa_rollouts
    for r in cycles:  # the budget is a hard cap, split by what it bought
        assert 0 < r["metric_calls"] <= 14 and r["proposals"] >= 1 and all(r["population_in_front"])
        assert r["metric_calls"] == r["seed_scoring_calls"] + r["minibatch_calls"] + r["full_eval_calls"]
        assert r["seed_scoring_calls"] <= 4 and r["full_eval_calls"] == 4 * r["accepted"]  # window: 2 × 2
        assert sum(share for _, share in r["population_shares"]) == 1 and len(r["population"]) == 2
    train = _records(tmp_path / "full", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # reuse of GEPA's rollouts is off by default: every RL rollout is sampled
    assert [(r["reused_rollouts"], r["rollouts_this_step"]) for r in train] == [(0, 8)] * 4
    assert {"reward_mean", "kl", "grad_norm", "reward_prompt_0", "reward_prompt_1"} <= set(train[0])
    evals = _records(tmp_path / "full", "eval")
    assert [r["step"] for r in evals] == [0, 2, 4] and "kl_to_base" in evals[0]
    assert "math/best/mean_at_k" in evals[0] and "math/seed/mean_at_k" in evals[0]
    assert evals[0]["val/reward"] == evals[0]["math/best/mean_at_k"]
    assert abs(evals[0]["kl_to_base"]) < 1e-5  # the policy starts as the base
    assert all(isinstance(r["kl_to_base_best"], float) for r in evals)  # and kl_to_base: the seed prompt's
    assert train[0]["train/reward"] == train[0]["reward_mean"]
    assert len(_records(tmp_path / "full", "gepa_cycle")) == 2

    # a "killed" run: stop after the first cycle, then the same command again in the same workdir
    _run(tiny_config(tiny_checkpoint, total_steps=2), tmp_path / "resumed")
    resumed = _run(tiny_config(tiny_checkpoint, total_steps=4), tmp_path / "resumed")
    assert resumed.population == full.population
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
                 jax.device_get(full.state.params))
    a, b = _records(tmp_path / "full", "train"), _records(tmp_path / "resumed", "train")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time") and k != "time"}
    assert [strip(r) for r in a] == [strip(r) for r in b]


def test_population_from_the_non_dominated_set(tiny_checkpoint, tmp_path):
    """`cycle.population_rule=nondominated`: the K rollout prompts are drawn from the candidates left after
    remove_dominated, logged per cycle; the random model earns nothing, so every candidate ties at zero on every
    problem and one prompt (not the whole front) fills the population."""
    from fst_jax.gepa.reflection import CallableReflectionLM
    from fst_jax.trainer.runner import FSTRunner

    c = tiny_config(tiny_checkpoint, total_steps=1)
    c.cycle.rl_steps = 1
    c.cycle.population_rule = "nondominated"
    c.gepa.acceptance = "improvement_or_equal"  # children that tie their parent at zero join the front
    c.eval.every, c.eval.at_start = 0, False
    runner = FSTRunner(c, str(tmp_path))
    replies = iter(range(1000))  # the random model's reflections parse to nothing: numbered prompts instead
    runner.reflection_lm = CallableReflectionLM(lambda ps: [f"```\nSolve {next(replies)}.\n```" for _ in ps])
    runner.run()
    (cycle,) = _records(tmp_path, "gepa_cycle")
    assert cycle["candidates"] > 1 and cycle["front"] == cycle["candidates"]  # "front" would draw 2 prompts
    assert cycle["non_dominated"] == 1 and len(cycle["population"]) == 2
    assert len(set(cycle["population"])) == 1 and cycle["population_shares"][0][1] == 1


@pytest.mark.parametrize("method", ["rl", "gepa"])
def test_baselines_share_the_loop(tiny_checkpoint, tmp_path, method):
    runner = _run(tiny_config(tiny_checkpoint, method=method, total_steps=2), tmp_path / method)
    if method == "rl":
        assert runner.population == [runner.config.gepa.seed_prompt]
        assert runner.counters.gepa_rollouts == 0 and runner.counters.rl_rollouts == 16
        train = _records(tmp_path / method, "train")
        assert [r["step"] for r in train] == [1, 2]
        assert all("reward_prompt_0" in r and "reward_prompt_1" not in r for r in train)  # population of one
    else:
        assert runner.counters.rl_rollouts == 0 and runner.counters.gepa_rollouts > 0
        assert not _records(tmp_path / method, "train")
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(runner.state.params),
                     jax.device_get(runner.base_params))  # the weights stayed frozen


@pytest.mark.parametrize("change, message", [
    (dict(method="sft"), "config.method"),
    (dict(cycle__population_size=3), "must divide rollouts_per_problem"),
    (dict(schedule="math:3,hover:1"), "no entry in config.tasks"),
    (dict(model__path=""), "config.model.path is empty"),
])
def test_config_errors_name_the_field(tiny_checkpoint, change, message):
    c = tiny_config(tiny_checkpoint)
    for key, value in change.items():
        node = c
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(ValueError, match=message):
        validate(c)


def test_cli_end_to_end(tiny_checkpoint, tmp_path, jax_cache_env):
    """`launch/train.py` with a config file and command-line overrides: runs, writes metrics, the plot,
    checkpoints; a second invocation resumes instead of starting over."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tmp_path / "cli"
    cmd = [sys.executable, os.path.join(root, "launch", "train.py"),
           f"--config={os.path.join(root, 'configs', 'fst_tiny.py')}", f"--workdir={workdir}",
           f"--config.model.path={tiny_checkpoint}", "--config.total_steps=2", "--config.cycle.rl_steps=2",
           "--config.cycle.problems_per_step=2", "--config.cycle.rollouts_per_problem=4",
           "--config.cycle.population_size=2", "--config.gepa.budget_rollouts=8",
           "--config.gepa.proposals_per_iteration=2", "--config.sampling.max_new_tokens=4",
           "--config.eval.k=1", "--config.eval.num_problems=2", "--config.eval.kl_prompts=2",
           "--config.forgetting_tasks=copy", "--config.log.progress=false"]
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), **jax_cache_env)
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done: 2 steps" in first.stdout
    assert (workdir / "plot.png").stat().st_size > 1000
    _check_end_of_run_lines(first.stdout, workdir, f"done: 2 steps in {workdir}")
    assert "PyTorch was not found" not in first.stderr
    assert any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir())
    train_records = _records(workdir, "train")
    assert [r["step"] for r in train_records] == [1, 2]
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _records(workdir, "train") == train_records  # resumed at the end: nothing re-run, nothing lost
    assert second.stdout.splitlines() == [f"already finished: 2 steps in {workdir} (nothing to do); its last "
                                          "evaluation (step 2):"] + first.stdout.splitlines()[1:]
    bad = subprocess.run(cmd[:3] + ["--config.cycle.population_size=3"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "must divide rollouts_per_problem" in bad.stderr


def test_no_pytorch_advice_on_screen():
    """A fresh clone has no PyTorch: transformers' "PyTorch was not found" advice is silenced by launch/train.py
    (its real warnings and errors still show). The first probe shows the line exists, so the test can fail."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}

    def stderr(before):  # torch hidden as if not installed
        code = f"import runpy, sys; sys.modules['torch'] = None; {before}; import transformers"
        return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                              timeout=120).stderr

    assert "PyTorch was not found" in stderr("pass")
    assert "PyTorch was not found" not in stderr("runpy.run_path('launch/train.py', run_name='train')")


def _check_end_of_run_lines(stdout, workdir, head):
    """What `launch/train.py` prints at the end of a run, against the run's own records (the tiny config's
    defaults: an evaluation at step 0, forgetting measured on copy, the plot drawn)."""
    lines = stdout.splitlines()
    final = json.loads((workdir / "final_eval.json").read_text())
    assert final == _records(workdir, "eval")[-1]  # the last evaluation in full, as metrics.jsonl has it
    start = _records(workdir, "eval")[0]
    assert start["step"] == 0 and final["step"] == 2
    best = _records(workdir, "gepa_cycle")[-1]["population"][0]
    from fst_jax.tasks.synthetic import SEED_PROMPT as seed  # configs/fst_tiny.py's

    reward = [f"  learned prompt  {start['val/reward']:.3f} → {final['val/reward']:.3f}",
              f"  seed prompt     {start['val/reward_seed']:.3f} → {final['val/reward_seed']:.3f}"]
    if best == seed:
        reward = [f"  seed prompt     {start['val/reward']:.3f} → {final['val/reward']:.3f}"]
    expected = [head, "validation reward (mean@1 on rule, step 0 → 2):", *reward,
                f"steps: 2 RL steps in 1 cycle; rollouts: {final['rl_rollouts']} RL + {final['gepa_rollouts']} GEPA"
                + (f" ({final['reflection_calls']} reflections)" if final["reflection_calls"] else "")]
    assert lines[:len(expected)] == expected
    if best != seed:  # the prompt verbatim, line by line
        assert lines[len(expected)].startswith("learned prompt (the population's best")
        shown = ["  | " + line for line in best.splitlines() or [""]]
        assert lines[len(expected) + 1:len(expected) + 1 + len(shown)] == shown
    assert f"forgetting (other tasks, mean@1 under the seed prompt): copy {start['forgetting/copy']:.3f} → " \
           f"{final['forgetting/copy']:.3f}" in lines
    assert any(line.startswith("KL to the base model: ") and f"{final['kl_to_base']:.4g} under the seed prompt" in line
               for line in lines)
    assert lines[-6:] == [
        f"plot:    {workdir}/plot.png",
        f"metrics: {workdir}/metrics.jsonl (TensorBoard: tensorboard --logdir {workdir}/tensorboard)",
        f"this evaluation, every number: {workdir}/final_eval.json",
        "compare with RL alone (the same run with the prompt fixed to the seed):",
        lines[-2], f"  python launch/plot.py {workdir} {workdir}-rl --out {workdir.parent}/fst-vs-rl.png"]
    rl_command = lines[-2].split()
    assert rl_command[:2] == ["python", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "launch", "train.py")]
    assert rl_command[-2:] == ["--config.method=rl", f"--workdir={workdir}-rl"]
    assert "--config.total_steps=2" in rl_command and not any(a.startswith("--workdir=") for a in rl_command[:-1])


def test_killed_process_resumes_exactly(tmp_path, jax_cache_env):
    """SIGKILL a CLI run of the real tiny model (configs/fst_tiny.py, reduced sizes) right after its first
    cycle's checkpoint; the restarted command ends with a metrics.jsonl equal record for record to an
    uninterrupted run's: train, eval, every GEPA proposal (reflections sampled by the local reflection LM after
    the resume included) and every cycle summary."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def command(workdir):
        return [sys.executable, os.path.join(root, "launch", "train.py"),
                f"--config={os.path.join(root, 'configs', 'fst_tiny.py')}", f"--workdir={workdir}",
                "--config.total_steps=4", "--config.cycle.rl_steps=2", "--config.cycle.problems_per_step=4",
                "--config.cycle.rollouts_per_problem=4", "--config.cycle.population_size=2",
                "--config.gepa.budget_rollouts=40", "--config.gepa.proposals_per_iteration=4",
                "--config.gepa.minibatch_size=2", "--config.eval.k=1", "--config.eval.num_problems=4",
                "--config.eval.kl_prompts=0", "--config.eval.every=2", "--config.eval.at_start=false",
                "--config.forgetting_tasks=", "--config.log.progress=false", "--noplot"]

    # the session's persistent compilation cache: only the first of the three processes compiles
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), **jax_cache_env)
    straight = subprocess.run(command(tmp_path / "straight"), env=env, capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(command(killed_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not (killed_dir / "checkpoints" / "2" / "_CHECKPOINT_METADATA").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not any(r["step"] == 4 for r in _records(killed_dir, "train")), "killed too late to test a resume"
    resumed = subprocess.run(command(killed_dir), env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def comparable(workdir, kind):
        return [{k: v for k, v in r.items() if not k.startswith("time")} for r in _records(workdir, kind)]

    after_resume = [r for r in _records(tmp_path / "straight", "gepa") if r["cycle"] == 1]
    assert any(r["new_texts"] for r in after_resume), "no reflection after the resume point: nothing tested"
    for kind in ("train", "eval", "gepa", "gepa_cycle"):
        assert comparable(killed_dir, kind) == comparable(tmp_path / "straight", kind), kind
    assert [r["step"] for r in _records(killed_dir, "train")] == [1, 2, 3, 4]
