"""The cost model (fst_jax/trainer/cost_model.py, hlo_cost.py): FLOPs and bytes read from compiled HLO with loops
counted, decode steps of the current sampler, calls per cycle from the recipe, and the roofline, against
hand-computed numbers."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from fst_jax.config import validate
from fst_jax.trainer import cost_model
from fst_jax.trainer.hlo_cost import HloCost, hlo_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, X = (512, 512), (8, 512)
MATMUL = 2 * 8 * 512 * 512  # FLOPs of one [8, 512] × [512, 512] product


def _compiled(fn, dtype):
    return jax.jit(fn).lower(jax.ShapeDtypeStruct(W, dtype), jax.ShapeDtypeStruct(X, dtype)).compile()


def test_loop_free_float32_program_matches_xla_cost_analysis():
    """Without loops or bf16, the walk is XLA's own count: the matmul, then ×2 and +1 on its 4096 outputs;
    bytes: the weight, x and the output read/written (f32)."""
    compiled = _compiled(lambda w, x: (x @ w) * 2 + 1, jnp.float32)
    cost = hlo_cost(compiled.as_text())
    xla = compiled.cost_analysis()
    assert cost.flops == xla["flops"] == MATMUL + 2 * 8 * 512
    assert cost.bytes == xla["bytes accessed"]
    assert cost.step_flops == cost.step_bytes == 0


def test_scan_counts_its_body_trip_count_times():
    """XLA's cost_analysis counts a loop body once; a scan of 10 matmuls is 10 matmuls (+ 10 counter adds)."""
    compiled = _compiled(lambda w, x: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=10)[0], jnp.float32)
    assert hlo_cost(compiled.as_text()).flops == 10 * MATMUL + 10
    assert compiled.cost_analysis()["flops"] < 1.01 * MATMUL


def test_data_dependent_loop_is_one_step_and_bf16_weights_read_at_two_bytes():
    """A while loop whose trip count depends on data (the decode loop) is returned as one step. XLA:CPU
    multiplies bf16 in float32 from a copy of the weight made before the loop; the step reads the bf16
    weight (2 bytes an element), as an accelerator would, and the convert costs nothing."""
    def loop(w, x):
        return jax.lax.while_loop(lambda c: c[1][0, 0] < 1e9, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

    f32, bf16 = (hlo_cost(_compiled(loop, d).as_text()) for d in (jnp.float32, jnp.bfloat16))
    assert f32.step_flops == bf16.step_flops == MATMUL and f32.flops == bf16.flops == 0
    assert 512 * 512 * 4 < f32.step_bytes < 1.1 * 512 * 512 * 4
    assert 512 * 512 * 2 < bf16.step_bytes < 1.1 * 512 * 512 * 2
    assert bf16.total(steps=100) == (100 * MATMUL, bf16.bytes + 100 * bf16.step_bytes)


def test_scatter_into_a_donated_buffer_moves_only_its_rows():
    """The engine writes each row's new KV at its own column with a scatter into the donated cache: XLA updates
    the buffer in place, so the bytes are the 4 updated rows (and indices), not the 4 MB buffer."""
    def write(buf, rows, idx):
        return buf.at[idx].set(rows, mode="drop")

    # with XLA's default (fusion) emitters, as runs compile; the suite's elemental ones copy the buffer (conftest)
    compiled = jax.jit(write, donate_argnums=0).lower(
        jax.ShapeDtypeStruct((1024, 1024), jnp.float32), jax.ShapeDtypeStruct((4, 1024), jnp.float32),
        jax.ShapeDtypeStruct((4,), jnp.int32)).compile(compiler_options={"xla_cpu_use_fusion_emitters": True})
    cost = hlo_cost(compiled.as_text())
    assert 2 * 4 * 1024 * 4 <= cost.bytes < 0.05 * 1024 * 1024 * 4


GPU_MODULE = """HloModule jit_f

ENTRY %main.4 (Arg_0.1: bf16[8,512], Arg_1.2: bf16[512,256]) -> bf16[8,256] {
  %Arg_0.1 = bf16[8,512]{1,0} parameter(0)
  %Arg_1.2 = bf16[512,256]{1,0} parameter(1)
  %custom-call.1 = (bf16[8,256]{1,0}, s8[4194304]{0}) custom-call(%Arg_0.1, %Arg_1.2), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %custom-call.2 = (bf16[8,256]{1,0}, u8[0]{0}) custom-call(%Arg_0.1, %Arg_1.2), custom_call_target="__cudnn$fmhaSoftmax"
  ROOT %get-tuple-element.3 = bf16[8,256]{1,0} get-tuple-element(%custom-call.1), index=0
}
"""


def test_gpu_gemm_custom_call_is_counted_and_unknown_kernels_are_named():
    """A GPU module's cuBLAS gemm states its contraction in its backend config: 2 × 8 × 256 × 512 FLOPs; its
    scratch workspace is not traffic. A kernel whose FLOPs are unknown (cuDNN attention) is named, not guessed."""
    cost = hlo_cost(GPU_MODULE)
    assert cost.flops == 2 * 8 * 256 * 512 and cost.uncounted == ("__cudnn$fmhaSoftmax",)
    assert cost.bytes == 2 * (8 * 512 * 2 + 512 * 256 * 2 + 8 * 256 * 2)  # both calls read x, w; write [8, 256]


def test_decode_steps_of_the_engine():
    """Lengths uniform on [mean − w, mean + w], w = min(mean, cap − mean). Rows that all fit the slots run until
    the longest stops: E[max of n] = mean − w + 2w·n/(n + 1); more rows stream through the slots: rows × mean
    / slots steps, then the last slot-full drains (its longest less the mean)."""
    assert cost_model.decode_steps(64, 4096, 2048) == pytest.approx(4096 * 64 / 65)
    assert cost_model.decode_steps(64, 4096, 1000) == pytest.approx(2000 * 64 / 65)
    assert cost_model.decode_steps(64, 4096, 3596) == pytest.approx(3096 + 1000 * 64 / 65)
    assert cost_model.decode_steps(1, 4096, 1000) == pytest.approx(1000)
    assert cost_model.decode_steps(64, 4096, 1000, slots=256) == pytest.approx(2000 * 64 / 65)
    assert cost_model.decode_steps(2000, 4096, 1000, slots=256) == pytest.approx(
        2000 * 1000 / 256 + 2000 * 256 / 257 - 1000)


def _flagship():
    """configs/fst_qwen3.py at 192 steps (32 cycles, an evaluation every 2nd, none extra at the end), 8
    planned update lengths and 256 sampler slots."""
    sys.path.insert(0, ROOT)
    from configs.fst_qwen3 import get_config

    config = get_config()
    config.total_steps = 192
    config.rl.num_length_buckets = 8  # the update's planned lengths: 640, 1280, …, 5120
    config.sampling.slots = 256  # one step's rollouts all in flight
    return config


def _costs(config, decode_step_s=1.0, update_s=1.0):
    """A cost per program the flagship plan compiles: each decode step `decode_step_s` of HBM traffic on an
    H100 at 70%, each update `update_s` of compute at 40%; prefills and KL free."""
    h100 = cost_model.DEVICES["H100"]
    names = [f"{k}_{p}" for k in ("rollout", "gepa_minibatch", "gepa", "reflection", "eval", "kl_sample")
             for p in ("prefill", "decode")] + ["kl", "update", "update_apply", "update_zero:zero"]
    names += [f"update@{n}:gradients" for n in (640, 1280, 1920, 2560, 3200, 3840, 4480)]
    names += ["rollout@insert_B64_C5120_I16_P512_n2:engine", "kl@512:kl"]  # other engine programs, buckets
    step = HloCost(step_bytes=decode_step_s * h100.hbm_bytes_per_s * 0.7)
    return {n: step if n.endswith("_decode") else HloCost(flops=update_s * h100.peak_flops * 0.4)
            if n.startswith("update@") or n == "update" else HloCost() for n in names}


def test_calls_per_cycle_follow_the_recipe():
    """T=6, B=32, G=8, K=4, 256 slots (a quarter: 64): one rollout call of 256 rows a step; GEPA: the seeds'
    pass over the 192-problem window (one call), then (960 − 192) / (2 × 8 proposals × 3) = 16 iterations of
    two minibatch calls and one reflection; mean@4 on 500 problems every 12 steps = every 2nd cycle, its 2000
    rows streamed through the 256 slots. The update: 256 rows sorted longest first in 32 micro-batches of 8, the
    j-th at the smallest planned length (640, 1280, …, 5120) holding 1024 + 4096·(256 − 8j)/257 tokens: j = 0…4
    at 5120 (j = 4: 4594 > 4480; j = 5: 4467), 5 at each length down to 1920, j = 30, 31 at 1280 (1279, 1151);
    one zeroing and one optimizer step a step."""
    config = _flagship()
    uses, unknown = cost_model.program_uses(config, _costs(config))
    calls = {u.name: u.calls for u in uses}
    assert unknown == []
    assert calls["rollout_decode"] == calls["rollout_prefill"] == 6 and calls["gepa_decode"] == 1
    assert calls["gepa_minibatch_decode"] == 32 and calls["reflection_decode"] == 16
    assert calls["eval_decode"] == 0.5 and calls["eval_prefill"] == 0.5 * 8  # 2000 rows: 8 slot-fulls inserted
    assert calls["update"] == 6 * 5 and calls["update@1280:gradients"] == 6 * 2 and calls["update@640:gradients"] == 0
    assert sum(v for k, v in calls.items() if k.startswith("update@") or k == "update") == 6 * 32
    assert calls["update_apply"] == calls["update_zero:zero"] == 6
    assert calls["kl"] == calls["kl_sample_decode"] == 0.5
    steps = {u.name: u.steps for u in uses}
    assert steps["rollout_decode"] == pytest.approx(4096 * 256 / 257)         # 256 rows, all in flight
    assert steps["gepa_minibatch_decode"] == pytest.approx(4096 * 24 / 25)   # 8 proposals × 3 problems
    assert steps["reflection_decode"] == pytest.approx(1024 * 8 / 9)        # half its 1024-token cap, 8 rows
    assert steps["eval_decode"] == pytest.approx(2000 * 2048 / 256 + 4096 * 256 / 257 - 2048)
    assert cost_model.program_uses(config, {"update@1000": HloCost(), "sampler_x": HloCost()})[1] == [
        "update@1000", "sampler_x"]  # not a planned length, not a known program: reported, not costed
    typical = cost_model.sampler_work(config)["rollout"]["typical"]
    assert typical == "rollout@decode_B256_C5120_W4096:engine"  # 1024 + a mean answer of 2048 (+ a chunk)
    costs = dict(_costs(config), **{typical: HloCost(step_bytes=1.0)})
    uses = {u.name: u for u in cost_model.program_uses(config, costs)[0]}
    assert uses[typical].calls == 6 and uses["rollout_decode"].calls == 0  # the width a mean answer reads


def test_cycle_seconds_and_gpu_hours_on_a_named_device():
    """Phases add calls × roofline seconds; GPU-hours = 8 devices × (32 cycles × cycle + the evaluation at the
    start) / 3600. On an H200 the memory-bound decode runs 4.8 / 3.35 times faster, the update not."""
    config = _flagship()
    config.plan.mean_answer_tokens = 1000
    cost = cost_model.cycle_cost(config, cost_model.program_uses(config, _costs(config))[0], devices=8)
    steps = lambda rows, cap=4096, mean=1000: cost_model.decode_steps(rows, cap, mean, 256)  # noqa: E731
    rollouts, update = 6 * steps(256), 6.0 * 32  # each of the 32 micro-batches of a step costs 1 s
    gepa = 1 * steps(192) + 32 * steps(24)
    reflection = 16 * steps(8, 1024, 250)
    evaluations = 0.5 * steps(2000) + 0.5 * 512  # KL samples: answers of mean 1000 cut at their 512-token cap
    assert cost["cycle_seconds"] == pytest.approx({"rollouts": rollouts, "gepa": gepa, "reflection": reflection,
                                                   "update": update, "evaluations": evaluations}, rel=1e-5)
    cycle = rollouts + gepa + reflection + update + evaluations
    assert cost["step_seconds"] == pytest.approx(cycle / 6, rel=1e-5)
    assert cost["total_gpu_hours"] == pytest.approx(8 * (32 * cycle + 2 * evaluations) / 3600, rel=1e-5)
    assert cost["mean_answer_tokens"] == 1000 and cost["programs"]["update"]["bound"] == "compute"
    table = cost_model.cost_table(cost)
    assert f"192 steps: {cost['total_gpu_hours']:.4g} GPU-hours" in table and "NOT COSTED" not in table
    assert "answers uniform on [0, 2000] tokens; a sampler call streams its rows" in table
    header = next(line for line in table.splitlines() if line.startswith("program"))
    rows = [line for line in table.splitlines() if line.split() and line.split()[0] in cost["programs"]]
    assert len(rows) == len(cost["programs"])  # each program's phase under the header's, however long its name
    assert all(line[header.index("phase"):].split()[0] == cost["programs"][line.split()[0]]["phase"] for line in rows)
    config.plan.device = "H200"
    h200 = cost_model.cycle_cost(config, cost_model.program_uses(config, _costs(config))[0], devices=8)
    assert h200["cycle_seconds"]["rollouts"] == pytest.approx(rollouts * 3.35 / 4.8, rel=1e-5)
    assert h200["cycle_seconds"]["update"] == pytest.approx(update)


def test_plan_fields_are_validated():
    config = _flagship()
    config.plan.device = "A100"
    with pytest.raises(ValueError, match=r"config.plan.device must be one of H100, H200, TPU v5p"):
        validate(config, require_checkpoint=False)
    config = _flagship()
    config.plan.mean_answer_tokens = 5000
    with pytest.raises(ValueError, match=r"config.plan.mean_answer_tokens=5000 exceeds config.sampling.max_new_tokens"):
        validate(config, require_checkpoint=False)
    config = _flagship()
    config.plan.compute_efficiency = 1.5
    with pytest.raises(ValueError, match=r"config.plan.compute_efficiency must be a number > 0 and ≤ 1"):
        validate(config, require_checkpoint=False)
