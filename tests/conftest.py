"""Shared test setup: 8 fake CPU devices (set before jax is imported) and small random HF Qwen3 checkpoints."""

import os

# XLA:CPU compiles with LLVM at -O0 in the tests: compiling is most of the suite's CPU time, and -O0 compiles a
# tiny CLI run in 2/3 of the CPU time (18.6 s vs 27 s cold, measured) while the tiny shapes run as fast (8.8 s
# vs 8.3 s warm). Its older elemental emitters instead of the fusion emitters take another quarter off a tiny run
# cold (17.1 s → 12.4 s; the tiny plan of 53 programs 48.8 s → 27.6 s), but not at 8B, where they are slower
# (93 s → 115 s to plan): `xla_flags(fusion_emitters=True)` keeps them. Numerics move by float32 rounding only:
# every comparison in the suite is between runs of the same flags or to a tolerance. Subprocesses get the same
# through `xla_flags`.
FAST_COMPILE = "--xla_backend_optimization_level=0"
ELEMENTAL = "--xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 "
                           f"{FAST_COMPILE} {ELEMENTAL}").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Three shapes that between them exercise every Qwen3Config field with a non-default value.
PARITY_CONFIGS = {
    "tied": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=512),
    "untied": dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=8, rope_theta=1_000_000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=256),
    "odd_head_dim": dict(vocab_size=136, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=10_000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=300),
}


def make_random_hf_checkpoint(path, seed: int = 0, with_tokenizer: bool = True, **config):
    """Save a random-weight transformers Qwen3ForCausalLM (fp32) and a char tokenizer under `path`."""
    import torch
    import transformers

    from fst_jax.models.char_tokenizer import make_char_tokenizer

    torch.manual_seed(seed)
    hf_config = transformers.Qwen3Config(initializer_range=0.1, **config)
    model = transformers.Qwen3ForCausalLM(hf_config).eval()
    model.save_pretrained(path)
    if with_tokenizer:
        make_char_tokenizer().save_pretrained(path)
    return model


def xla_flags(devices: int | None = None, fusion_emitters: bool = False) -> str:
    """XLA_FLAGS for a subprocess that needs its own fake CPU device count (None: jax's default of one, and
    no flag), with the suite's fast compile (`fusion_emitters`: XLA's default emitters, faster at 8B)."""
    count = f"--xla_force_host_platform_device_count={devices} " if devices is not None else ""
    return count + FAST_COMPILE + ("" if fusion_emitters else f" {ELEMENTAL}")


# One tiny `launch/train.py --config configs/fst_tiny.py` run for the modules that need any short run (with
# xla_flags(1): one device): two cycles of one RL step each; B=2, G=4, K=2; an 8-rollout GEPA budget; one
# evaluation, at the end, on 2 problems. The same flags in every module compile the same programs, which the
# session's persistent compilation cache (`jax_cache_env`) then compiles once for all of them.
TINY_RUN = ("--config.total_steps=2", "--config.cycle.rl_steps=1", "--config.cycle.problems_per_step=2",
            "--config.cycle.rollouts_per_problem=4", "--config.cycle.population_size=2",
            "--config.gepa.budget_rollouts=8", "--config.eval.at_start=False", "--config.eval.every=0",
            "--config.eval.num_problems=2", "--config.eval.k=1", "--config.eval.kl_prompts=1",
            "--config.log.progress=False", "--noplot")


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name → (directory, torch model) for each parity config."""
    import torch

    torch.set_num_threads(2)
    out = {}
    for i, (name, cfg) in enumerate(PARITY_CONFIGS.items()):
        path = tmp_path_factory.mktemp(f"qwen3_{name}")
        out[name] = (str(path), make_random_hf_checkpoint(path, seed=i, **cfg))
    return out


@pytest.fixture(scope="session")
def jax_cache_env(tmp_path_factory) -> dict[str, str]:
    """Environment variables that give a `launch/` subprocess the test session's persistent compilation cache,
    one directory shared by every test module and every xdist worker of this pytest run (pytest's base temp
    of the run; its old ones are cleaned by pytest). Compilation is about 70% of a tiny CLI run (58 s cold vs
    18 s warm, measured), and runs of the same shapes in different modules compile once. Only for
    subprocesses: tests that count compilations in-process (test_plan, test_sampler_plan) never see it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # popen-gwN/.. is the run's directory, shared by the workers
    path = root / "jax_cache"
    path.mkdir(exist_ok=True)
    return {"JAX_COMPILATION_CACHE_DIR": str(path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


# The slowest modules first (pytest --durations=0, summed per file): `-n 2 --dist loadfile` hands whole files to
# the workers in collection order, so the long ones start at once and the short ones fill in the end, and the
# two workers finish together. Order only; a module missing here runs after these, alphabetically.
SLOW_FIRST = ("test_plan.py", "test_multihost.py", "test_readme.py", "test_train_system.py", "test_workdir.py",
              "test_wandb.py", "test_rl_step.py", "test_update_buckets.py", "test_reuse.py", "test_engine.py",
              "test_reliability.py", "test_sampling.py", "test_reflection_endpoint_run.py", "test_bench_gpu.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order
