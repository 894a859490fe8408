"""The dry run (`launch/train.py --dry_run`, fst_jax/plan.py): the flagship plan fits, an impossible config exits 3
with one line, and a real run after its own plan compiles no sampler, KL or update program the plan did not."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from fst_jax.trainer import dry_run as plan

from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ("jit(_insert)", "jit(_decode)", "jit(_compact)", "jit(_empty)", "jit(_zero_accumulator)", "jit(_accumulate)", "jit(_apply_update)",
            "jit(_log_ratio)")


def _train(*args, timeout=1500):
    """A dry run of an 8B config: compiled with XLA's fusion emitters, faster at that size (conftest)."""
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(8, fusion_emitters=True))
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_qwen3_8b_plan_fits_on_8x80gb(tmp_path):
    """configs/fst_qwen3.py planned at Qwen3-8B size on 8 fake devices: the accounted programs (each call
    kind's largest insertion and whole-buffer decode, the KL program, the update) and those the cost model
    reads lowered and compiled; peak ≤ 72 GB.

    With 2 update lengths instead of the config's 10 and `plan.compile_all=False` (the engine's other slot
    counts, widths and insertion sizes listed, neither lowered nor compiled; the tiny plan below compiles every
    kind): at 8B each program is ~5 s to compile at -O0 on 2 cores and ~0.3 s to lower; the accounted ones
    bound memory, and the cost assertions hold either way."""
    result = _train("--config", "configs/fst_qwen3.py", "--dry_run", "--workdir", str(tmp_path),
                    "--config.rl.num_length_buckets=2", "--config.plan.compile_all=false")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.load(open(tmp_path / "plan.json"))
    assert report["devices"] == 8 and report["device_memory_gb"] == 80.0 and report["fits"] is True
    assert 40 < report["peak_gb"] <= 72.0
    expected = {f"{call}_{part}" for call in ("rollout", "gepa_minibatch", "gepa", "reflection", "eval", "kl_sample")
                for part in ("prefill", "decode")} | {"kl", "update", "update_apply"}
    assert set(report["programs"]) == expected
    assert all(p["compiled"] for p in report["programs"].values())
    assert len(report["not_compiled"]) > 20 and "rollout@decode_B192_C5120_W4096" in report["also_compiled"]
    # reflection's 8 prompts of 8,192 tokens prefill their attention in query chunks of 128 (sampling.
    # prefill_scores_mb = 2048): 5.6 GB of temporaries, 20.9 GB with the whole [8, 32, 8192, 8192] scores
    assert report["programs"]["reflection_prefill"]["temp_gb"] < 8
    # shapes × shardings, exact: fp32 params and two Adam moments over 8 devices, a bf16 base and sampler copy
    assert report["resident"]["train_params"] == pytest.approx(8.19 * 4 / 8, abs=0.01)
    assert report["resident"]["optimizer_state"] == pytest.approx(2 * 8.19 * 4 / 8, abs=0.02)
    assert report["resident"]["base_params"] == pytest.approx(8.19 * 2 / 8, abs=0.01)
    assert report["resident"]["sampler_weights"] == pytest.approx(8.19 * 2, abs=0.02)
    # the rollouts' slots: sampling.slots = 192 × (1024 + 4096) columns × 36 layers × 8 kv heads × 128 × (k, v)
    # × bf16, split 8 ways (and a few MB of tokens, flags and masks)
    assert report["resident"]["rollout_kv_cache"] == pytest.approx(192 * 5120 * 36 * 8 * 128 * 2 * 2 / 8 / 1e9,
                                                                   rel=1e-3)
    assert "fits: peak" in result.stdout
    _check_flagship_cost(report["cost"])
    assert "GPU-hours" in result.stdout and "NOT COSTED" not in result.stdout
    assert re.search(r"\nrollout@decode_B192_C5120_W4096:engine {2,}rollouts ", result.stdout)  # columns apart


def _check_flagship_cost(cost):
    """What configs/fst_qwen3.py costs (fst_jax/trainer/cost_model.py) on 8 H100s at 40% of peak / 70% of HBM,
    answers of mean 2048: every program has its calls per cycle; a step's 256 rollouts stream through 192 slots
    (256 × 2048 / 192 + the drain of the last 192, 4096 · 192/193 − 2048 = 4757 decode steps), each step
    memory-bound, reading the bf16 sampler weights (16.38 GB) and the KV of 24 rows over the 4096 columns a mean
    answer needs (24 × 4097 × 147,456 B = 14.50 GB) per device — not the whole 5120-column buffer; its FLOPs are
    24 rows × 2 × 8.19e9 and attention; the update's micro-batch at 5120 tokens ≈ 10 × 7.57e9 matmul params ×
    5120 (policy forward, backward ×2, remat's recompute, the base's forward) + [T, T] attention; the GPU-hours
    are 8 devices × (200 / 6 cycles × the cycle + the evaluation at the start) with evaluations every 12 steps
    and at the end (17 in 200 / 6 cycles)."""
    assert cost["device"] == "NVIDIA H100 SXM 80 GB" and cost["devices"] == 8 and cost["mean_answer_tokens"] == 2048
    assert cost["programs_without_calls"] == []
    assert set(cost["cycle_seconds"]) == {"rollouts", "gepa", "reflection", "update", "evaluations"}
    assert all(seconds > 0 for seconds in cost["cycle_seconds"].values())
    assert cost["programs"]["rollout_decode"]["calls_per_cycle"] == 0  # costed at the width a mean answer reads
    decode = cost["programs"]["rollout@decode_B192_C5120_W4096:engine"]
    assert decode["calls_per_cycle"] == 6 and decode["bound"] == "memory"
    assert decode["steps_per_call"] == pytest.approx(256 * 2048 / 192 + 4096 * 192 / 193 - 2048, abs=0.1)
    assert (16.38 + 14.50) * 1e9 < decode["step_bytes"] < 1.25 * (16.38 + 14.50) * 1e9  # 37.1 GB measured
    assert 24 * 2 * 8.19e9 < decode["step_flops"] < 1.3 * 24 * 2 * 8.19e9
    assert 10 * 7.57e9 * 5120 < cost["programs"]["update"]["flops"] < 1.25 * 10 * 7.57e9 * 5120
    evaluation = cost["cycle_seconds"]["evaluations"] / (17 / (200 / 6))
    assert cost["total_gpu_hours"] == pytest.approx(
        8 * (200 / 6 * cost["cycle_total_seconds"] + evaluation) / 3600, rel=0.01)


def test_plan_that_cannot_fit_exits_3_with_one_line(tmp_path):
    result = _train("--config", "configs/fst_qwen3.py", "--dry_run", "--workdir", str(tmp_path),
                    "--config.sampling.max_new_tokens=65536")
    assert result.returncode == plan.EXIT_DOES_NOT_FIT, result.stderr[-3000:]
    verdict = [line for line in result.stdout.splitlines() if line.startswith("does not fit")]
    assert len(verdict) == 1 and "Traceback" not in result.stderr
    assert "rollout_kv_cache" in verdict[0] and "config.sampling.slots, sampling.max_new_tokens" in verdict[0]
    assert json.load(open(tmp_path / "plan.json"))["fits"] is False
    # found from the slot state's size alone, before lowering anything (a minute at 8B)
    assert "resident buffers alone exceed the budget; nothing lowered or compiled" in result.stdout


def test_dry_run_errors_are_one_line(tmp_path):
    result = _train("--config", "configs/fst_qwen3.py", "--dry_run", "--workdir", str(tmp_path),
                    "--config.model.path=/nonexistent", "--config.model.preset=")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "config.model.preset" in result.stderr.strip().splitlines()[-1]


def test_cpu_upcast_of_bf16_arguments_is_not_counted():
    """XLA:CPU converts a bf16 weight to float32 before a matmul (a 64 MiB temporary for a [4096, 4096] weight);
    a GPU does not, so the plan subtracts exactly that copy."""
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    x = jax.ShapeDtypeStruct((4096, 8), jnp.bfloat16)
    compiled = jax.jit(lambda w, x: w @ x).lower(w, x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes >= 4096 * 4096 * 4
    assert plan.cpu_upcast_bytes(compiled.as_text()) == 4096 * 4096 * 4
    f32 = jax.jit(lambda w, x: w @ x).lower(w.update(dtype=jnp.float32), x.update(dtype=jnp.float32)).compile()
    assert plan.cpu_upcast_bytes(f32.as_text()) == 0


def test_prompt_longer_than_planned_is_an_error():
    from fst_jax.trainer.shared_sampler import SharedSampler

    shared = SharedSampler(None, {"policy": (128, "config.sampling.max_prompt_tokens")})
    with pytest.raises(ValueError, match=r"prompt of 129 tokens exceeds config.sampling.max_prompt_tokens=128"):
        shared.view("policy").generate([[1] * 129], max_new_tokens=4)
    from fst_jax.gepa.reflection import ReflectionLMError

    shared = SharedSampler(None, {"base": (64, "config.gepa.reflection.max_prompt_tokens")})
    with pytest.raises(ReflectionLMError, match="gepa.reflection.max_prompt_tokens=64"):  # GEPA rejects, goes on
        shared.view("base").generate([[1] * 65], max_new_tokens=4)


class _Compiles:
    """Counts XLA compilations of the run's sampler, KL and update programs while active."""

    def __enter__(self):
        self.names = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") in PROGRAMS:
            self.names.append(kwargs["fun_name"])

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


@pytest.mark.slow
def test_tiny_run_after_its_plan_compiles_nothing_new(tmp_path):
    """The shapes the plan compiles are the shapes the run calls: after `make_plan`, a short FST run of
    configs/fst_tiny.py (GEPA with local reflection, RL steps, mean@k and KL evaluations) compiles no sampler,
    KL or update program. GEPA's rollouts are reused for the first two steps (then too stale), so both the
    calls for the rest of a partly reused batch (one sample per prompt) and the plain rollout calls run."""
    sys.path.insert(0, ROOT)
    from configs.fst_tiny import get_config
    from fst_jax.trainer.runner import FSTRunner

    config = get_config()
    config.total_steps = 4
    config.gepa.budget_rollouts = 96  # the window (32) once for the seed, then proposals and a full evaluation
    config.eval.every = 4
    config.log.tensorboard = config.log.progress = False
    config.cycle.reuse_gepa_rollouts, config.cycle.reuse_max_staleness = True, 1
    # fewer possible programs, the same claim: 16 slots instead of the config's 128 (one row bucket, not 128, 32
    # and 8): the plan compiles 53 programs
    config.sampling.slots = 16
    with _Compiles() as planned:
        report = plan.make_plan(config, log=lambda *_: None)
    # every kind of program but compaction, which a 16-token completion never needs (engine.compacts)
    assert report.fits and set(planned.names) == set(PROGRAMS) - {"jit(_compact)"}
    assert report.cost["programs_without_calls"] == [] and report.cost["cycle_total_seconds"] > 0
    with _Compiles() as run:
        runner = FSTRunner(config, str(tmp_path))
        runner.run()
    assert runner.counters.rl_steps == 4 and runner.counters.reflection_calls > 0
    with open(tmp_path / "metrics.jsonl") as f:
        reused = [r["reused_rollouts"] for r in map(json.loads, f) if r["kind"] == "train"]
    assert all(n > 0 for n in reused[:2]) and reused[2:] == [0, 0]
    assert run.names == []


@pytest.mark.parametrize("name", ["fst_qwen3", "fst_qwen3_math", "fst_qwen3_hover", "fst_qwen3_continual",
                                  "fst_star_graph", "fst_qwen3_1gpu"])
def test_paper_configs_plan_the_model_they_name(name):
    """A config's `model.preset` (what --dry_run plans when the checkpoint is not on disk) is the size its
    checkpoint path names, and the config validates for a dry run: planning Qwen3-8B for a 4B run would
    report a fit (or a failure) for the wrong model."""
    import importlib.util
    import re

    from fst_jax.config import validate

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    size = re.search(r"Qwen3-(\d+(?:\.\d+)?B)", config.model.path)
    assert size, config.model.path
    assert config.model.preset == size.group(1)
    validate(config, require_checkpoint=False)


def test_near_the_memory_map_limit_the_plan_releases_what_it_compiled():
    """XLA:CPU maps each compiled program's code in ~1,000 regions at 8B; the plan drops the lazily lowered programs
    it has read (and jax's caches) before the process reaches the kernel's per-process limit, and a released
    program lowers again when asked."""
    from fst_jax.sampling.engine import Deferred

    maps = plan._memory_maps()
    assert maps is not None and 0 < maps[0] < maps[1]  # Linux: /proc/self/maps and vm.max_map_count
    lowerings = []

    def lower():
        lowerings.append(1)
        return jax.jit(lambda x: x * 3).lower(jnp.ones(4))

    deferred = Deferred(lower)
    deferred.get().compile()
    held, lines = [deferred, "not lazily lowered: kept"], []
    plan._release_if_near_map_limit(held, lines.append)  # far below the limit: nothing happens
    assert held and lines == [] and deferred._lowered is not None
    plan._release_if_near_map_limit(held, lines.append, fraction=0.0)
    assert held == [] and deferred._lowered is None and lines[0].startswith("plan: released 1 compiled programs")
    assert float(deferred.get().compile()(jnp.ones(4))[0]) == 3.0 and len(lowerings) == 2
