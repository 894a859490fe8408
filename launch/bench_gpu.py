"""`python launch/bench.py gpu`: a one-shot accelerator check, ≤ 8 minutes on one H100/H200.

1. prefill tokens/s, Qwen3-8B shape, bf16, random weights;
2. decode tokens/s at batch 64 and 256, with the fraction of the HBM roofline (weights + KV read per step ÷
   the measured device copy bandwidth);
3. the update as configs/fst_qwen3.py runs it per device (32 rows of 1024 + answers of up to 4096 tokens,
   length-bucketed micro-batches of 1 row per device) on Qwen3-1.7B (configs/fst_qwen3_1gpu.py), FSDP over
   every device present: seconds beside the cost model's prediction for the same programs (what calibrates
   `plan.compute_efficiency`), FLOPs computed (HLO) and model FLOPs on the real tokens as fractions of peak;
4. one FST cycle on a Qwen3-0.6B shape (random weights, the tiny task) with the recipe's T, B, G, K and
   shorter lengths, planned first (`--dry_run`'s make_plan: the run then compiles nothing) and split into
   rollouts / GEPA / update / evaluation wall time beside the plan's prediction of each.

`--allow-cpu` runs the same code on tiny shapes (what the tests run); the numbers then mean nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
    p.add_argument("--requests", type=int, default=256, help="rollout regime: requests (one RL step's B·G)")
    p.add_argument("--slots", type=int, default=256, help="rollout regime: the sampler's slots (configs/fst_qwen3.py)")
    p.add_argument("--max-new", type=int, default=4096, help="rollout regime: completion cap (the flagship's)")
    p.add_argument("--mean-length", type=int, default=1024, help="rollout regime: mean completion the stop set aims at")
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
        _cycle(tiny, device, nnx, Qwen3, Qwen3Config)


def _sampler(config, args, bandwidth, tiny, jax, jnp, nnx, Qwen3) -> None:
    from fst_jax.sampling import Sampler

    graphdef, params = _random_params(config, jax, jnp, nnx, Qwen3)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    sampler = Sampler((graphdef, params), slots=max(args.batches + [args.slots]) if not tiny else 16)
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
    _rollout_regime(sampler, config, args, tiny, rng)
    del sampler


def _rollout_regime(sampler, config, args, tiny, rng) -> None:
    """What a run's rollouts do, at the flagship's shapes: `--requests` prompts of 256–1024 tokens (16–64 tiny),
    one sample each, through `--slots` slots in a 1024 + `--max-new` column buffer (the flagship's 5,120), the
    completions ended by a stop-token set drawn so that random weights stop after ≈ `--mean-length` tokens
    (geometric lengths): useful tokens/s, the engine's row utilisation and its tail."""
    requests, slots, cap, mean = (16, 16, 48, 12) if tiny else (args.requests, args.slots, args.max_new,
                                                                 args.mean_length)
    low, high = (16, 64) if tiny else (256, 1024)
    prompts = [rng.integers(1, config.vocab_size, n).tolist() for n in rng.integers(low, high + 1, requests)]
    stops = rng.choice(np.arange(1, config.vocab_size), max(1, config.vocab_size // mean), replace=False).tolist()
    sampler.slots, sampler.stats = slots, type(sampler.stats)()
    call = lambda: sampler.generate(prompts, max_new_tokens=cap, temperature=1.0, seed=0,  # noqa: E731
                                    stop_token_ids=stops, max_prompt_tokens=high)
    try:
        call()  # compiles
        sampler.stats = type(sampler.stats)()
        t0 = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it, go on
        print(f"rollout regime: failed: {type(e).__name__}: {str(e)[:200]}")
        return
    useful, stats = sum(map(len, out.tokens)), sampler.stats
    print(f"rollout regime: {requests} requests, prompts {low}-{high} tokens, {slots} slots × "
          f"{high + cap} columns, stop set for mean ≈ {mean} (measured {useful / requests:.0f}, cap {cap}): "
          f"{useful / seconds:,.0f} useful tokens/s ({useful} tokens in {seconds:.1f} s); utilisation "
          f"{stats.utilisation:.1%}, tail {stats.tail_s:.1f} s, {stats.chunks} chunks, {stats.inserts} insertions, "
          f"{stats.compactions} compactions")


def _update(config, tiny, device, jax, jnp, nnx, Qwen3) -> None:
    """The update as the flagship runs it, per device: configs/fst_qwen3.py's B·G / 8 = 32 rows of prompt +
    answer ≤ 1024 + 4096 tokens and micro-batches of 1 row per device, on a model that fits one GPU
    (configs/fst_qwen3_1gpu.py's Qwen3-1.7B, fp32 params, its remat and attention), FSDP over every device
    present. Answer lengths are drawn (seed 0) from the cost model's distribution (uniform on [mean − w,
    mean + w], `cost_model.answer_range`, mean `plan.mean_answer_tokens`): random weights would not stop.
    Printed beside the cost model's prediction for the same compiled programs and micro-batches, so a lent
    accelerator calibrates `plan.compute_efficiency`."""
    from configs.fst_qwen3 import get_config as flagship
    from configs.fst_qwen3_1gpu import get_config as one_gpu

    from fst_jax.rl import TrainState, lower_update, rl_config_from_run, update
    from fst_jax.rl.rollouts import Rollouts, micro_batches
    from fst_jax.runtime import parallel
    from fst_jax.trainer import cost_model, shapes

    flag, run = flagship(), one_gpu()
    flag_devices = int(flag.mesh.data) * int(flag.mesh.fsdp) * int(flag.mesh.tensor)
    devices = len(jax.devices())
    per_device = int(flag.cycle.problems_per_step) * int(flag.cycle.rollouts_per_problem) // flag_devices
    micro_per_device = int(flag.rl.micro_batch_size) // flag_devices
    if tiny:  # the same code at tiny shapes: 4 rows of ≤ 16 + 48 tokens, micro-batches of 2
        run.sampling.max_prompt_tokens, run.sampling.max_new_tokens, per_device, micro_per_device = 16, 48, 4, 2
    else:
        config = config.replace(remat=run.model.remat, attention=run.model.get("attention", "xla"))
    config = config.replace(param_dtype="float32", remat="none" if tiny else config.remat)
    run.mesh.data, run.mesh.fsdp, run.mesh.tensor = 1, devices, 1
    run.rl.micro_batch_size = micro_per_device * devices
    rows, prompt, cap = per_device * devices, int(run.sampling.max_prompt_tokens), int(run.sampling.max_new_tokens)
    mesh = parallel.make_mesh(shapes.mesh_config(run))
    graphdef, params = _random_params(config, jax, jnp, nnx, Qwen3)
    params = jax.device_put(params, parallel.param_shardings(params, mesh, parallel.TRAIN_RULES))
    rl_config = rl_config_from_run(run, sequence_length=shapes.update_length(run))
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    state = TrainState.create((graphdef, params), rl_config)
    del params

    rng = np.random.default_rng(0)
    lo, hi = cost_model.answer_range(cap, cost_model.mean_answer_tokens(run))
    lengths = prompt + np.clip(np.rint(rng.uniform(lo, hi, rows)), 1, cap).astype(int)
    T = shapes.update_length(run)
    positions = np.arange(T)[None, :]
    loss_mask = ((positions >= prompt) & (positions < lengths[:, None])).astype(np.float32)
    rollouts = Rollouts(input_ids=rng.integers(0, config.vocab_size, (rows, T)).astype(np.int32),
                        attention_mask=(positions < lengths[:, None]).astype(np.int32), loss_mask=loss_mask,
                        old_logprobs=np.float32(-2.0) * loss_mask,
                        advantages=rng.standard_normal(rows).astype(np.float32))

    # The prediction: the programs this update runs, compiled here (which fills the caches `update` hits),
    # costed by the plan's model, times the micro-batches this batch makes at each length.
    t0 = time.perf_counter()
    planned = shapes.update_lengths(run)
    used: dict[int, int] = {}
    for group in micro_batches(rollouts, int(run.rl.micro_batch_size), planned):
        used[group.input_ids.shape[1]] = used.get(group.input_ids.shape[1], 0) + 1
    lowered = lower_update(state, base, rl_config, rows=int(run.rl.micro_batch_size), lengths=sorted(used))
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(lowered)) as pool:  # XLA compiles in parallel
        compiled = dict(zip(lowered, pool.map(lambda program: program.compile(), lowered.values())))
    costs = {name: cost_model.program_cost(program) for name, program in compiled.items()}
    compile_s = time.perf_counter() - t0
    calls = {name: used[int(name.split("@")[1])] if "@" in name else 1 for name in costs}
    kind = cost_model.device_named(getattr(device, "device_kind", "")) or run.plan.device
    target = cost_model.DEVICES[kind]
    eff = (target, float(run.plan.compute_efficiency), float(run.plan.bandwidth_efficiency))
    predicted = sum(calls[n] * cost_model.roofline_seconds(c.flops, c.bytes, *eff) for n, c in costs.items())
    computed = sum(calls[n] * c.flops for n, c in costs.items())  # per device: remat, padding, attention as run

    state, metrics = update(state, base, rollouts, rl_config)  # warm: every program already compiled
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(2):
        state, metrics = update(state, base, rollouts, rl_config)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / 2
    c = config
    matmul = c.num_layers * (c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
                             + 3 * c.hidden_size * c.intermediate_size) + c.vocab_size * c.hidden_size
    # model FLOPs on the real tokens: policy forward + backward (3×) and the base's forward (1×), causal
    # attention over each row's own length (QKᵀ and PV); remat's recompute and padding not counted
    useful = 4 * sum(2 * matmul * n + 2 * n * n * c.num_heads * c.head_dim * c.num_layers for n in lengths) / devices
    peak = _peak_flops(device) or target.peak_flops
    print(f"update: {c.num_layers}-layer {c.hidden_size}-wide shape, fp32 params, remat {c.remat}, attention "
          f"{c.attention}; {rows} rows ({per_device}/device) of {prompt} + answers uniform on [{lo:g}, {hi:g}] "
          f"(mean {float(np.mean(lengths - prompt)):.0f}), micro-batches of {micro_per_device}/device, FSDP over "
          f"{devices} device(s); micro-batches per length {dict(sorted(used.items()))}, padding ratio "
          f"{float(metrics['update_padding_ratio']):.2f}; compiled in {compile_s:.0f} s")
    print(f"update: {seconds:.2f} s/update measured vs {predicted:.2f} s predicted (cost model: {target.name} at "
          f"{eff[1]:.0%} of peak, {eff[2]:.0%} of HBM) = {seconds / max(predicted, 1e-12):.2f}x; computed "
          f"{computed / 1e12:.1f} TFLOP/device (HLO: remat, padding and attention as run) = "
          f"{computed / seconds / peak:.1%} of peak (calibrates plan.compute_efficiency); model FLOPs on real "
          f"tokens {useful / seconds / peak:.1%} MFU")
    uncounted = sorted({target for c in costs.values() for target in c.uncounted})
    if uncounted:  # e.g. cuDNN's fused attention: its FLOPs are in neither the prediction nor "computed"
        print(f"update: custom calls whose FLOPs the cost model does not count: {', '.join(uncounted)}")


def _cycle(tiny, device, nnx, Qwen3, Qwen3Config) -> None:
    """One FST cycle with the recipe's T, B, G, K (tiny shapes on the CPU), planned first: the plan compiles
    every program the run calls (so the run compiles nothing) and predicts each phase, printed beside the
    run's measured phases."""
    from configs.fst_tiny import ASSETS, get_config

    from fst_jax.trainer import cost_model
    from fst_jax.trainer.dry_run import make_plan
    from fst_jax.trainer.runner import FSTRunner
    from fst_jax.models.hf import load_tokenizer, save_pretrained

    config = get_config()
    c = config
    c.total_steps = c.cycle.rl_steps = 2 if tiny else 6
    c.cycle.problems_per_step, c.cycle.rollouts_per_problem, c.cycle.population_size = (4, 4, 2) if tiny else (32, 8, 4)
    c.gepa.budget_rollouts = 16 if tiny else 960
    c.eval.at_start, c.eval.every, c.eval.num_problems = False, c.total_steps, 8 if tiny else 32
    c.log.tensorboard = c.log.progress = False
    c.sampling.slots = None
    with tempfile.TemporaryDirectory() as tmp:
        if not tiny:  # a Qwen3-0.6B shape with random weights and the tiny model's character tokenizer
            model_config = Qwen3Config.preset("0.6B", dtype="bfloat16", param_dtype="bfloat16")
            save_pretrained(Qwen3(model_config, rngs=nnx.Rngs(0)), os.path.join(tmp, "model"),
                            tokenizer=load_tokenizer(ASSETS))
            c.model.path = os.path.join(tmp, "model")
            c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
            c.sampling.max_new_tokens = c.eval.max_new_tokens = 256
            c.gepa.reflection.max_new_tokens = 128
            c.plan.mean_answer_tokens = c.sampling.max_new_tokens  # random weights: rows run to the cap
        else:  # on the CPU a smoke run: two update lengths, and the plan compiles only what memory and cost
            c.rl.num_length_buckets = 2  # read (the run compiles the rest, inside its phase times)
            c.plan.compile_all = False
        c.plan.device = cost_model.device_named(getattr(device, "device_kind", "")) or c.plan.device
        t0 = time.perf_counter()
        plan = make_plan(config, log=lambda *_: None)
        plan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner = FSTRunner(config, os.path.join(tmp, "run"))
        runner.run()
        total = time.perf_counter() - t0
    k = runner.counters
    if plan.cost:
        p = plan.cost["cycle_seconds"]
        print(f"FST cycle predicted (plan in {plan_s:.0f} s; cost model on {plan.cost['device']}, answers "
              f"{plan.cost['answer_lengths'].split(';')[0]}): rollouts {p['rollouts']:.3g} s, GEPA "
              f"{p['gepa'] + p['reflection']:.3g} s (reflection {p['reflection']:.3g}), update {p['update']:.3g} s, "
              f"evaluation {p['evaluations']:.3g} s; measured: rollouts {k.time_rl_sampling:.3g} s, GEPA "
              f"{k.time_gepa:.3g} s, update {k.time_update:.3g} s, evaluation {k.time_eval:.3g} s")
    print(f"FST cycle ({'tiny model' if tiny else 'Qwen3-0.6B shape'}; T={c.cycle.rl_steps}, "
          f"B={c.cycle.problems_per_step}, G={c.cycle.rollouts_per_problem}, K={c.cycle.population_size}, "
          f"{c.sampling.max_new_tokens} new tokens): {total:.0f} s with start-up and compiles; GEPA {k.time_gepa:.0f} s "
          f"({k.gepa_rollouts} rollouts, its sampling included), sampling {k.time_sampling:.0f} s (GEPA's and the "
          f"rollouts'), update {k.time_update:.0f} s, evaluation {k.time_eval:.0f} s")
