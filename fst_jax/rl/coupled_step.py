"""The coupled step of one FST cycle, on the host: `fst_step(state, population, batch, ...)` renders each
problem with the population's prompts, samples its G rollouts (split evenly over the K prompts), scores them
on the host, normalises advantages per problem over all G, then runs the jitted `update`. A population of one
prompt is the RL-only baseline.

Shape letters: P problems, G rollouts per problem, K prompts.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fst_jax.rl import losses
from fst_jax.rl.config import RLConfig
from fst_jax.rl.rollouts import build_rollouts, question_field, render_prompts, score_completions
from fst_jax.rl.policy_update import TrainState, update
from fst_jax.runtime.parallel import mesh_of
from fst_jax.sampling.chat import default_stop_token_ids

__all__ = ["fst_step", "sampler_generate"]


def sampler_generate(graphdef: nnx.GraphDef, params: nnx.State, prompts: Sequence[Sequence[int]], **kwargs):
    """Default `generate` for fst_step: `fst_jax.sampling.Sampler` on the params' mesh (sampling layout)."""
    from fst_jax.sampling import Sampler

    return Sampler((graphdef, params), mesh=mesh_of(params)).generate(prompts, **kwargs)


def fst_step(
    state: TrainState,
    prompt_population: Sequence[str],
    batch: Sequence[Mapping[str, Any]],
    *,
    tokenizer,
    reward_fn: Callable[[Mapping[str, Any], str], float],
    base_params,
    config: RLConfig | Mapping[str, Any],
    generate: Callable[..., Any] = sampler_generate,
    user_message: Callable[[Mapping[str, Any]], str] = question_field,
    stop_token_ids: Sequence[int] | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """One coupled FST step: sample with the population, score, and update the weights.

    For each problem in `batch`, its G = config.rollouts_per_problem rollouts are split evenly over the K
    prompts of `prompt_population` (G/K each, in population order — not random): the chat
    [system = prompt, user = user_message(problem)] is rendered with the tokenizer's template and sampled
    G/K times at config.temperature by `generate(graphdef, params, prompts, max_new_tokens=, temperature=,
    seed=, stop_token_ids=, num_samples=, pad_id=)` (a `SampleOutput`; default: the jitted sampler). Each
    completion, decoded without special tokens, is scored by `reward_fn(problem, text)` on the host (a float,
    or a `tasks.Score`: `reward_fn=task.score, user_message=task.format_problem` plugs in a task). The
    advantage of each rollout is normalised over all G rollouts of its problem whatever prompt produced it;
    problems whose G rewards are all equal carry no signal and are dropped. Then one `update`.

    A population of one prompt is the RL-only baseline; nothing else changes.

    Raises ValueError for an empty population or batch, K not dividing G, or a NaN/inf reward (naming the
    problem). Returns (state, metrics as Python floats): reward_mean, reward_std, reward_prompt_{k},
    response_length, response_truncated_fraction (hit max_new_tokens), groups_kept_fraction, num_rollouts
    (so far), step, and every `update` metric (KL to base, entropy, importance weights, grad_norm,
    learning_rate, skipped, ...).
    """
    config = RLConfig.from_config(config)
    population = list(prompt_population) if not isinstance(prompt_population, str) else None
    if population is None:
        raise ValueError("prompt_population must be a list of prompts, not one string; wrap it: [prompt]")
    if not population:
        raise ValueError("fst_step: the prompt population is empty; the RL-only baseline is a population of one")
    group = config.rollouts_per_problem
    if group % len(population):
        raise ValueError(f"fst_step: the population has K = {len(population)} prompts, which does not divide "
                         f"rollouts_per_problem G = {group}; each prompt gets G/K rollouts of every problem")
    if len(batch) == 0:
        raise ValueError("fst_step: the batch of problems is empty")
    per_prompt, num_problems = group // len(population), len(batch)

    prompt_ids = render_prompts(tokenizer, population, batch, user_message=user_message,
                                enable_thinking=config.enable_thinking)
    if stop_token_ids is None:
        stop_token_ids = default_stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng, sample_key = jax.random.split(state.rng)
    seed = int(jax.random.randint(sample_key, (), 0, np.iinfo(np.int32).max))
    samples = generate(state.graphdef, state.params, prompt_ids, max_new_tokens=config.max_new_tokens,
                       temperature=config.temperature, seed=seed, stop_token_ids=list(stop_token_ids),
                       num_samples=per_prompt, pad_id=pad_id)
    if len(samples.tokens) != num_problems * group:
        raise ValueError(f"generate returned {len(samples.tokens)} completions for {num_problems} problems × "
                         f"{group} rollouts")
    rewards_pg = score_completions(tokenizer, batch, samples.tokens, reward_fn, per_prompt=per_prompt)
    advantages_pg, valid_p = losses.group_advantages(jnp.asarray(rewards_pg, jnp.float32))
    advantages_pg, valid_p = np.asarray(advantages_pg), np.asarray(valid_p)

    rollouts = build_rollouts([prompt_ids[row // per_prompt] for row in range(num_problems * group)],
                              samples.tokens, samples.logprobs, advantages_pg.reshape(-1),
                              keep=np.repeat(valid_p, group), pad_id=pad_id)
    state = state.replace(rng=rng, num_rollouts=state.num_rollouts + num_problems * group)
    state, update_metrics = update(state, base_params, rollouts, config)

    lengths = np.array([len(t) for t in samples.tokens], np.float64)
    rewards_pkg = rewards_pg.reshape(num_problems, len(population), per_prompt)
    metrics = {name: float(value) for name, value in jax.device_get(update_metrics).items()}
    metrics.update(
        reward_mean=float(rewards_pg.mean()), reward_std=float(rewards_pg.std()),
        **{f"reward_prompt_{k}": float(rewards_pkg[:, k].mean()) for k in range(len(population))},
        response_length=float(lengths.mean()),
        response_truncated_fraction=float(np.mean([not f for f in samples.finished])),
        groups_kept_fraction=float(valid_p.mean()),
        num_rollouts=float(state.num_rollouts), step=float(state.step))
    return state, metrics
