"""Fast weights: a batched GEPA search over a population of prompts (pure Python; knows nothing of JAX).

    engine = GEPAEngine(evaluate, reflection_lm, trainset, valset, GEPAConfig(max_metric_calls=2000))
    state = engine.init_state({"system_prompt": "Solve the problem."})
    result = engine.run(state)            # state.to_dict() / GEPAState.from_dict() to save and resume
    prompts = result.population(4)        # top-4 Pareto-front candidates by aggregate score
"""

from fst_jax.gepa.acceptance import ImprovementOrEqual, StrictImprovement, is_perfect, make_acceptance
from fst_jax.gepa.engine import GEPAConfig, GEPAEngine, GEPAResult
from fst_jax.gepa.minibatch import EpochShuffledSampler
from fst_jax.gepa.pareto import front_candidates, pareto_multiplicities, remove_dominated
from fst_jax.gepa.proposer import DEFAULT_TEMPLATE, Proposer, extract_fenced
from fst_jax.gepa.reflection import (
    CallableReflectionLM,
    Completion,
    LocalReflectionLM,
    OpenAIReflectionLM,
    ReflectionLM,
    ReflectionLMError,
    make_reflection_lm,
    reflection_lm_from_config,
    register_reflection_lm,
)
from fst_jax.gepa.selection import CurrentBestSelector, EpsilonGreedySelector, ParetoSelector, make_selector
from fst_jax.gepa.state import (
    EvalResult,
    EvaluateFn,
    GEPAState,
    StateInvariantError,
    save_lineage,
    write_json_atomic,
)

__all__ = [
    "CallableReflectionLM", "Completion", "CurrentBestSelector", "DEFAULT_TEMPLATE", "EpochShuffledSampler",
    "EpsilonGreedySelector", "EvalResult", "EvaluateFn", "GEPAConfig", "GEPAEngine", "GEPAResult", "GEPAState",
    "ImprovementOrEqual", "LocalReflectionLM", "OpenAIReflectionLM", "ParetoSelector", "Proposer", "ReflectionLM",
    "ReflectionLMError", "StateInvariantError", "StrictImprovement", "extract_fenced", "front_candidates",
    "is_perfect", "make_acceptance", "make_reflection_lm", "make_selector", "reflection_lm_from_config", "pareto_multiplicities",
    "register_reflection_lm", "remove_dominated", "save_lineage", "write_json_atomic",
]
