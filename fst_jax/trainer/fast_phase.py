"""The fast phase of a cycle: one GEPA search over the look-ahead window, seeded with the current population;
the top-K of its Pareto front become the next population. Also the run's reflection LM (`local`: the frozen
base model through the run's sampler; a hosted one otherwise) and the stop when it fails too often."""

from __future__ import annotations

import collections
import os
import time
from typing import TYPE_CHECKING, Any, Mapping

import jax

from fst_jax.gepa import EvalResult, GEPAConfig, GEPAEngine, ReflectionLMError, reflection_lm_from_config
from fst_jax.models.hf import render_chat
from fst_jax.tasks.base import checked_score
from fst_jax.trainer import run_state
from fst_jax.trainer.run_state import COMPONENT, derive_seed

if TYPE_CHECKING:
    from fst_jax.trainer.runner import FSTRunner


def run_fast_phase(runner: FSTRunner, task_name: str, window: list[list[Mapping[str, Any]]]) -> None:
    """GEPA on the window, seeded with the population; the new population is the search's Pareto front.

    Budget (`gepa.budget_rollouts` metric calls, a hard cap per cycle): the carried-over population shares
    `gepa.seed_scoring_passes` passes over the window (each seed scored on the same subset of problems when
    K passes would cost more), so the rest buys proposals — minibatch rollouts of parents and children —
    and full window evaluations of the accepted children. At the recipe's numbers (window 192, budget
    960) the seeds cost 192 rollouts for K = 4 and K = 8 alike, leaving 768 for proposals.
    """
    c, t0 = runner.config, time.perf_counter()
    items = [problem for batch in window for problem in batch]  # ids = window positions (repeats allowed)
    task = runner.tasks[task_name]
    runner.sampler.set_params(runner.state.params)
    runner.reuse_pool.reset(runner.counters.rl_steps)
    calls = [0]
    # Sampling seeds derive from (cycle, call number within this cycle's search): a resumed run, which
    # restarts the cycle's search from its checkpoint at the cycle boundary, draws the same ones.
    runner.reflection_calls_in_cycle = 0

    def evaluate(pairs, capture_traces):
        users = [task.format_problem(item) for _, item in pairs]
        prompts = [render_chat(runner.tokenizer, [{"role": "system", "content": cand[COMPONENT]},
                                                {"role": "user", "content": user}],
                               enable_thinking=c.model.enable_thinking) for (cand, _), user in zip(pairs, users)]
        calls[0] += 1
        out = runner.generate(runner.sampler, prompts, temperature=c.sampling.temperature,
                             seed=derive_seed(c.seed, runner.counters.cycles, calls[0], 1))
        if c.cycle.reuse_gepa_rollouts:  # sampled at this cycle's weights: RL rollouts of the same pairs
            runner.reuse_pool.add(prompts, out)
        results = []
        for (_, item), user, toks in zip(pairs, users, out.tokens):
            text = runner.tokenizer.decode(toks, skip_special_tokens=True)
            s = checked_score(task, item, text, task_name=task_name)
            results.append(EvalResult(score=s.reward, output=text, feedback=s.feedback,
                                      trace={"inputs": user}))
        return results

    gepa_config = GEPAConfig.from_config(
        c, window_size=len(items), seed=derive_seed(c.seed, runner.counters.cycles, 2),
        output_dir=os.path.join(runner.workdir, "gepa", f"cycle_{runner.counters.cycles:05d}")
        if jax.process_index() == 0 else None)
    # logged at the first RL step this population serves: a resume from the checkpoint at the cycle
    # boundary (step rl_steps) then drops the records of a search the killed run had started
    step = runner.counters.rl_steps + 1
    proposals = []

    def on_event(event):
        if event.get("type") in ("proposal", "merge"):
            proposals.append(event)
            runner.metrics.write(step, "gepa", {k: v for k, v in event.items() if k != "type"},
                               event=event.get("type"), cycle=runner.counters.cycles)

    engine = GEPAEngine(evaluate, runner.reflection_lm, items, items, gepa_config, on_event=on_event,
                        describe_item=task.format_problem)
    engine.consecutive_reflection_failures = runner.counters.consecutive_reflection_failures
    seeds = [{COMPONENT: p} for p in dict.fromkeys(runner.population)]
    gepa_state = engine.init_state(seeds)
    result = engine.run(gepa_state)
    K = int(c.cycle.population_size)
    ids = result.rollout_population_ids(K, fill_with_dominated=c.gepa.population_fill == "dominated",
                                        rule=c.cycle.population_rule)
    population = [result.candidates[i][COMPONENT] for i in ids]
    best, front, spent = result.state.best_id(), set(result.pareto_front), result.state.calls
    made = [e for e in proposals if e.get("type") == "proposal"]
    runner.metrics.write(
        step, "gepa_cycle", cycle=runner.counters.cycles, stop_reason=result.stop_reason,
        candidates=len(result.candidates), front=len(front), non_dominated=len(result.state.non_dominated()),
        best_window_score=result.state.aggregate(best),
        proposals=len(made), skipped_perfect=sum(e["status"] == "skipped" for e in made),
        accepted=sum(e["status"] == "accepted" for e in proposals),
        seed_scoring_calls=spent["seed"], minibatch_calls=spent["minibatch"],
        full_eval_calls=spent["full_eval"] + spent["merge"], metric_calls=result.state.metric_calls,
        population=population, population_in_front=[i in front for i in ids],
        # [prompt, share of each problem's rollouts] pairs (a list: prompts are no metric names)
        population_shares=[[p, n / K] for p, n in collections.Counter(population).items()],
        gepa_rollouts=runner.counters.gepa_rollouts + result.state.metric_calls,
        reflection_calls=runner.counters.reflection_calls + engine.reflection_calls,
        reflection_failures=engine.reflection_failures)
    if result.stop_reason == "reflection_failures":
        # The state stays the cycle boundary's, so a rerun (endpoint fixed) repeats this search afresh.
        stop_for_reflection_outage(runner, engine)
    runner.population = population
    runner.counters.gepa_rollouts += result.state.metric_calls
    runner.counters.reflection_calls += engine.reflection_calls
    runner.counters.reflection_failures += engine.reflection_failures
    runner.counters.consecutive_reflection_failures = engine.consecutive_reflection_failures
    runner.counters.time_gepa += time.perf_counter() - t0

def stop_for_reflection_outage(runner: FSTRunner, engine: GEPAEngine) -> None:
    """Save the cycle boundary (unless it is saved already) and stop with one line saying why."""
    step = runner.counters.rl_steps
    if step not in runner.checkpointer.all_steps():
        run_state.save(runner)
    runner.checkpointer.wait()
    raise ReflectionLMError(
        f"stopped at RL step {step}: {engine.consecutive_reflection_failures} reflection calls failed in a row "
        f"(config.gepa.reflection.max_consecutive_failures={runner.config.gepa.reflection.max_consecutive_failures}); "
        f"last error: {engine.last_reflection_error}. The run is saved; fix the endpoint and rerun the same "
        "command to resume")

def make_reflection_lm(runner: FSTRunner):
    """`config.gepa.reflection` as a reflection LM; `local` reflects with the frozen base model."""

    def generate_text(prompts, *, temperature, max_new_tokens):
        ids = [render_chat(runner.tokenizer, [{"role": "user", "content": p}],
                           enable_thinking=runner.config.model.enable_thinking) for p in prompts]
        runner.reflection_calls_in_cycle += 1
        out = runner.generate(runner.base_sampler, ids, temperature=temperature, max_new_tokens=max_new_tokens,
                             seed=derive_seed(runner.config.seed, runner.counters.cycles, runner.reflection_calls_in_cycle, 3))
        return [(runner.tokenizer.decode(t, skip_special_tokens=True), f) for t, f in zip(out.tokens, out.finished)]

    return reflection_lm_from_config(runner.config.gepa.reflection, generate_text=generate_text)
