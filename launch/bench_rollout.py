"""`python launch/bench.py rollout`: the rollout regime on the CPU, every engine on the same random weights.

256 requests, prompts of 32–96 tokens, temperature 1, no top-k/top-p, a random-weight Qwen3 (hidden 256,
4 layers, vocab 32k) whose stop-token set (vocab / mean-length ids: the next-token distribution of random
weights is near uniform) gives geometric completion lengths of mean ≈ 64, capped at 512. Prints useful
tokens/s (generated tokens / wall time) of our request engine at several slot counts (the run's token draw,
"gumbel", and the CPU-cheap "inverse_cdf"), `Sampler.generate` in 64-row calls (how a run called the sampler
before the engine served whole requests), transformers' continuous batching (`generate_batch`) and
transformers' `generate`; the engine's row utilisation and tail; and decode step time against buffer size.
(The static sampler the engine replaced measured 310.6 useful tokens/s here in 64-row calls: docs/performance.md.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

ROLLOUT_SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)


def add_rollout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=96)
    p.add_argument("--max-new", type=int, default=512)
    p.add_argument("--mean-length", type=int, default=64, help="mean completion length the stop set aims at")
    p.add_argument("--slots", type=int, nargs="+", default=[64, 128, 256], help="engine slot counts to run")
    p.add_argument("--chunk-steps", type=int, default=32)
    p.add_argument("--static-rows", type=int, default=64, help="rows per call of the split-calls line")
    p.add_argument("--skip", nargs="*", default=[], choices=["static", "hf_cb", "hf_generate", "buffer"])
    p.add_argument("--buffer-rows", type=int, default=64, help="rows in the decode-step vs buffer-size check")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs of transformers' CB and of each engine (the best is reported: this shared "
                        "machine's speed moves by 15%% between minutes)")


def _torch_model(shape):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape)).eval()


def _hf_runs(args, hf_model, prompts, stops, skip) -> dict:
    """transformers' continuous batching and static generate: {name: (seconds, useful tokens)}."""
    import torch
    import transformers

    config = transformers.GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                           max_new_tokens=args.max_new, eos_token_id=list(map(int, stops)),
                                           pad_token_id=0, bos_token_id=None)
    # Sized for the work (one 256-token page per request, 2048 tokens a step) rather than from free memory: left
    # to size itself it took 13 GB of this shared machine's 24, mostly attention masks.
    cb_config = transformers.ContinuousBatchingConfig(num_blocks=len(prompts), max_batch_tokens=2048)
    out = {}
    if "hf_cb" not in skip:
        with torch.inference_mode():
            hf_model.generate_batch(prompts[:4], generation_config=config, continuous_batching_config=cb_config)
            best = None
            for _ in range(args.repeats):
                start = time.perf_counter()
                res = hf_model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config)
                seconds = time.perf_counter() - start
                if best is None or seconds < best[0]:
                    best = (seconds, sum(len(r.generated_tokens) for r in res.values()))
            out["transformers generate_batch (CB)"] = best
    if "hf_generate" not in skip:
        width = max(map(len, prompts))
        ids = np.zeros((len(prompts), width), np.int64)
        mask = np.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
        stop_set = set(map(int, stops))
        with torch.inference_mode():
            start = time.perf_counter()
            gen = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=config)
            seconds = time.perf_counter() - start
        useful = 0
        for row in gen[:, width:].tolist():
            for t in row:
                useful += 1
                if t in stop_set:
                    break
        out["transformers generate (static)"] = (seconds, useful)
    return out


def run_rollout(args) -> None:
    shape = ROLLOUT_SHAPE
    rng = np.random.default_rng(0)
    V = shape["vocab_size"]
    prompts = [rng.integers(1, V, n).tolist() for n in rng.integers(args.min_prompt, args.max_prompt + 1,
                                                                      args.requests)]
    stops = rng.choice(np.arange(1, V), V // args.mean_length, replace=False).astype(np.int32)
    hf_model = _torch_model(shape)
    results = _hf_runs(args, hf_model, prompts, stops, args.skip)  # first, before jax starts its threads

    from fst_jax.models.hf import load_pretrained
    from fst_jax.sampling import Sampler
    from fst_jax.sampling.engine import Engine, Request, prompt_bucket

    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model = load_pretrained(tmp, dtype="float32")
    del hf_model
    sampler = Sampler(model, slots=args.static_rows)
    stop_ids = np.full(-(-len(stops) // 8) * 8, -1, np.int32)
    stop_ids[:len(stops)] = stops
    sampling = dict(temperature=1.0, top_p=1.0, top_k=0)

    if "static" not in args.skip:
        def static():
            toks = []
            for c, start in enumerate(range(0, len(prompts), args.static_rows)):
                out = sampler.generate(prompts[start:start + args.static_rows], max_new_tokens=args.max_new,
                                       seed=c, stop_token_ids=stops.tolist(), **sampling)
                toks += out.tokens
            return sum(map(len, toks))
        static()  # compile
        start = time.perf_counter()
        useful = static()
        results[f"Sampler.generate, {args.static_rows}-row calls"] = (time.perf_counter() - start, useful)

    requests = [Request(p, 1, args.max_new) for p in prompts]
    columns = prompt_bucket(args.max_prompt) + args.max_new
    engine_stats = {}
    for slots, draw in [(n, "gumbel") for n in args.slots] + [(max(args.slots), "inverse_cdf")]:
        engine = Engine(model.config, slots=slots, columns=columns, max_new_tokens=args.max_new,
                        cache_dtype="float32", chunk_steps=args.chunk_steps, draw=draw)
        start = time.perf_counter()
        engine.run(sampler.weights, requests, seed=0, stop_ids=stop_ids, pad_id=0, **sampling)
        first = time.perf_counter() - start
        best = None
        for _ in range(args.repeats):
            engine.stats = type(engine.stats)()
            start = time.perf_counter()
            tokens, _, _ = engine.run(sampler.weights, requests, seed=0, stop_ids=stop_ids, pad_id=0, **sampling)
            seconds = time.perf_counter() - start
            if best is None or seconds < best[0]:
                best = (seconds, sum(map(len, tokens)), engine.stats)
        results[f"engine, {slots} slots, {draw}"] = best[:2]
        engine_stats[(slots, draw)] = (best[2], first, best[0])

    print(f"rollout regime: {args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, "
          f"temperature 1, {len(stops)} stop ids (mean length ≈ {args.mean_length}), cap {args.max_new}; model "
          f"{shape}; fp32; {os.cpu_count()} CPU threads; best of {args.repeats} timed runs each")
    cb = results.get("transformers generate_batch (CB)")
    for name, (seconds, useful) in results.items():
        ratio = "" if cb is None else f"   {useful / seconds / (cb[1] / cb[0]):5.2f}x CB"
        print(f"  {name:36s} {useful / seconds:8.1f} useful tokens/s  ({useful} tokens in {seconds:6.1f} s){ratio}")
    for (slots, draw), (stats, first, seconds) in engine_stats.items():
        print(f"  engine {slots:4d} slots, {draw}: utilisation {stats.utilisation:.1%} ({stats.useful_tokens} tokens / "
              f"{stats.row_steps} row-steps), tail {stats.tail_s:.1f} s of {seconds:.1f} s "
              f"({stats.tail_s / seconds:.0%}), {stats.chunks} chunks, {stats.inserts} insertions, "
              f"{stats.compactions} compactions; first run with compilation {first:.1f} s")
    if "buffer" not in args.skip:
        _buffer_check(model.config, sampler.weights, args.buffer_rows)


def _buffer_check(config, weights, rows: int, steps: int = 16, repeats: int = 3) -> None:
    """Decode step time (the decode program alone) with rows 64 tokens long, in a 512-column and a 4096-column
    buffer: attention reads the first 128 columns either way."""
    import jax

    from fst_jax.sampling.engine_programs import empty_state, programs

    insert_jit, decode_jit = programs(config)[:2]
    rng = np.random.default_rng(1)
    ids = rng.integers(1, config.vocab_size, (rows, 64)).astype(np.int32)
    M = 1 + steps * (repeats + 1)
    params = (np.float32(0.0), np.float32(1.0), np.int32(0), np.full(8, -1, np.int32))  # greedy, as the static
    times = {}
    for columns in (512, 4096):
        state = empty_state(config, rows, columns, M, "float32")
        state = insert_jit(weights, state, ids, np.ones_like(ids, bool), np.arange(rows, dtype=np.int32),
                           np.arange(rows, dtype=np.int32), np.full(rows, M, np.int32), np.uint32(0),
                           num_samples=1)
        chunk = lambda s: decode_jit(weights, s, want_free=np.int32(rows + 1), temperature=params[0],  # noqa: E731
                                     top_p=params[1], top_k=params[2], stop_ids=params[3], max_steps=steps, width=128)
        state, _ = chunk(state)
        jax.block_until_ready(state)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            state, n = chunk(state)
            jax.block_until_ready(state)
            best = min(best, (time.perf_counter() - start) / int(n))
        times[columns] = best
        del state
    print(f"  decode step, {rows} rows 64-80 tokens long, attended width 128, greedy: 512-column buffer "
          f"{times[512] * 1e3:.2f} ms, 4096-column buffer {times[4096] * 1e3:.2f} ms "
          f"({times[4096] / times[512]:.2f}x)")


def best_wall_time(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls of fn (fn must block until its result is ready)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
