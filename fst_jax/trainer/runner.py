"""The FST cycle loop; methods `fst`, `rl` and `gepa` share it. `FSTRunner.run` reads top-down: fast phase
(`fast_phase.py`), slow phase (`_slow_step` → `rl.fst_step`), evaluate (`evals.evaluate_run`), save
(`run_state.save`).

Each cycle looks ahead at the next T batches of problems (the window). `fst` and `gepa` first run GEPA on that
window, seeded with the current population, and take the top-K of its Pareto front as the new population;
`fst` and `rl` then run T coupled `fst_step`s on exactly those batches (`rl` with the seed prompt as a
population of one; `gepa` leaves the weights frozen). Evaluations run on cycle ends every `eval.every` steps;
a checkpoint of everything (params, optimizer, RNG, population, GEPA lineage, data streams, counters) is
written at cycle ends, so a killed run resumes at its last cycle boundary and continues exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
from flax import nnx

from fst_jax.config import parse_schedule, validate
from fst_jax.data import ProblemStream, configured_problems
from fst_jax.models.hf import load_pretrained, load_tokenizer
from fst_jax.rl import TrainState, fst_step, rl_config_from_run
from fst_jax.runtime import distributed, parallel
from fst_jax.runtime.checkpoint import Checkpointer
from fst_jax.runtime.metrics import MetricsWriter, progress, read_metrics
from fst_jax.sampling import Sampler
from fst_jax.tasks import get_task
from fst_jax.tasks.base import RewardError, checked_score
from fst_jax.trainer import evals, fast_phase, run_config, run_state, shapes as run_shapes
from fst_jax.trainer.rollout_reuse import RolloutPool
from fst_jax.trainer.run_state import Counters, derive_seed, in_dtype, plain_dict
from fst_jax.sampling.chat import default_stop_token_ids
from fst_jax.trainer.shared_sampler import SharedSampler

log = logging.getLogger("fst_jax")


class FSTRunner:
    """Builds everything a run needs from the config and runs (or resumes) it in `workdir`."""

    def __init__(self, config, workdir: str, *, allow_config_change: bool = False):
        validate(config)
        # a resume may change how the run computes, not what, unless allowed (run_config.py); changes are logged
        self.allow_config_change, self.config_changes = allow_config_change, []
        self.reflection_calls_in_cycle = 0  # seeds local reflection's sampling; reset by each fast phase
        self.config, self.workdir = config, os.path.abspath(os.path.expanduser(workdir))
        os.makedirs(self.workdir, exist_ok=True)
        # Before the weights load: a hosted reflector that cannot be reached fails now, in one line.
        self.reflection_lm = fast_phase.make_reflection_lm(self)
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
        self.base_params = in_dtype(params, config.model.dtype)
        del params
        sampler = Sampler((self.graphdef, self.state.params), mesh=self.mesh, slots=run_shapes.sampler_slots(c, self.mesh),
                          draw=c.sampling.draw, prefill_scores_mb=c.sampling.prefill_scores_mb)
        shared = SharedSampler(sampler, {"policy": (c.sampling.max_prompt_tokens, "config.sampling.max_prompt_tokens"),
                                "base": (c.gepa.reflection.max_prompt_tokens,
                                         "config.gepa.reflection.max_prompt_tokens")}, loaded=self.state.params)
        self.sampler = shared.view("policy", self.state.params)
        self.base_sampler = shared.view("base", self.base_params)

        self.schedule = parse_schedule(c)
        self.tasks, self.val, self.streams = {}, {}, {}
        names = {n for n, _ in self.schedule} | {n.strip() for n in str(c.forgetting_tasks).split(",") if n.strip()}
        for name in sorted(names):
            spec = c.tasks[name]
            task = get_task(spec.get("task", name), **plain_dict(spec.get("options")))
            train, val = configured_problems(name, spec, task, seed=c.seed,
                                             generated_seeds=(derive_seed(c.seed, 11), derive_seed(c.seed, 12)))
            self.tasks[name], self.val[name] = task, val
            self.streams[name] = ProblemStream(train, c.cycle.problems_per_step, seed=derive_seed(c.seed, len(train)))
        self.population = [c.gepa.seed_prompt]
        # GEPA's rollouts of this cycle for `cycle.reuse_gepa_rollouts`; refilled by every fast phase, so a run
        # resumed at a cycle boundary refills it with the same ones
        self.reuse_pool = RolloutPool(c.cycle.reuse_max_staleness)
        self.current_task = self.schedule[0][0]
        self.counters = Counters()

        self.checkpointer = Checkpointer(self.workdir, max_to_keep=c.checkpoint.max_to_keep,
                                         async_save=c.checkpoint.async_save)
        resumed = run_state.restore(self)
        if not resumed and c.init_from:
            run_state.init_from(self, c.init_from)
        run_config.write_config_json(self.workdir, c, resumed_at_step=self.counters.rl_steps if resumed else None,
                                     changes=self.config_changes)
        self.metrics = MetricsWriter(self.workdir, resume_step=self.counters.rl_steps if resumed else -1,
                                     tensorboard=c.log.tensorboard, wandb=c.log.get("wandb"), run_config=c)
        changed = {"config_changes": self.config_changes} if self.config_changes else {}
        self.metrics.write(self.counters.rl_steps, "config", method=c.method, resumed=bool(resumed),
                           devices=jax.device_count(), mesh=dict(self.mesh.shape), **changed)

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
                last_eval = evals.evaluate_run(self, self._stage(0)[0])
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
                    fast_phase.run_fast_phase(self, task_name, window)
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
                    last_eval, last_eval_step = evals.evaluate_run(self, task_name), step
                if self.counters.cycles % c.checkpoint.every_cycles == 0 or step == total:
                    run_state.save(self)
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

    # ---- slow weights -------------------------------------------------------------------------------

    def generate(self, sampler, prompts, *, temperature, seed, max_new_tokens=None, num_samples=1, top_p=None,
                 release=False):
        c, t0 = self.config, time.perf_counter()
        out = sampler.generate(prompts, max_new_tokens=max_new_tokens or c.sampling.max_new_tokens, release=release,
                               temperature=temperature, top_p=c.sampling.top_p if top_p is None else top_p,
                               top_k=c.sampling.top_k, seed=seed, num_samples=num_samples,
                               stop_token_ids=default_stop_token_ids(self.tokenizer),
                               pad_id=self.tokenizer.pad_token_id or 0)
        self.counters.time_sampling += time.perf_counter() - t0
        return out

    def _slow_step(self, task_name: str, batch) -> None:
        task, t0 = self.tasks[task_name], time.perf_counter()
        sampling_before = self.counters.time_sampling

        reused = [0]
        stats = self.sampler.shared.sampler.stats
        useful, row_steps = stats.useful_tokens, stats.row_steps

        def generate(graphdef, params, prompts, **kwargs):
            def sample(prompts, num_samples, rest=False):
                self.sampler.set_params(params)
                return self.generate(self.sampler, prompts, temperature=kwargs["temperature"], seed=kwargs["seed"],
                                      max_new_tokens=kwargs["max_new_tokens"], num_samples=num_samples,
                                      release=True)

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
        # the rollouts' share of decode row-steps that produced a token (the engine's row utilisation)
        m["sampler_utilisation"] = (stats.useful_tokens - useful) / max(stats.row_steps - row_steps, 1)
        self.counters.rl_rollouts += len(batch) * self.rl_config.rollouts_per_problem
        sampled = self.counters.time_sampling - sampling_before
        self.counters.time_rl_sampling += sampled
        self.counters.time_update += time.perf_counter() - t0 - sampled
        self.metrics.write(self.counters.rl_steps + 1, "train", m, task=task_name,
                           **{"train/reward": m["reward_mean"]}, **dataclasses.asdict(self.counters),
                           total_rollouts=self.counters.rl_rollouts + self.counters.gepa_rollouts)

