"""The FST cycle loop (README "Training"); methods `fst`, `rl` and `gepa` share it.

Each cycle looks ahead at the next T batches of problems (the window). `fst` and `gepa` first run GEPA on that
window, seeded with the current population, and take the top-K of its Pareto front as the new population;
`fst` and `rl` then run T coupled `fst_step`s on exactly those batches (`rl` with the seed prompt as a
population of one; `gepa` leaves the weights frozen). Evaluations run on cycle ends every `eval.every` steps;
a checkpoint of everything (params, optimizer, RNG, population, GEPA lineage, data streams, counters) is
written at cycle ends, so a killed run resumes at its last cycle boundary and continues exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from fst_jax import distributed, evals, parallel, run_shapes
from fst_jax.checkpoint import Checkpointer, abstract_like
from fst_jax.config import parse_schedule, validate
from fst_jax.data import ProblemStream, configured_problems
from fst_jax.gepa import EvalResult, GEPAConfig, GEPAEngine, ReflectionLMError, reflection_lm_from_config
from fst_jax.metrics import MetricsWriter, progress, read_metrics
from fst_jax.models.hf import load_pretrained, load_tokenizer, render_chat
from fst_jax.rl.step import TrainState, fst_step, rl_config_from_run
from fst_jax.rollout_reuse import RolloutPool
from fst_jax.run_sampler import SharedSampler
from fst_jax.sampling import Sampler
from fst_jax.tasks import get_task
from fst_jax.tasks.base import RewardError, checked_score

log = logging.getLogger("fst_jax")
COMPONENT = "system_prompt"


@dataclasses.dataclass
class Counters:
    """Run totals, saved with every checkpoint."""

    rl_steps: int = 0
    rl_rollouts: int = 0
    gepa_rollouts: int = 0
    reflection_calls: int = 0
    reflection_failures: int = 0
    consecutive_reflection_failures: int = 0  # carried across cycles: an endpoint down for good stops the run
    cycles: int = 0
    time_gepa: float = 0.0
    time_sampling: float = 0.0
    time_update: float = 0.0
    time_rl_sampling: float = 0.0  # the RL steps' share of time_sampling (the rest: GEPA's and reflection's)
    time_eval: float = 0.0


def _seed(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (no Python hash randomisation)."""
    key = jax.random.PRNGKey(0)
    for p in parts:
        key = jax.random.fold_in(key, int(p) % (2**31))
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def _in_dtype(params, dtype):
    """A copy of `params` in `dtype` with the same shardings (the same arrays when already in it)."""
    target = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x if x.dtype == target else x.astype(target), params)


def _plain(x) -> dict:
    """A ConfigDict / dict / None as a plain dict."""
    if x is None:
        return {}
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


class FSTRunner:
    """Builds everything a run needs from the config and runs (or resumes) it in `workdir`."""

    def __init__(self, config, workdir: str):
        validate(config)
        self.config, self.workdir = config, os.path.abspath(os.path.expanduser(workdir))
        os.makedirs(self.workdir, exist_ok=True)
        # Before the weights load: a hosted reflector that cannot be reached fails now, in one line.
        self.reflection_lm = self._make_reflection_lm()
        if config.gepa.reflection.kind != "local":  # a hosted LM: process 0 asks, every process adopts its reply
            self.reflection_lm = distributed.OneReplyForAll(self.reflection_lm)
        if hasattr(self.reflection_lm, "preflight"):
            self.reflection_lm.preflight()
        self.mesh = parallel.make_mesh(run_shapes.mesh_config(config))
        checkpoint = os.path.expanduser(config.model.path)
        model = load_pretrained(checkpoint, mesh=self.mesh, dtype=config.model.dtype,
                                param_dtype=config.model.param_dtype, remat=config.model.remat,
                                attention=config.model.attention)
        self.tokenizer = load_tokenizer(checkpoint)
        self.graphdef, params = nnx.split(model, nnx.Param)
        del model
        c = config
        self.rl_config = rl_config_from_run(c, sequence_length=run_shapes.update_length(c))
        self.state = TrainState.create((self.graphdef, params), self.rl_config, seed=c.seed)
        # The frozen base, held once: in the compute dtype (the model casts every weight to it anyway),
        # FSDP-sharded like the params. It serves the KL term and, swapped into the one sampler, local reflection.
        self.base_params = _in_dtype(params, config.model.dtype)
        del params
        shared = SharedSampler(Sampler((self.graphdef, self.state.params), mesh=self.mesh), run_shapes.sampler_calls(c),
                               {"policy": (c.sampling.max_prompt_tokens, "config.sampling.max_prompt_tokens"),
                                "base": (c.gepa.reflection.max_prompt_tokens,
                                         "config.gepa.reflection.max_prompt_tokens")}, loaded=self.state.params)
        self.sampler = shared.view("policy", self.state.params)
        self.base_sampler = shared.view("base", self.base_params)

        self.schedule = parse_schedule(c)
        self.tasks, self.val, self.streams = {}, {}, {}
        names = {n for n, _ in self.schedule} | {n.strip() for n in str(c.forgetting_tasks).split(",") if n.strip()}
        for name in sorted(names):
            spec = c.tasks[name]
            task = get_task(spec.get("task", name), **_plain(spec.get("options")))
            train, val = configured_problems(name, spec, task, seed=c.seed,
                                             generated_seeds=(_seed(c.seed, 11), _seed(c.seed, 12)))
            self.tasks[name], self.val[name] = task, val
            self.streams[name] = ProblemStream(train, c.cycle.problems_per_step, seed=_seed(c.seed, len(train)))
        self.population = [c.gepa.seed_prompt]
        # GEPA's rollouts of this cycle for `cycle.reuse_gepa_rollouts`; refilled by every fast phase, so a run
        # resumed at a cycle boundary refills it with the same ones
        self.reuse_pool = RolloutPool(c.cycle.reuse_max_staleness)
        self.current_task = self.schedule[0][0]
        self.counters = Counters()

        self.checkpointer = Checkpointer(self.workdir, max_to_keep=c.checkpoint.max_to_keep,
                                         async_save=c.checkpoint.async_save)
        resumed = self._restore()
        if not resumed and c.init_from:
            self._init_from(c.init_from)
        self.metrics = MetricsWriter(self.workdir, resume_step=self.counters.rl_steps if resumed else -1,
                                     tensorboard=c.log.tensorboard)
        self.metrics.write(self.counters.rl_steps, "config", method=c.method, resumed=bool(resumed),
                           devices=jax.device_count(), mesh=dict(self.mesh.shape))

    # ---- the loop -------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run to `total_steps`; returns the last evaluation record (for a run that had already finished, the
        last one in its metrics.jsonl, and `already_finished` is True). A `RewardError` leaves with the step
        it happened at; the checkpoints written before stay as they are."""
        c = self.config
        total = int(c.total_steps)
        bar = progress(total=total, initial=self.counters.rl_steps, desc=f"{c.method} steps",
                       enabled=None if c.log.progress else False)
        last_eval: dict[str, Any] = {}
        last_eval_step = self.counters.rl_steps if self.counters.rl_steps else -1
        self.already_finished = self.counters.rl_steps >= total
        if self.already_finished:  # the same command rerun after the end: report, do not redo
            bar.close()
            self.checkpointer.close()
            self.metrics.close()
            return self.last_evaluation()
        try:
            if self.counters.rl_steps == 0 and c.eval.at_start:  # the base model's numbers, for every curve
                last_eval = self._evaluate(self._stage(0)[0])
            while self.counters.rl_steps < total:
                task_name, steps_left_in_stage = self._stage(self.counters.rl_steps)
                if task_name != self.current_task:
                    # Continual learning: the population carries over, so GEPA finds out by itself that the
                    # task changed; `reset_on_task_switch` restarts from the task-agnostic seed (ablation).
                    self.current_task = task_name
                    if c.gepa.reset_on_task_switch:
                        self.population = [c.gepa.seed_prompt]
                steps = min(int(c.cycle.rl_steps), steps_left_in_stage, total - self.counters.rl_steps)
                stream = self.streams[task_name]
                window = stream.window(steps)
                if c.method in ("fst", "gepa"):
                    self._fast_phase(task_name, window)
                for _ in range(steps):
                    batch = stream.next_batch()
                    if c.method != "gepa":
                        self._slow_step(task_name, batch)
                    self.counters.rl_steps += 1
                    bar.update(1)
                self.counters.cycles += 1
                step = self.counters.rl_steps
                distributed.check_same(f"the end of cycle {self.counters.cycles} (RL step {step})",
                                       population=self.population, data_cursor=stream.get_state())
                # at the end, and with eval.every > 0 every eval.every steps and at the end of each stage of a
                # continual schedule (the final accuracy on the task it leaves)
                stage_ends = bool(c.eval.every) and steps == steps_left_in_stage and len(self.schedule) > 1
                if step == total or stage_ends or (c.eval.every and step - max(last_eval_step, 0) >= c.eval.every):
                    last_eval, last_eval_step = self._evaluate(task_name), step
                if self.counters.cycles % c.checkpoint.every_cycles == 0 or step == total:
                    self._save()
        except RewardError as e:
            if e.step is None:  # the step in progress (GEPA's search serves the next RL step)
                e.step = self.counters.rl_steps + 1
            raise
        finally:
            bar.close()
            self.checkpointer.close()
            self.metrics.close()
        return last_eval

    def last_evaluation(self) -> dict[str, Any]:
        """The newest "eval" record of this workdir's metrics.jsonl ({} when there is none)."""
        path = os.path.join(self.workdir, "metrics.jsonl")
        if not os.path.isfile(path):
            return {}
        evals_ = [r for r in read_metrics(path) if r.get("kind") == "eval"]
        return evals_[-1] if evals_ else {}

    def _stage(self, step: int) -> tuple[str, int]:
        start = 0
        for name, steps in self.schedule:
            if step < start + steps:
                return name, start + steps - step
            start += steps
        return self.schedule[-1][0], int(self.config.total_steps) - step

    # ---- fast weights -----------------------------------------------------------------------------------

    def _fast_phase(self, task_name: str, window: list[list[Mapping[str, Any]]]) -> None:
        """GEPA on the window, seeded with the population; the new population is the search's Pareto front.

        Budget (`gepa.budget_rollouts` metric calls, a hard cap per cycle): the carried-over population shares
        `gepa.seed_scoring_passes` passes over the window (each seed scored on the same subset of problems when
        K passes would cost more), so the rest buys proposals — minibatch rollouts of parents and children —
        and full window evaluations of the accepted children. At the recipe's numbers (window 192, budget
        960) the seeds cost 192 rollouts for K = 4 and K = 8 alike, leaving 768 for proposals.
        """
        c, t0 = self.config, time.perf_counter()
        items = [problem for batch in window for problem in batch]  # ids = window positions (repeats allowed)
        task = self.tasks[task_name]
        self.sampler.set_params(self.state.params)
        self.reuse_pool.reset(self.counters.rl_steps)
        calls = [0]
        # Sampling seeds derive from (cycle, call number within this cycle's search): a resumed run, which
        # restarts the cycle's search from its checkpoint at the cycle boundary, draws the same ones.
        self._reflection_calls_in_cycle = 0

        def evaluate(pairs, capture_traces):
            users = [task.format_problem(item) for _, item in pairs]
            prompts = [render_chat(self.tokenizer, [{"role": "system", "content": cand[COMPONENT]},
                                                    {"role": "user", "content": user}],
                                   enable_thinking=c.model.enable_thinking) for (cand, _), user in zip(pairs, users)]
            calls[0] += 1
            out = self._generate(self.sampler, prompts, temperature=c.sampling.temperature,
                                 seed=_seed(c.seed, self.counters.cycles, calls[0], 1))
            if c.cycle.reuse_gepa_rollouts:  # sampled at this cycle's weights: RL rollouts of the same pairs
                self.reuse_pool.add(prompts, out)
            results = []
            for (_, item), user, toks in zip(pairs, users, out.tokens):
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                s = checked_score(task, item, text, task_name=task_name)
                results.append(EvalResult(score=s.reward, output=text, feedback=s.feedback,
                                          trace={"inputs": user}))
            return results

        gepa_config = GEPAConfig.from_config(
            c, window_size=len(items), seed=_seed(c.seed, self.counters.cycles, 2),
            output_dir=os.path.join(self.workdir, "gepa", f"cycle_{self.counters.cycles:05d}")
            if jax.process_index() == 0 else None)
        # logged at the first RL step this population serves: a resume from the checkpoint at the cycle
        # boundary (step rl_steps) then drops the records of a search the killed run had started
        step = self.counters.rl_steps + 1
        proposals = []

        def on_event(event):
            if event.get("type") in ("proposal", "merge"):
                proposals.append(event)
                self.metrics.write(step, "gepa", {k: v for k, v in event.items() if k != "type"},
                                   event=event.get("type"), cycle=self.counters.cycles)

        engine = GEPAEngine(evaluate, self.reflection_lm, items, items, gepa_config, on_event=on_event,
                            describe_item=task.format_problem)
        engine.consecutive_reflection_failures = self.counters.consecutive_reflection_failures
        seeds = [{COMPONENT: p} for p in dict.fromkeys(self.population)]
        gepa_state = engine.init_state(seeds)
        result = engine.run(gepa_state)
        K = int(c.cycle.population_size)
        ids = result.rollout_population_ids(K, fill_with_dominated=c.gepa.population_fill == "dominated")
        population = [result.candidates[i][COMPONENT] for i in ids]
        best, front, spent = result.state.best_id(), set(result.pareto_front), result.state.calls
        made = [e for e in proposals if e.get("type") == "proposal"]
        self.metrics.write(
            step, "gepa_cycle", cycle=self.counters.cycles, stop_reason=result.stop_reason,
            candidates=len(result.candidates), front=len(front), best_window_score=result.state.aggregate(best),
            proposals=len(made), skipped_perfect=sum(e["status"] == "skipped" for e in made),
            accepted=sum(e["status"] == "accepted" for e in proposals),
            seed_scoring_calls=spent["seed"], minibatch_calls=spent["minibatch"],
            full_eval_calls=spent["full_eval"] + spent["merge"], metric_calls=result.state.metric_calls,
            population=population, population_in_front=[i in front for i in ids],
            # [prompt, share of each problem's rollouts] pairs (a list: prompts are no metric names)
            population_shares=[[p, n / K] for p, n in collections.Counter(population).items()],
            gepa_rollouts=self.counters.gepa_rollouts + result.state.metric_calls,
            reflection_calls=self.counters.reflection_calls + engine.reflection_calls,
            reflection_failures=engine.reflection_failures)
        if result.stop_reason == "reflection_failures":
            # The state stays the cycle boundary's, so a rerun (endpoint fixed) repeats this search afresh.
            self._stop_for_reflection_outage(engine)
        self.population = population
        self.counters.gepa_rollouts += result.state.metric_calls
        self.counters.reflection_calls += engine.reflection_calls
        self.counters.reflection_failures += engine.reflection_failures
        self.counters.consecutive_reflection_failures = engine.consecutive_reflection_failures
        self.counters.time_gepa += time.perf_counter() - t0

    def _stop_for_reflection_outage(self, engine: GEPAEngine) -> None:
        """Save the cycle boundary (unless it is saved already) and stop with one line saying why."""
        step = self.counters.rl_steps
        if step not in self.checkpointer.all_steps():
            self._save()
        self.checkpointer.wait()
        raise ReflectionLMError(
            f"stopped at RL step {step}: {engine.consecutive_reflection_failures} reflection calls failed in a row "
            f"(config.gepa.reflection.max_consecutive_failures={self.config.gepa.reflection.max_consecutive_failures}); "
            f"last error: {engine.last_reflection_error}. The run is saved; fix the endpoint and rerun the same "
            "command to resume")

    def _make_reflection_lm(self):
        """`config.gepa.reflection` as a reflection LM; `local` reflects with the frozen base model."""

        def generate_text(prompts, *, temperature, max_new_tokens):
            ids = [render_chat(self.tokenizer, [{"role": "user", "content": p}],
                               enable_thinking=self.config.model.enable_thinking) for p in prompts]
            self._reflection_calls_in_cycle += 1
            out = self._generate(self.base_sampler, ids, temperature=temperature, max_new_tokens=max_new_tokens,
                                 seed=_seed(self.config.seed, self.counters.cycles, self._reflection_calls_in_cycle, 3))
            return [(self.tokenizer.decode(t, skip_special_tokens=True), f) for t, f in zip(out.tokens, out.finished)]

        return reflection_lm_from_config(self.config.gepa.reflection, generate_text=generate_text)

    # ---- slow weights -------------------------------------------------------------------------------

    def _generate(self, sampler, prompts, *, temperature, seed, max_new_tokens=None, num_samples=1, top_p=None,
                  call_kind=""):
        c, t0 = self.config, time.perf_counter()
        out = sampler.generate(prompts, max_new_tokens=max_new_tokens or c.sampling.max_new_tokens, call_kind=call_kind,
                               temperature=temperature, top_p=c.sampling.top_p if top_p is None else top_p,
                               top_k=c.sampling.top_k, seed=seed, num_samples=num_samples,
                               stop_token_ids=[t for t in (self.tokenizer.eos_token_id,) if t is not None],
                               pad_id=self.tokenizer.pad_token_id or 0)
        self.counters.time_sampling += time.perf_counter() - t0
        return out

    def _slow_step(self, task_name: str, batch) -> None:
        task, t0 = self.tasks[task_name], time.perf_counter()
        sampling_before = self.counters.time_sampling

        reused = [0]

        def generate(graphdef, params, prompts, **kwargs):
            def sample(prompts, num_samples, rest=False):
                self.sampler.set_params(params)
                return self._generate(self.sampler, prompts, temperature=kwargs["temperature"], seed=kwargs["seed"],
                                      max_new_tokens=kwargs["max_new_tokens"], num_samples=num_samples,
                                      call_kind="reuse" if rest else "")

            if not (self.config.cycle.reuse_gepa_rollouts and self.config.method == "fst"):
                return sample(prompts, kwargs["num_samples"])
            out, reused[0] = self.reuse_pool.generate(prompts, kwargs["num_samples"], self.counters.rl_steps, sample)
            return out

        self.state, m = fst_step(self.state, self.population, batch, tokenizer=self.tokenizer,
                                 reward_fn=lambda p, text: checked_score(task, p, text, task_name=task_name),
                                 base_params=self.base_params, config=self.rl_config, generate=generate,
                                 user_message=task.format_problem)
        m["optimizer_step"] = m.pop("step")
        m["rollouts_this_step"] = len(batch) * self.rl_config.rollouts_per_problem
        m["reused_rollouts"] = reused[0]
        self.counters.rl_rollouts += len(batch) * self.rl_config.rollouts_per_problem
        sampled = self.counters.time_sampling - sampling_before
        self.counters.time_rl_sampling += sampled
        self.counters.time_update += time.perf_counter() - t0 - sampled
        self.metrics.write(self.counters.rl_steps + 1, "train", m, task=task_name,
                           **{"train/reward": m["reward_mean"]}, **dataclasses.asdict(self.counters),
                           total_rollouts=self.counters.rl_rollouts + self.counters.gepa_rollouts)

    # ---- evaluation -----------------------------------------------------------------------------------

    def _evaluate(self, task_name: str) -> dict[str, Any]:
        c, t0 = self.config, time.perf_counter()
        self.sampler.set_params(self.state.params)
        record: dict[str, Any] = {}
        forgetting = [n.strip() for n in str(c.forgetting_tasks).split(",") if n.strip()]
        for name in [task_name] + [n for n in forgetting if n != task_name]:
            problems = self.val[name][: c.eval.num_problems or None]
            if not problems:
                continue
            prompts = {"best": self.population[0], "seed": c.gepa.seed_prompt} if name == task_name \
                else {"seed": c.gepa.seed_prompt}
            for label, prompt in prompts.items():
                r = evals.mean_at_k(self.sampler, self.tokenizer, self.tasks[name], problems, prompt, k=c.eval.k,
                                    temperature=c.eval.temperature, top_p=c.eval.top_p,
                                    max_new_tokens=c.eval.max_new_tokens,
                                    seed=_seed(c.seed, self.counters.rl_steps, 4),
                                    enable_thinking=c.model.enable_thinking)
                record.update({f"{name}/{label}/{k}": v for k, v in r.items()})
                if name == task_name:  # the headline numbers, under the names launch/plot.py draws
                    record["val/reward" if label == "best" else "val/reward_seed"] = r["mean_at_k"]
                elif label == "seed":
                    record[f"forgetting/{name}"] = r["mean_at_k"]
        if c.eval.kl_prompts and self.val[task_name]:
            # kl_to_base under the seed prompt, the same conditioning for every method (what compare.py and
            # plot.py set against reward); kl_to_base_best under the population's best prompt.
            held_out = self.val[task_name][: c.eval.kl_prompts]
            for key, prompt in (("kl_to_base", c.gepa.seed_prompt), ("kl_to_base_best", self.population[0])):
                if key == "kl_to_base_best" and prompt == c.gepa.seed_prompt:
                    record[key] = record["kl_to_base"]
                    continue
                ids = evals.render_prompts(self.tokenizer, self.tasks[task_name], held_out, prompt,
                                           c.model.enable_thinking)
                record[key] = evals.kl_to_base(self.sampler, self.graphdef, self.state.params, self.base_params,
                                               self.tokenizer, ids, max_new_tokens=c.eval.kl_max_new_tokens,
                                               seed=_seed(c.seed, self.counters.rl_steps, 5),
                                               chunk_size=c.rl.logprob_chunk_size)
        self.counters.time_eval += time.perf_counter() - t0
        record.update(dataclasses.asdict(self.counters),
                      total_rollouts=self.counters.rl_rollouts + self.counters.gepa_rollouts)
        self.metrics.write(self.counters.rl_steps, "eval", record, task=task_name)
        return record

    # ---- checkpoints ----------------------------------------------------------------------------------

    def _arrays(self) -> dict[str, Any]:
        s = self.state
        return {"params": s.params, "opt_state": s.opt_state, "step": s.step, "rng": s.rng,
                "num_rollouts": s.num_rollouts}

    def _restore_target(self) -> dict[str, Any]:
        """Restore targets with the current shardings; scalars replicated over the mesh (fresh ones are
        uncommitted single-device arrays, which a restore would pin to one device)."""
        target = abstract_like(self._arrays())
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        for key in ("step", "rng", "num_rollouts"):
            target[key] = jax.ShapeDtypeStruct(target[key].shape, target[key].dtype, sharding=replicated)
        return target

    def _save(self) -> None:
        meta = {"population": self.population, "current_task": self.current_task,
                "counters": dataclasses.asdict(self.counters)}
        data = {name: stream.get_state() for name, stream in self.streams.items()}
        self.checkpointer.save(self.counters.rl_steps, self._arrays(), meta=meta, data=data,
                               config=self.config.to_dict(), force=True)

    def _restore(self) -> bool:
        restored = self.checkpointer.restore_latest(self._restore_target())
        if restored is None:
            return False
        a = restored.state
        self.state = self.state.replace(params=a["params"], opt_state=a["opt_state"], step=a["step"],
                                        rng=a["rng"], num_rollouts=a["num_rollouts"])
        self.population = list(restored.meta["population"])
        self.current_task = restored.meta["current_task"]
        self.counters = Counters(**restored.meta["counters"])
        for name, state in (restored.data or {}).items():
            self.streams[name].set_state(state)
        log.info("resumed from %s at RL step %d", self.checkpointer.directory, self.counters.rl_steps)
        return True

    def _init_from(self, other_workdir: str) -> None:
        """Start from another run's latest params (fresh optimizer, counters and data): the plasticity probe."""
        other = Checkpointer(os.path.expanduser(other_workdir), read_only=True)
        try:
            restored = other.restore_latest(self._restore_target())
        finally:
            other.close()
        if restored is None:
            raise ValueError(f"config.init_from={other_workdir!r} holds no checkpoint to start from")
        fresh = TrainState.create((self.graphdef, restored.state["params"]), self.rl_config, seed=self.config.seed)
        self.state = fresh
        log.info("initialised params from %s (step %d)", other_workdir, restored.step)
