"""`GEPAConfig`: the settings of one GEPA search (stops, batching, policies, budget accounting)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fst_jax.gepa.acceptance import make_acceptance
from fst_jax.gepa.selection import make_selector


@dataclass
class GEPAConfig:
    """Search settings; at least one stop condition is required. Defaults are the reference's.

    `max_seconds` counts the wall time of one `run()` call (not across resumes); all other stops read the
    saved state, so a resumed search stops where the uninterrupted one would. On multiple hosts, set
    `output_dir` and `progress_bar` on process 0 only.
    """

    max_metric_calls: int | None = None
    max_iterations: int | None = None
    max_iterations_without_improvement: int | None = None
    max_seconds: float | None = None
    proposals_per_iteration: int = 1
    minibatch_size: int = 3
    selection: str = "pareto"  # pareto | current_best | epsilon_greedy
    epsilon: float = 0.1
    acceptance: str = "strict_improvement"  # | improvement_or_equal
    component_selection: str = "round_robin"  # | all
    perfect_score: float | None = 1.0
    skip_perfect: bool = True
    use_merge: bool = False
    max_merge_invocations: int = 5
    merge_items: int = 5
    reflection_template: str | None = None
    max_text_chars: int = 20_000
    seed: int = 0
    progress_bar: bool = False
    output_dir: str | None = None  # candidates.json (lineage) and state.json, rewritten each iteration
    seed_budget: int | None = None  # rollouts the seeds share (None: every seed on every validation item)
    strict_budget: bool = False  # True: metric_calls never exceed max_metric_calls (last iteration capped)
    max_consecutive_reflection_failures: int | None = None  # stop ("reflection_failures") after this many

    def __post_init__(self) -> None:
        stops = (self.max_metric_calls, self.max_iterations, self.max_iterations_without_improvement, self.max_seconds)
        if all(s is None for s in stops):
            raise ValueError(
                "GEPAConfig needs a stop condition: set max_metric_calls (the rollout budget), max_iterations, "
                "max_iterations_without_improvement or max_seconds"
            )
        if self.proposals_per_iteration < 1 or self.minibatch_size < 1 or self.merge_items < 1:
            raise ValueError("proposals_per_iteration, minibatch_size and merge_items must be >= 1")
        if self.seed_budget is not None and self.seed_budget < 1:
            raise ValueError(f"seed_budget must be >= 1 (or None), got {self.seed_budget}")
        if self.strict_budget and self.max_metric_calls is None:
            raise ValueError("strict_budget needs max_metric_calls")
        if self.component_selection not in ("round_robin", "all"):
            raise ValueError(f"component_selection must be 'round_robin' or 'all', got {self.component_selection!r}")
        make_selector(self.selection, self.epsilon)
        make_acceptance(self.acceptance)

    @classmethod
    def from_config(cls, config: Any, *, window_size: int, seed: int, output_dir: str | None) -> GEPAConfig:
        """One FST cycle's search from the run config (`config.gepa`, an ml_collections ConfigDict).

        The budget is a hard cap (`strict_budget`), the carried-over population shares
        `gepa.seed_scoring_passes` passes over the window of `window_size` problems, and every policy
        (selection, acceptance, merge, component selection) is the config's.
        """
        g = config.gepa
        return cls(
            max_metric_calls=g.budget_rollouts, max_iterations_without_improvement=g.max_iterations_without_improvement,
            proposals_per_iteration=g.proposals_per_iteration, minibatch_size=g.minibatch_size,
            selection=g.selection, epsilon=g.epsilon, acceptance=g.acceptance,
            component_selection=g.component_selection, use_merge=g.use_merge,
            max_merge_invocations=g.max_merge_invocations, merge_items=g.merge_items,
            max_text_chars=g.max_prompt_chars, reflection_template=g.reflection_template or None,
            seed=seed, output_dir=output_dir, strict_budget=True,
            seed_budget=max(1, min(round(g.seed_scoring_passes * window_size), g.budget_rollouts)),
            max_consecutive_reflection_failures=g.reflection.max_consecutive_failures)
