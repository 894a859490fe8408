"""Evaluations: validation mean@k with a given system prompt, and token-level KL(π_θ ‖ π_base).

mean@k (the paper's validation metric): k samples per problem at temperature 0.6, top-p 0.95; the score of a
problem is the mean reward of its k samples, the score of the set the mean over problems.

KL to base: responses are sampled from the current policy on held-out prompts; for each response token, with
r = log π_base(y_t) − log π_θ(y_t), the k3 estimator exp(r) − 1 − r (the one the RL penalty uses) is an
unbiased sample of the token-level KL(π_θ ‖ π_base) that is never negative (k1, −r, is unbiased too, but its
mean over a finite sample can read negative). Reported as the mean over all response tokens; each eval record
names it (`kl_estimator`: "k3").

`evaluate_run(runner, task)` is a run's evaluation: mean@k with the population's best and the seed prompt,
KL to base under each, and the forgetting tasks under the seed prompt — one `eval` record.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fst_jax.runtime import parallel
from fst_jax.sampling.chat import default_stop_token_ids
from fst_jax.models.hf import render_chat
from fst_jax.rl import losses
from fst_jax.rl.rollouts import build_rollouts, length_bucket
from fst_jax.sampling import Sampler, bucket_length
from fst_jax.tasks.base import Task, checked_score
from fst_jax.trainer.run_state import derive_seed

if TYPE_CHECKING:
    from fst_jax.trainer.runner import FSTRunner

__all__ = ["render_prompts", "mean_at_k", "kl_to_base", "k3", "KL_ESTIMATOR", "sequence_logprobs",
           "kl_sequence_length", "lower_kl_program", "evaluate_run"]


def render_prompts(tokenizer, task: Task, problems: Sequence[Mapping[str, Any]], system_prompt: str | None,
                   enable_thinking: bool | None = None) -> list[list[int]]:
    """Token ids of [system = system_prompt (omitted when None/empty), user = the task's problem message]."""
    out = []
    for problem in problems:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": task.format_problem(problem)})
        out.append(render_chat(tokenizer, messages, enable_thinking=enable_thinking))
    return out


def mean_at_k(sampler: Sampler, tokenizer, task: Task, problems: Sequence[Mapping[str, Any]],
              system_prompt: str | None, *, k: int = 4, temperature: float = 0.6, top_p: float = 0.95,
              max_new_tokens: int = 1024, seed: int = 0, enable_thinking: bool | None = None) -> dict[str, float]:
    """mean@k of `problems` under `system_prompt`: {"mean_at_k", "pass_at_k", "response_length"}."""
    if not problems:
        raise ValueError("mean_at_k: no evaluation problems (configure eval files or a validation fraction)")
    prompts = render_prompts(tokenizer, task, problems, system_prompt, enable_thinking)
    out = sampler.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           seed=seed, stop_token_ids=_stops(tokenizer), num_samples=k,
                           pad_id=_pad(tokenizer))
    # checked: a broken reward names the task, the problem and the completion here as in training
    rewards = np.array([checked_score(task, problems[i // k], tokenizer.decode(toks, skip_special_tokens=True)).reward
                        for i, toks in enumerate(out.tokens)], np.float64).reshape(len(problems), k)
    return {"mean_at_k": float(rewards.mean()), "pass_at_k": float((rewards.max(axis=1) >= 1.0).mean()),
            "response_length": float(np.mean([len(t) for t in out.tokens]))}


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def sequence_logprobs(graphdef: nnx.GraphDef, params: nnx.State, input_ids_bt, attention_mask_bt, *,
                      chunk_size: int | None = None) -> jax.Array:
    """log π(x_{t+1} | x_≤t) at every position t (the last position gets 0) — [B, T]. Rows are right-padded:
    `attention_mask_bt` is each row's prefix of real tokens (as `rl.build_rollouts` lays them out)."""
    return _sequence_logprobs(graphdef, params, input_ids_bt, attention_mask_bt, chunk_size)


def _sequence_logprobs(graphdef, params, input_ids_bt, attention_mask_bt, chunk_size):
    model = nnx.merge(graphdef, params)
    # rows are right-padded (`build_rollouts`): their lengths are the form a fused attention kernel takes
    lengths_b = jnp.sum(attention_mask_bt, axis=1, dtype=jnp.int32)
    hidden = model.forward(input_ids_bt, lengths=lengths_b, compute_logits=False).last_hidden
    targets = jnp.concatenate([input_ids_bt[:, 1:], jnp.zeros_like(input_ids_bt[:, :1])], axis=1)
    return losses.token_logprobs(hidden, model.unembed_matrix(), targets, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _log_ratio(graphdef, params, base_params, input_ids_bt, attention_mask_bt, *, chunk_size):
    """log π_θ − log π_base at every position [B, T]: one program, the two forward passes back to back."""
    logp = _sequence_logprobs(graphdef, params, input_ids_bt, attention_mask_bt, chunk_size)
    return logp - _sequence_logprobs(graphdef, base_params, input_ids_bt, attention_mask_bt, chunk_size)


def kl_sequence_length(prompt_bucket: int, max_new_tokens: int) -> int:
    """Tokens per row of the KL program: a prompt bucket plus the responses, rounded like the update's rows,
    so that every evaluation (and the dry run) uses one shape."""
    return length_bucket(prompt_bucket + max_new_tokens)


def lower_kl_program(graphdef: nnx.GraphDef, params, base_params, input_ids_bt, attention_mask_bt, *,
                     chunk_size: int | None = None, platform: str | None = None):
    """Lower (abstract arguments allowed) the program `kl_to_base` runs after sampling; `platform` ("cuda",
    "tpu"): for that backend instead of this machine's."""
    args = (graphdef, params, base_params, input_ids_bt, attention_mask_bt)
    return parallel.lower_for(_log_ratio, *args, chunk_size=chunk_size, platform=platform)


KL_ESTIMATOR = "k3"  # the estimator kl_to_base reports, named in every eval record


def k3(log_ratio):
    """k3 = exp(−d) − 1 + d of log-ratios d = log π_θ − log π_base, in float64: ≥ 0 term by term, with
    expectation KL(π_θ ‖ π_base) under π_θ (`rl.losses`' KL penalty uses the same estimator)."""
    d = np.asarray(log_ratio, np.float64)
    return np.maximum(np.expm1(-d) + d, 0.0)  # expm1: exact near d = 0, where k3 ≈ d²/2


def kl_to_base(sampler: Sampler, graphdef: nnx.GraphDef, params: nnx.State, base_params: nnx.State,
               tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 256, seed: int = 0,
               chunk_size: int | None = None) -> float:
    """Token-level KL(π_θ ‖ π_base) on responses sampled from π_θ (temperature 1) to `prompt_ids`: the mean
    of the k3 estimator over response tokens, never negative. The device program (`lower_kl_program`, which
    the plan compiles) returns the log-ratios; k3 is taken on the host in float64.

    `base_params` may be held in another dtype (the run keeps the frozen base in the compute dtype): the
    model casts every weight to its compute dtype either way.
    """
    if not prompt_ids:
        raise ValueError("kl_to_base: no held-out prompts")
    sampler.set_params(params)
    out = sampler.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                           stop_token_ids=_stops(tokenizer), pad_id=_pad(tokenizer))
    batch = build_rollouts(prompt_ids, out.tokens, out.logprobs, np.zeros(len(prompt_ids)),
                           pad_id=_pad(tokenizer))
    length = kl_sequence_length(bucket_length(max(len(p) for p in prompt_ids)), max_new_tokens)
    pad = [(0, 0), (0, length - batch.input_ids.shape[1])]
    ids, mask = np.pad(batch.input_ids, pad), np.pad(batch.attention_mask, pad)
    mesh = parallel.mesh_of(params)
    if mesh is None:
        diff = _log_ratio(graphdef, params, base_params, ids, mask, chunk_size=chunk_size)
    else:
        rows = -(-len(ids) // parallel.batch_size_multiple(mesh)) * parallel.batch_size_multiple(mesh)
        ids, mask = (np.pad(x, [(0, rows - len(x)), (0, 0)]) for x in (ids, mask))
        with jax.set_mesh(mesh):
            ids, mask = parallel.shard_batch((ids, mask), mesh)
            diff = _log_ratio(graphdef, params, base_params, ids, mask, chunk_size=chunk_size)
    # position t predicts token t+1, so the loss mask shifts left by one
    loss_mask = np.pad(batch.loss_mask, pad)
    response = np.concatenate([loss_mask[:, 1:], np.zeros_like(loss_mask[:, :1])], axis=1)
    per_token = k3(parallel.to_host(diff)[:len(response)])
    return float((per_token * response).sum() / max(response.sum(), 1.0))



def _stops(tokenizer) -> list[int]:
    return list(default_stop_token_ids(tokenizer))


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def evaluate_run(runner: FSTRunner, task_name: str) -> dict[str, Any]:
    c, t0 = runner.config, time.perf_counter()
    runner.sampler.set_params(runner.state.params)
    record: dict[str, Any] = {}
    forgetting = [n.strip() for n in str(c.forgetting_tasks).split(",") if n.strip()]
    for name in [task_name] + [n for n in forgetting if n != task_name]:
        problems = runner.val[name][: c.eval.num_problems or None]
        if not problems:
            continue
        prompts = {"best": runner.population[0], "seed": c.gepa.seed_prompt} if name == task_name \
            else {"seed": c.gepa.seed_prompt}
        for label, prompt in prompts.items():
            r = mean_at_k(runner.sampler, runner.tokenizer, runner.tasks[name], problems, prompt, k=c.eval.k,
                                temperature=c.eval.temperature, top_p=c.eval.top_p,
                                max_new_tokens=c.eval.max_new_tokens,
                                seed=derive_seed(c.seed, runner.counters.rl_steps, 4),
                                enable_thinking=c.model.enable_thinking)
            record.update({f"{name}/{label}/{k}": v for k, v in r.items()})
            if name == task_name:  # the headline numbers, under the names launch/plot.py draws
                record["val/reward" if label == "best" else "val/reward_seed"] = r["mean_at_k"]
            elif label == "seed":
                record[f"forgetting/{name}"] = r["mean_at_k"]
    if c.eval.kl_prompts and runner.val[task_name]:
        # kl_to_base under the seed prompt, the same conditioning for every method (what compare.py and
        # plot.py set against reward); kl_to_base_best under the population's best prompt.
        held_out = runner.val[task_name][: c.eval.kl_prompts]
        record["kl_estimator"] = KL_ESTIMATOR
        for key, prompt in (("kl_to_base", c.gepa.seed_prompt), ("kl_to_base_best", runner.population[0])):
            if key == "kl_to_base_best" and prompt == c.gepa.seed_prompt:
                record[key] = record["kl_to_base"]
                continue
            ids = render_prompts(runner.tokenizer, runner.tasks[task_name], held_out, prompt,
                                       c.model.enable_thinking)
            record[key] = kl_to_base(runner.sampler, runner.graphdef, runner.state.params, runner.base_params,
                                           runner.tokenizer, ids, max_new_tokens=c.eval.kl_max_new_tokens,
                                           seed=derive_seed(c.seed, runner.counters.rl_steps, 5),
                                           chunk_size=c.rl.logprob_chunk_size)
    runner.counters.time_eval += time.perf_counter() - t0
    record.update(dataclasses.asdict(runner.counters),
                  total_rollouts=runner.counters.rl_rollouts + runner.counters.gepa_rollouts)
    runner.metrics.write(runner.counters.rl_steps, "eval", record, task=task_name)
    return record
