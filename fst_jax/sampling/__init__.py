"""Sampling: the sampler every call of a run goes through (a request engine: continuous batching over slots),
the weight layout it decodes with, token choice (temperature / top-p / top-k) and chat rendering with one rule
for stop ids.

    sampler.py          `Sampler`: `generate` streams any number of prompts through the engine; planning its programs
    engine.py           `Engine`: the host loop of continuous batching over slots, and its program list
    engine_programs.py  the engine's jitted insert (prefill), decode and compact programs
    weights.py          the sampling layout of the weights (compute dtype, [out..., in], replicated over the batch axes)
    token_choice.py     temperature / top-p / top-k sampling and the chosen token's log-prob
    chat.py             `ChatSampler`: chat rendering, stop ids and thinking-block stripping over a `Sampler`
"""

from fst_jax.sampling.sampler import (DEFAULT_SLOTS, MIN_BUCKET, SampleOutput, Sampler, bucket_length, call_slots,
                                      generate, lower_sampler_programs, row_bucket)
from fst_jax.sampling.engine import Engine, EngineStats, Request, kv_bytes, lower_engine_programs
from fst_jax.sampling.token_choice import sample_logits, sample_vb
from fst_jax.sampling.weights import abstract_sampling_weights, sampling_weights

__all__ = ["DEFAULT_SLOTS", "Engine", "EngineStats", "MIN_BUCKET", "Request", "SampleOutput", "Sampler",
           "abstract_sampling_weights", "bucket_length", "call_slots", "generate", "kv_bytes",
           "lower_engine_programs", "lower_sampler_programs", "row_bucket", "sample_logits", "sample_vb",
           "sampling_weights"]
