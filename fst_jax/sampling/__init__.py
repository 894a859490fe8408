"""Sampling: the jitted sampler every rollout of a run goes through, the weight layout it decodes with, token
choice (temperature / top-p / top-k) and chat rendering with one rule for stop and pad ids.

    sampler.py       `Sampler`: prefill + cached decode, programs planned per (rows, prompt bucket, length)
    engine.py        `Engine`: continuous batching of requests over slots (its jitted programs: engine_programs.py)
    weights.py       the sampling layout of the weights (bf16, [out..., in], replicated over the batch axes)
    token_choice.py  temperature / top-p / top-k sampling and the chosen token's log-prob
    chat.py          `ChatSampler`: chat rendering, stop ids and thinking-block stripping over a `Sampler`
"""

from fst_jax.sampling.sampler import (MIN_BUCKET, SampleOutput, Sampler, bucket_length, generate,
                                      lower_sampler_programs, row_bucket)
from fst_jax.sampling.engine import Engine, EngineStats, Request, lower_engine_programs
from fst_jax.sampling.token_choice import sample_logits, sample_vb
from fst_jax.sampling.weights import abstract_sampling_weights, sampling_weights

__all__ = ["Engine", "EngineStats", "MIN_BUCKET", "Request", "SampleOutput", "Sampler", "abstract_sampling_weights",
           "bucket_length", "generate", "lower_engine_programs", "lower_sampler_programs", "row_bucket",
           "sample_logits", "sample_vb", "sampling_weights"]
