"""The sampler every call of a run goes through: `Sampler.generate` streams any number of prompts through the
request engine (`engine.py`, continuous batching over `slots` rows in flight, attention bounded by the live
length), and `lower_sampler_programs` lowers, ahead of time and without weights, every program such calls run.

A call's KV buffer holds, per slot, the bucket (`bucket_length`: a power of two ≥ 16) of its longest allowed
prompt (`max_prompt_tokens`, default the call's longest) plus its `max_new_tokens`; it starts with the fewest
slots that hold all its rows (`call_slots`: slots, a quarter, a sixteenth …), and streams the rest through
them as rows finish. Temperature,
top-p, top-k, the seed and the stop tokens are traced values: changing them never recompiles.

Weights are held in the sampling layout (`weights.py`): one buffer per layer, outputs first, in the compute
dtype. Randomness is per sample: sample i of a call (prompt-major: prompt p's samples at p·n … p·n+n-1) draws
token t with fold_in(fold_in(key(seed), i), t), so its tokens depend on the seed, its index and the model, never
on the slots or the schedule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from fst_jax.models.config import canonical_dtype
from fst_jax.models.qwen3 import Qwen3
from fst_jax.runtime import parallel
from fst_jax.sampling.engine import (CHUNK_STEPS, MIN_BUCKET, Engine, EngineStats, Request, lower_engine_programs,
                                     prompt_bucket)
from fst_jax.sampling.engine_programs import PREFILL_SCORES_MB, row_buckets
from fst_jax.sampling.weights import abstract_sampling_weights, hashable_rules, sampling_weights

__all__ = ["DEFAULT_SLOTS", "MIN_BUCKET", "MIN_ROWS", "SampleOutput", "Sampler", "bucket_length", "call_slots",
           "generate", "lower_sampler_programs", "row_bucket"]

DEFAULT_SLOTS = 64
MIN_ROWS = 8  # a call starts with at least this many slots per batch shard (fewer programs, same cost)


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Completions in request order, prompt-major: prompt i's samples sit at i·num_samples … +num_samples-1.

    tokens: each completion's ids, *including* the stop token that ended it (the policy chose it, so the RL
      loss needs its log-prob). logprobs: float32, one per token, log softmax(logits / temperature) of the
      chosen token before top-p/top-k filtering (temperature 1 when greedy). finished: a stop token was
      produced (False: the row hit max_new_tokens).
    """

    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    finished: list[bool]


def bucket_length(n: int, min_bucket: int = MIN_BUCKET) -> int:
    """The padded prompt length: the next power of two ≥ max(n, min_bucket)."""
    return max(min_bucket, prompt_bucket(n))


def row_bucket(n_rows: int, mesh: Mesh | None = None) -> int:
    """`n_rows` rounded up to a power of two per batch shard, times the mesh's batch multiple (data × fsdp)."""
    if not (isinstance(n_rows, (int, np.integer)) and n_rows >= 1):
        raise ValueError(f"the number of rows must be a positive integer, got {n_rows!r}")
    multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
    return (1 << (-(-int(n_rows) // multiple) - 1).bit_length()) * multiple


def call_slots(rows: int, slots: int, mesh: Mesh | None = None) -> int:
    """The slots a call of `rows` rows (prompts × samples) starts with: the smallest of the engine's row buckets
    (`slots`, a quarter, a sixteenth …, at least `MIN_ROWS` per batch shard) that holds them all, else `slots`."""
    multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
    return min((b for b in row_buckets(int(slots), multiple, MIN_ROWS) if b >= rows), default=int(slots))


def start_sizes(rows: int, slots: int, mesh: Mesh | None = None) -> list[int]:
    """Every slot count a call of 1 … `rows` rows starts with (`call_slots`), smallest first."""
    multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
    top = call_slots(rows, slots, mesh)
    return sorted(b for b in row_buckets(int(slots), multiple, MIN_ROWS) if b <= top)


class Sampler:
    """Samples from one Qwen3 model; holds its weights in the sampling layout (see `sampling_weights`).

    `model`: a `Qwen3` or its `nnx.split(model, nnx.Param)` pair. `slots`: the most rows in flight (a call
    with more rows streams them through). `mesh`: split the slots over its data/fsdp axes (`slots` must be a
    multiple of data × fsdp) and lay the weights out by `rules` (default `parallel.SAMPLE_RULES`: whole on each
    batch shard, split by `tensor`). `cache_dtype` defaults to the model's compute dtype. `draw`: "gumbel" or
    "inverse_cdf" (`engine_programs`). `prefill_scores_mb`: a prefill whose float32 attention scores would be
    larger runs in query chunks (`engine_programs.prefill_chunk`). `stats`: what the engine computed, over every call. Compiled programs
    live in jax's jit cache, shared by every Sampler of the same model shape.
    """

    def __init__(self, model: Qwen3 | tuple[nnx.GraphDef, nnx.State], *, mesh: Mesh | None = None,
                 rules: parallel.Rules = parallel.SAMPLE_RULES, cache_dtype=None, slots: int = DEFAULT_SLOTS,
                 draw: str = "gumbel", chunk_steps: int = CHUNK_STEPS,
                 prefill_scores_mb: float = PREFILL_SCORES_MB):
        if isinstance(model, nnx.Module):
            self.config = model.config
            _, params = nnx.split(model, nnx.Param)
        else:
            graphdef, params = model
            self.config = nnx.merge(graphdef, params).config
        multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
        if not (isinstance(slots, (int, np.integer)) and slots >= 1 and slots % multiple == 0):
            raise ValueError(f"slots must be a positive multiple of the mesh's batch axes (data × fsdp = {multiple}), "
                             f"got {slots!r}")
        self.mesh, self.rules, self.slots, self.draw, self.chunk_steps = mesh, hashable_rules(rules), int(slots), draw, chunk_steps
        self.prefill_scores_mb = prefill_scores_mb
        self.cache_dtype = canonical_dtype(cache_dtype or self.config.dtype).name
        self.stats = EngineStats()
        self.set_params(params)

    def set_params(self, params: nnx.State) -> None:
        """Replace the weights (e.g. after an RL update; any layout) with a copy in the sampling layout."""
        self.weights = None  # drop the old copy first: at most one sampling copy is alive at a time
        self.weights = sampling_weights(params, self.config, self.mesh, self.rules)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_token_ids: Sequence[int] = (),
                 num_samples: int = 1, pad_id: int = 0, max_prompt_tokens: int | None = None) -> SampleOutput:
        """Sample `num_samples` completions of each prompt (token ids). See `SampleOutput` for the result.

        temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off. None of these, nor the seed or the
        stop tokens, is compiled in: the call's slots (`call_slots`), prompt bucket (`bucket_length`),
        max_new_tokens and num_samples select the programs (`lower_sampler_programs` lowers the same ahead of
        time). `max_prompt_tokens`: size the KV buffer for prompts this long, whatever this call's longest (so
        every call of a kind runs the same programs). `pad_id` is accepted for compatibility; completions come
        back cut to their length.
        """
        _check_request(prompts, max_new_tokens, temperature, top_p, top_k, num_samples)
        rows = len(prompts) * num_samples
        slots = call_slots(rows, self.slots, self.mesh)
        if slots < num_samples:
            raise ValueError(f"num_samples={num_samples} exceeds the sampler's slots={self.slots}: every sample of "
                             f"a prompt is in flight at once (raise slots, config.sampling.slots in a run)")
        longest = max(max(len(p) for p in prompts), int(max_prompt_tokens or 0))
        engine = self._engine(slots, bucket_length(longest), max_new_tokens)
        engine.stats = self.stats
        tokens, logprobs, finished = engine.run(
            self.weights, [Request(p, num_samples, max_new_tokens) for p in prompts], seed=seed,
            temperature=temperature, top_p=top_p, top_k=top_k, stop_ids=stop_token_ids)
        return SampleOutput(tokens=tokens, logprobs=logprobs, finished=finished)

    def _engine(self, slots: int, bucket: int, max_new_tokens: int) -> Engine:
        return Engine(self.config, slots=slots, columns=bucket + max_new_tokens, max_new_tokens=max_new_tokens,
                      cache_dtype=self.cache_dtype, mesh=self.mesh, rules=self.rules, draw=self.draw,
                      chunk_steps=self.chunk_steps, prefill_scores_mb=self.prefill_scores_mb)


def lower_sampler_programs(config, abstract_params: nnx.State, *, mesh: Mesh | None = None,
                           rules: parallel.Rules = parallel.SAMPLE_RULES, slots: int = DEFAULT_SLOTS, rows: int,
                           prompt_buckets: Sequence[int], max_new_tokens: int, num_samples: int = 1,
                           cache_dtype=None, draw: str = "gumbel", fixed: bool = False,
                           platform: str | None = None, known: dict | None = None, lazy: bool = False,
                           prefill_scores_mb: float = PREFILL_SCORES_MB) -> dict:
    """Lower, without any array, every program `Sampler(model, mesh=, rules=, cache_dtype=, slots=, draw=)
    .generate(..., max_prompt_tokens=max(prompt_buckets))` runs for calls of up to `rows` prompts × `num_samples`
    whose longest prompt falls in one of `prompt_buckets` (`bucket_length`s): {name: jax.stages.Lowered}, named as by `lower_engine_programs` (e.g.
    decode_B64_C144_W128: 64 rows, 144 KV columns, attending over 128). Compiling them all leaves such calls nothing to
    compile (`fixed`: only calls of exactly `rows` prompts). `.compile().memory_analysis()` of each gives its per-device memory; the call's KV buffer is
    `engine.kv_bytes(config, slots, columns, cache_dtype)`. `platform` ("cuda", "tpu"): lower for that backend;
    `known`: programs lowered before, by name (e.g. another call kind's), reused; `lazy`: `engine.Deferred`
    values, lowered on `.get()`.
    """
    weights = abstract_sampling_weights(config, abstract_params, mesh, rules)
    cache_dtype = canonical_dtype(cache_dtype or config.dtype).name
    out = {}
    starts = [call_slots(rows * num_samples, slots, mesh)] if fixed else start_sizes(rows * num_samples, slots, mesh)
    columns = max(prompt_buckets) + max_new_tokens  # the buffer of the largest allowed prompt
    for start in starts:
        if start < num_samples:
            continue
        out.update(lower_engine_programs(config, weights, slots=start, columns=columns,
                                         max_new_tokens=max_new_tokens, num_samples=[num_samples],
                                         prompt_buckets=prompt_buckets, cache_dtype=cache_dtype, mesh=mesh,
                                         rules=rules, draw=draw, platform=platform, known=known, lazy=lazy,
                                         prefill_scores_mb=prefill_scores_mb))
    return out


def generate(model: Qwen3 | tuple[nnx.GraphDef, nnx.State], prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             stop_token_ids: Sequence[int] = (), num_samples: int = 1, pad_id: int = 0,
             mesh: Mesh | None = None) -> SampleOutput:
    """`Sampler(model, mesh=mesh).generate(prompts, ...)`. This lays the weights out anew on every call; for
    repeated sampling keep one `Sampler` (the compiled programs are shared either way)."""
    return Sampler(model, mesh=mesh).generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop_token_ids=stop_token_ids, num_samples=num_samples, pad_id=pad_id)


def _check_request(prompts, max_new_tokens, temperature, top_p, top_k, num_samples):
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompt(s) {empty[:5]} are empty; every prompt needs at least one token")
    if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be ≥ 0 (0 = off), got {top_k!r}")
