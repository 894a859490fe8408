"""`python launch/bench.py gpu`: a one-shot accelerator check, ≤ 8 minutes on one H100/H200.

1. prefill tokens/s, Qwen3-8B shape, bf16, random weights;
2. decode tokens/s at batch 64 and 256, with the fraction of the HBM roofline (weights + KV read per step ÷
   the measured device copy bandwidth);
3. the update's MFU on a Qwen3-1.7B shape at configs/fst_qwen3.py's micro-batch and sequence length;
4. one FST cycle on a Qwen3-0.6B shape (random weights, the tiny task) with the recipe's T, B, G, K and
   shorter lengths, split into GEPA / sampling / update / evaluation wall time.

`--allow-cpu` runs the same code on tiny shapes (what the tests run); the numbers then mean nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

# bf16 dense peak FLOP/s by device kind (vendor datasheets), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v5p": 459e12,
                   "TPU v5 lite": 197e12, "TPU v6 lite": 918e12}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, tie_word_embeddings=False)


def add_gpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU at tiny shapes (a smoke test)")
    p.add_argument("--prompt-len", type=int, default=1024, help="prefill and decode prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="decode steps timed per batch")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--skip", nargs="*", default=[], choices=["sampler", "update", "cycle"])


def _peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in kind.lower()), None)


def _random_params(config, jax, jnp, nnx, Qwen3):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))), nnx.Param)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    make = jax.jit(lambda k, shape, dtype: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype),
                   static_argnums=(1, 2))
    return graphdef, jax.tree.unflatten(treedef, [make(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def run_gpu(args) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fst_jax.models.config import Qwen3Config
    from fst_jax.models.qwen3 import Qwen3

    tiny = jax.default_backend() == "cpu"
    if tiny and not args.allow_cpu:
        print("bench gpu: no accelerator found (jax backend is cpu); pass --allow-cpu for a tiny-shape smoke run")
        return
    device = jax.devices()[0]
    copy = jax.jit(lambda x: x + 1)
    big = jnp.zeros((1 << (20 if tiny else 30),), jnp.bfloat16)
    copy(big).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        copy(big).block_until_ready()
    bandwidth = 2 * big.nbytes * 5 / (time.perf_counter() - start)
    del big
    print(f"device: {device.device_kind}; copy bandwidth {bandwidth / 1e9:.0f} GB/s"
          + (" (--allow-cpu: tiny shapes, numbers meaningless)" if tiny else ""))
    shape = lambda preset: (Qwen3Config(**TINY, dtype="bfloat16", param_dtype="bfloat16") if tiny  # noqa: E731
                            else Qwen3Config.preset(preset, dtype="bfloat16", param_dtype="bfloat16"))
    if "sampler" not in args.skip:
        _sampler(shape("8B"), args, bandwidth, tiny, jax, jnp, nnx, Qwen3)
    if "update" not in args.skip:
        _update(shape("1.7B"), tiny, device, jax, jnp, nnx, Qwen3)
    if "cycle" not in args.skip:
        _cycle(tiny, jax, nnx, Qwen3, Qwen3Config)


def _sampler(config, args, bandwidth, tiny, jax, jnp, nnx, Qwen3) -> None:
    from fst_jax.sampling import Sampler

    graphdef, params = _random_params(config, jax, jnp, nnx, Qwen3)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    sampler = Sampler((graphdef, params))
    del params
    P, M = (16, 8) if tiny else (args.prompt_len, args.new_tokens)
    batches = [8, 16] if tiny else args.batches
    rng = np.random.default_rng(0)
    for B in batches:
        prompts = rng.integers(0, config.vocab_size, (B, P)).tolist()
        try:
            for new in (1, M):  # compile both programs first
                sampler.generate(prompts, max_new_tokens=new)
            t0 = time.perf_counter()
            sampler.generate(prompts, max_new_tokens=1)
            prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            sampler.generate(prompts, max_new_tokens=M)  # random weights: no stop token is likely, M steps
            total_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at batch 256: report it, go on
            print(f"sampler batch {B}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        decode_s = max(total_s - prefill_s, 1e-9)
        kv_bytes = 2 * config.num_layers * B * (P + M / 2) * config.num_kv_heads * config.head_dim * 2
        roofline = B * bandwidth / (weight_bytes + kv_bytes)
        print(f"sampler batch {B}: prefill {B * P / prefill_s:,.0f} tokens/s ({P} tokens/row); decode "
              f"{B * (M - 1) / decode_s:,.0f} tokens/s = {B * (M - 1) / decode_s / roofline:.0%} of the HBM roofline "
              f"({roofline:,.0f} tokens/s: {weight_bytes / 1e9:.1f} GB weights + {kv_bytes / 1e9:.1f} GB KV per step)")
    del sampler


def _update(config, tiny, device, jax, jnp, nnx, Qwen3) -> None:
    from configs.fst_qwen3 import get_config

    from fst_jax.trainer import shapes as run_shapes
    from fst_jax.rl.rollouts import Rollouts
    from fst_jax.rl import TrainState, rl_config_from_run, update

    run = get_config()
    rows = 8 if tiny else int(run.rl.micro_batch_size)
    T = 64 if tiny else run_shapes.update_length(run)
    config = config.replace(param_dtype="float32", remat="none" if tiny else run.model.remat)
    graphdef, params = _random_params(config, jax, jnp, nnx, Qwen3)
    rl_config = rl_config_from_run(run, micro_batch_size=rows, sequence_length=None)
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    state = TrainState.create((graphdef, params), rl_config)
    del params
    rng = np.random.default_rng(0)
    loss_mask = np.zeros((rows, T), np.float32)
    loss_mask[:, T // 4:] = 1.0
    rollouts = Rollouts(input_ids=rng.integers(0, config.vocab_size, (rows, T)).astype(np.int32),
                        attention_mask=np.ones((rows, T), np.int32), loss_mask=loss_mask,
                        old_logprobs=np.full((rows, T), -2.0, np.float32) * loss_mask,
                        advantages=rng.standard_normal(rows).astype(np.float32))
    state, metrics = update(state, base, rollouts, rl_config)  # compile
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(2):
        state, metrics = update(state, base, rollouts, rl_config)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / 2
    c = config
    matmul = c.num_layers * (c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
                             + 3 * c.hidden_size * c.intermediate_size) + c.vocab_size * c.hidden_size
    attention = 2 * c.num_layers * T * c.num_heads * c.head_dim  # causal QKᵀ and PV, per token, forward
    tokens = rows * T
    # policy forward + backward (3×) and the frozen base's forward (1×); remat's recompute is not counted
    flops = tokens * 4 * (2 * matmul + attention)
    peak = _peak_flops(device)
    mfu = f"{flops / seconds / peak:.1%} MFU" if peak else "MFU: unknown peak for this device"
    print(f"update: {c.num_layers}-layer {c.hidden_size}-wide shape, {rows} rows × {T} tokens, remat {c.remat}: "
          f"{seconds:.2f} s/update, {flops / seconds / 1e12:.1f} TFLOP/s model, {mfu}")


def _cycle(tiny, jax, nnx, Qwen3, Qwen3Config) -> None:
    from configs.fst_tiny import ASSETS, get_config

    from fst_jax.trainer.runner import FSTRunner
    from fst_jax.models.hf import load_tokenizer, save_pretrained

    config = get_config()
    c = config
    c.total_steps = c.cycle.rl_steps = 2 if tiny else 6
    c.cycle.problems_per_step, c.cycle.rollouts_per_problem, c.cycle.population_size = (4, 4, 2) if tiny else (32, 8, 4)
    c.gepa.budget_rollouts = 16 if tiny else 960
    c.eval.at_start, c.eval.every, c.eval.num_problems = False, c.total_steps, 8 if tiny else 32
    c.log.tensorboard = c.log.progress = False
    c.sampling.max_rows = None
    with tempfile.TemporaryDirectory() as tmp:
        if not tiny:  # a Qwen3-0.6B shape with random weights and the tiny model's character tokenizer
            model_config = Qwen3Config.preset("0.6B", dtype="bfloat16", param_dtype="bfloat16")
            save_pretrained(Qwen3(model_config, rngs=nnx.Rngs(0)), os.path.join(tmp, "model"),
                            tokenizer=load_tokenizer(ASSETS))
            c.model.path = os.path.join(tmp, "model")
            c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
            c.sampling.max_new_tokens = c.eval.max_new_tokens = 256
            c.gepa.reflection.max_new_tokens = 128
        t0 = time.perf_counter()
        runner = FSTRunner(config, os.path.join(tmp, "run"))
        runner.run()
        total = time.perf_counter() - t0
    k = runner.counters
    print(f"FST cycle ({'tiny model' if tiny else 'Qwen3-0.6B shape'}; T={c.cycle.rl_steps}, "
          f"B={c.cycle.problems_per_step}, G={c.cycle.rollouts_per_problem}, K={c.cycle.population_size}, "
          f"{c.sampling.max_new_tokens} new tokens): {total:.0f} s with start-up and compiles; GEPA {k.time_gepa:.0f} s "
          f"({k.gepa_rollouts} rollouts, its sampling included), sampling {k.time_sampling:.0f} s (GEPA's and the "
          f"rollouts'), update {k.time_update:.0f} s, evaluation {k.time_eval:.0f} s")
