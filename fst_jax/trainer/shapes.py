"""The shapes of a run's jitted programs, shared by the run and its dry run (`fst_jax.trainer.dry_run`): the mesh, the
sampler calls a run makes (`sampler_calls`: each kind's prompts, samples and token limits, so a run compiles
only the programs its plan lowered), the sampler's slots, the prompt buckets they run at, the update's sequence lengths and the KL
evaluation's."""

from __future__ import annotations

import dataclasses

from fst_jax.trainer import evals
from fst_jax.runtime import parallel
from fst_jax import sampling
from fst_jax.rl.rollouts import length_bucket, length_buckets

__all__ = ["SamplerCall", "sampler_calls", "sampler_slots", "prompt_buckets", "mesh_config", "update_length",
           "update_lengths", "kl_length"]


def mesh_config(config) -> dict[str, int]:
    """The mesh axis sizes of `config.mesh` (its other fields, e.g. device_memory_gb, are not axes)."""
    return {axis: int(config.mesh[axis]) for axis in parallel.MESH_AXES if axis in config.mesh}


def sampler_slots(config) -> int:
    """The sampler's slots (rows in flight; a call with more rows streams them through): `sampling.slots`,
    default B·G (one RL step's rollouts all in flight)."""
    c = config
    return int(c.sampling.slots or c.cycle.problems_per_step * c.cycle.rollouts_per_problem)


def update_length(config) -> int:
    """The longest rollout the update takes: the largest prompt bucket plus max_new_tokens, bucketed."""
    return length_bucket(sampling.bucket_length(int(config.sampling.max_prompt_tokens))
                         + int(config.sampling.max_new_tokens))


def update_lengths(config) -> tuple[int, ...]:
    """The lengths the update computes micro-batches at (one gradient program each, all planned):
    `rl.num_length_buckets` evenly spaced up to `update_length` (`rl.policy_update.planned_lengths`), less
    those below the one that holds the shortest possible row (`sampling.min_prompt_tokens` + 1), when set."""
    lengths = length_buckets(update_length(config), int(config.rl.get("num_length_buckets", 10)))
    low = config.sampling.get("min_prompt_tokens")
    if not low:
        return lengths
    floor = min((n for n in lengths if n >= int(low) + 1), default=lengths[-1])
    return tuple(n for n in lengths if n >= floor)


def kl_length(config) -> int:
    """The KL evaluation's sequence length: what `evals.kl_to_base` pads to for prompts in the largest bucket."""
    return evals.kl_sequence_length(sampling.bucket_length(int(config.sampling.max_prompt_tokens)),
                                    int(config.eval.kl_max_new_tokens))


def prompt_buckets(config, max_prompt_tokens: int) -> list[int]:
    """The prompt buckets (`sampling.bucket_length`) a call kind can run at, smallest first: from the bucket of
    `sampling.min_prompt_tokens` (None: only the largest) to that of `max_prompt_tokens`. The plan accounts
    memory at the largest (memory grows with the bucket) and compiles the others, so a run whose prompts are
    never shorter than `min_prompt_tokens` compiles nothing the plan did not."""
    top = sampling.bucket_length(int(max_prompt_tokens))
    low = config.sampling.get("min_prompt_tokens")
    bucket = top if not low else min(top, sampling.bucket_length(int(low)))
    buckets = []
    while bucket < top:
        buckets.append(bucket)
        bucket *= 2
    return buckets + [top]


@dataclasses.dataclass(frozen=True)
class SamplerCall:
    """One kind of sampler call of a run, at its largest: up to `prompts` prompts (None: any number — the
    validation set) of up to `prompt_tokens` tokens, `num_samples` completions each of up to `max_new_tokens`,
    all in one call (the engine streams them through the slots). `weights`: "policy" (the trained params) or
    "base" (the frozen base: local reflection). `release_after`: drop the sampling weights after the call (the
    rollouts: the update comes next). `fixed`: every call of this kind has exactly `prompts` prompts (so it
    always starts with the same slots)."""

    prompts: int | None
    num_samples: int
    prompt_tokens: int
    max_new_tokens: int
    weights: str = "policy"
    release_after: bool = False
    fixed: bool = False

    def rows(self, slots: int) -> int:
        """The most rows in flight: prompts × samples, at most `slots`."""
        return slots if self.prompts is None else min(slots, self.prompts * self.num_samples)


def sampler_calls(config) -> dict[str, SamplerCall]:
    """Every kind of sampler call the run makes, at the shapes it makes them (`fst.FSTRunner` and the dry run).

    rollout: one RL step's B·K prompts × G/K samples (RL-only: B × G). rollout_rest: with
    `cycle.reuse_gepa_rollouts`, the rollouts GEPA did not supply, one sample per row. gepa_minibatch: a GEPA
    iteration's parents or children on their minibatches (proposals × minibatch size). gepa: GEPA's window
    scoring (up to the window × proposals). reflection: the local reflection LM on the base weights. eval:
    mean@k, k samples of each validation problem. kl_sample: the KL evaluation's responses.
    """
    c = config
    B, G, K = int(c.cycle.problems_per_step), int(c.cycle.rollouts_per_problem), int(c.cycle.population_size)
    K = 1 if c.method == "rl" else K
    prompt, new = int(c.sampling.max_prompt_tokens), int(c.sampling.max_new_tokens)
    proposals = int(c.gepa.proposals_per_iteration)
    calls = {}
    if c.method != "gepa":
        calls["rollout"] = SamplerCall(B * K, G // K, prompt, new, release_after=True, fixed=True)
        if c.method == "fst" and c.cycle.get("reuse_gepa_rollouts"):
            calls["rollout_rest"] = SamplerCall(B * G, 1, prompt, new, release_after=True)
    if c.method != "rl":
        window = B * int(c.cycle.rl_steps)
        calls["gepa_minibatch"] = SamplerCall(proposals * int(c.gepa.minibatch_size), 1, prompt, new)
        calls["gepa"] = SamplerCall(window * proposals, 1, prompt, new)
        if c.gepa.reflection.kind == "local":
            calls["reflection"] = SamplerCall(proposals, 1, int(c.gepa.reflection.max_prompt_tokens),
                                              int(c.gepa.reflection.max_new_tokens), weights="base")
    calls["eval"] = SamplerCall(int(c.eval.num_problems) or None, int(c.eval.k), prompt, int(c.eval.max_new_tokens))
    if c.eval.kl_prompts:
        calls["kl_sample"] = SamplerCall(int(c.eval.kl_prompts), 1, prompt, int(c.eval.kl_max_new_tokens))
    return calls
