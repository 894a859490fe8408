"""Benchmarks that print numbers (never timed tests). One subcommand per benchmark:

    python launch/bench.py sampler            # our sampler vs transformers' generate on CPU, + roofline
    python launch/bench.py sampler --gpu      # Qwen3-8B shape, bf16, random weights, on the accelerator
    python launch/bench.py rollout            # the rollout regime: engine vs static vs transformers CB/generate
    python launch/bench.py gpu                # ≤ 8 min on one H100/H200: decode roofline, update MFU, FST cycle

Add a benchmark by writing `add_<name>_args(parser)` and `run_<name>(args)` and registering them in
`BENCHMARKS`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from bench_gpu import add_gpu_args, run_gpu  # noqa: E402  (launch/bench_gpu.py, beside this file)
from bench_rollout import add_rollout_args, best_wall_time, run_rollout  # noqa: E402

# The CPU benchmark's model: Qwen3-0.6B's widths with 4 layers (the 151936 × 1024 tied embedding dominates).
CPU_SHAPE = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)


def host_copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s moved by a large numpy copy, counting the read and the write (best of `repeats`)."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


# --------------------------------------------------------------------------------------------------- sampler

def add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=CPU_SHAPE["num_hidden_layers"])
    p.add_argument("--repeats", type=int, default=3, help="timed calls of our sampler (best is reported)")
    p.add_argument("--hf-repeats", type=int, default=2, help="timed calls of transformers' generate")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers' generate")
    p.add_argument("--gpu", action="store_true",
                   help="Qwen3-8B shape, bf16, random weights, batch 64 and 256, prompt 512, 1024 new tokens")
    p.add_argument("--gpu-batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--gpu-preset", default="8B", help="Qwen3 size for --gpu")
    p.add_argument("--gpu-layers", type=int, default=None, help="override the preset's depth (smoke runs)")
    p.add_argument("--gpu-prompt-len", type=int, default=512)
    p.add_argument("--gpu-new-tokens", type=int, default=1024)
    p.add_argument("--allow-cpu", action="store_true", help="run the --gpu path on CPU (a smoke test)")


def run_sampler(args) -> None:
    if args.gpu:
        return _run_sampler_gpu(args)
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    B, P, M = args.batch, args.prompt_len, args.new_tokens
    shape = dict(CPU_SHAPE, num_hidden_layers=args.layers)
    torch.manual_seed(0)
    hf_model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape)).eval()
    prompts = np.random.default_rng(0).integers(0, shape["vocab_size"], (B, P)).tolist()

    hf_tps = hf_tokens = None
    if not args.skip_hf:  # first, before jax has started its thread pool
        ids = torch.tensor(prompts)
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=M, min_new_tokens=M,
                      pad_token_id=0)
        with torch.inference_mode():
            hf_model.generate(ids[:, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            hf_s = best_wall_time(lambda: hf_model.generate(ids, **kwargs), args.hf_repeats)
            hf_tokens = hf_model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})[:, P:]
        hf_tps = B * M / hf_s

    from fst_jax.models.hf import load_pretrained
    from fst_jax.sampling import Sampler

    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model = load_pretrained(tmp, dtype="float32")
    del hf_model
    sampler = Sampler(model)
    n_params = model.config.num_params()
    weight_bytes = n_params * 4

    start = time.perf_counter()
    out = sampler.generate(prompts, max_new_tokens=M)
    compile_s = time.perf_counter() - start
    ours_s = best_wall_time(lambda: sampler.generate(prompts, max_new_tokens=M), args.repeats)
    sampler.generate(prompts, max_new_tokens=1)
    prefill_s = best_wall_time(lambda: sampler.generate(prompts, max_new_tokens=1), args.repeats)
    ours_tps = B * M / ours_s
    decode_tps = B * (M - 1) / (ours_s - prefill_s)
    bandwidth = host_copy_bandwidth()
    roofline_tps = B * bandwidth / weight_bytes

    print(f"config: {shape}")
    print(f"batch {B}, prompt {P}, {M} new tokens, greedy, fp32, no early stop; {n_params / 1e6:.0f}M params "
          f"({weight_bytes / 1e9:.2f} GB of weights read per decode step); {os.cpu_count()} CPU threads")
    print(f"ours:         {ours_tps:8.1f} tokens/s  ({ours_s:.2f} s per call, best of {args.repeats}; first call "
          f"{compile_s:.1f} s with compilation; prefill {prefill_s:.2f} s; decode alone {decode_tps:.1f} tokens/s)")
    if hf_tps is not None:
        agree = np.mean(np.array(out.tokens)[:, :8] == hf_tokens.numpy())
        print(f"transformers: {hf_tps:8.1f} tokens/s  ({B * M / hf_tps:.2f} s per call, best of {args.hf_repeats}; "
              f"first 8 greedy tokens agree with ours at {agree:.0%} of positions)")
        print(f"ratio:        {ours_tps / hf_tps:8.2f}x transformers")
    print(f"roofline:     {roofline_tps:8.1f} tokens/s  (weights once per step at the host copy bandwidth, "
          f"{bandwidth / 1e9:.1f} GB/s read + write)")
    print(f"fraction:     {ours_tps / roofline_tps:8.1%} of roofline end to end; decode steps alone "
          f"{decode_tps / roofline_tps:.1%}")


def _run_sampler_gpu(args) -> None:
    """Decode throughput at a real model's shape with random weights, against the HBM roofline."""
    # XLA preallocates 75% of the accelerator's memory by default; the batch-256 KV cache needs more.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fst_jax.models.config import Qwen3Config
    from fst_jax.models.qwen3 import Qwen3
    from fst_jax.sampling import Sampler

    if jax.default_backend() == "cpu" and not args.allow_cpu:
        print("--gpu: no accelerator found (jax backend is cpu); nothing to run")
        return
    overrides = {} if args.gpu_layers is None else {"num_layers": args.gpu_layers}
    config = Qwen3Config.preset(args.gpu_preset, dtype="bfloat16", param_dtype="bfloat16", **overrides)
    P, M = args.gpu_prompt_len, args.gpu_new_tokens
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))), nnx.Param)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(treedef, [
        jax.jit(lambda k, s=leaf.shape, d=leaf.dtype: (0.02 * jax.random.normal(k, s, jnp.float32)).astype(d))(key)
        for key, leaf in zip(keys, leaves)])
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    sampler = Sampler((graphdef, params))
    del params  # the sampler holds its own copy in the sampling layout

    copy = jax.jit(lambda x: x + 1)
    big = jnp.zeros((1 << 30,), jnp.bfloat16)
    copy(big).block_until_ready()
    hbm = 2 * big.nbytes / best_wall_time(lambda: copy(big).block_until_ready(), 5)
    del big
    print(f"Qwen3-{args.gpu_preset} shape ({config.num_layers} layers), bf16, random weights; prompt {P}, {M} new "
          f"tokens, greedy, no early stop; {weight_bytes / 1e9:.1f} GB of weights; measured device copy bandwidth "
          f"{hbm / 1e9:.0f} GB/s ({jax.devices()[0].device_kind})")
    for B in args.gpu_batches:
        prompts = np.random.default_rng(0).integers(0, config.vocab_size, (B, P)).tolist()
        # What an ideal decoder reads per step: the weights once and, on average, half the generated KV.
        kv_bytes = 2 * config.num_layers * B * (P + M / 2) * config.num_kv_heads * config.head_dim * 2
        try:
            sampler.generate(prompts, max_new_tokens=M)
            seconds = best_wall_time(lambda: sampler.generate(prompts, max_new_tokens=M), 1)
        except Exception as e:  # e.g. out of memory at batch 256: report it and go on to the next shape
            print(f"batch {B}: failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        tps = B * M / seconds
        roofline = B * hbm / (weight_bytes + kv_bytes)
        print(f"batch {B}: {tps:9.0f} tokens/s ({seconds:.1f} s per call, prefill included); roofline "
              f"{roofline:9.0f} tokens/s; fraction {tps / roofline:.1%}")


# ------------------------------------------------------------------------------------------------- dispatch

BENCHMARKS = {
    "sampler": (add_sampler_args, run_sampler, "sampler tokens/s vs transformers' generate and the roofline"),
    "rollout": (add_rollout_args, run_rollout, "useful tokens/s on run-shaped work: engine vs static vs transformers"),
    "gpu": (add_gpu_args, run_gpu, "one-shot accelerator check: prefill/decode vs roofline, update MFU, FST cycle"),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (add_args, _, help_text) in BENCHMARKS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    BENCHMARKS[args.benchmark][1](args)


if __name__ == "__main__":
    main()
