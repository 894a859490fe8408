"""Lowered for the accelerators it targets, on this CPU: every program the flagship plan compiles (sampler
prefill and decode of every call kind, the KL evaluation, the update's gradient program at every planned
length, its zeroing and its optimizer step) lowers for cuda and for tpu, at reduced sizes with the flagship's
config structure (bf16 compute, fp32 master weights, remat, FSDP over 8 devices, micro-batches, chunked
log-probs, local reflection). A CPU-only construct would fail here, not on the first rented GPU. (cuDNN's
attention cannot be traced without a GPU: programs lowered here carry the einsums; which kernel each backend
selects is tests/test_attention_kernels.py.)"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from fst_jax.trainer import dry_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_QWEN3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 256, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
               "max_position_embeddings": 1024}


@pytest.fixture(scope="module")
def flagship_small(tmp_path_factory):
    """configs/fst_qwen3.py with a 2-layer Qwen3 and short sequences; everything else as the flagship has it."""
    sys.path.insert(0, ROOT)
    from configs.fst_qwen3 import get_config

    path = tmp_path_factory.mktemp("small_qwen3")
    (path / "config.json").write_text(json.dumps(SMALL_QWEN3))
    c = get_config()
    c.model.path = str(path)
    c.sampling.max_prompt_tokens, c.sampling.max_new_tokens, c.sampling.slots = 64, 32, 16
    c.eval.max_new_tokens, c.eval.kl_max_new_tokens, c.eval.kl_prompts = 32, 32, 8
    c.gepa.reflection.max_prompt_tokens, c.gepa.reflection.max_new_tokens = 128, 16
    c.cycle.problems_per_step = 4
    c.rl.logprob_chunk_size, c.rl.num_length_buckets = 32, 3
    return c


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_every_planned_program_lowers_for_the_accelerators(flagship_small, platform):
    plan = dry_run.make_plan(flagship_small, log=lambda *_: None, platform=platform)
    assert not any(p.compiled for p in plan.programs.values())  # lowered only: nothing compiled for a CPU
    calls = ("rollout", "gepa_minibatch", "gepa", "reflection", "eval", "kl_sample")
    expected = {f"{call}_{part}" for call in calls for part in ("prefill", "decode")} | {
        "kl", "update", "update_apply", "update@32:gradients", "update@64:gradients", "update_zero:zero"}
    # the update's lengths: 3 evenly spaced up to bucket(64) + 32 = 96; "update" is the longest. Beside the
    # accounted programs, every other engine program (slot counts, widths, insertion sizes) lowers too
    assert expected <= set(plan.lowered) and all(n.endswith(":engine") for n in set(plan.lowered) - expected)
    engine = {n.split("@")[1].split("_")[0] for n in set(plan.lowered) - expected}
    assert engine == {"decode", "insert", "empty", "compact"}, sorted(plan.lowered)
    for name, lowered in plan.lowered.items():
        assert "func.func public @main" in lowered.as_text(), name


def test_a_cpu_only_construct_fails_to_lower_for_cuda():
    """The check has teeth: code with a CPU-only branch lowers for cpu and is refused for cuda."""
    f = jax.jit(lambda x: jax.lax.platform_dependent(x, cpu=lambda x: x + 1.0))
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    f.trace(x).lower(lowering_platforms=("cpu",))
    with pytest.raises(Exception, match="cuda"):
        f.trace(x).lower(lowering_platforms=("cuda",))
