"""Config plumbing: each GEPA/RL/reflection field reaches its component through one `from_config`, with
non-default values, and bad values are errors naming the field."""

from __future__ import annotations

import pytest

from fst_jax.config import default_config, validate
from fst_jax.gepa import (
    CallableReflectionLM,
    GEPAConfig,
    LocalReflectionLM,
    OpenAIReflectionLM,
    reflection_lm_from_config,
    register_reflection_lm,
)
from fst_jax.gepa.acceptance import ImprovementOrEqual
from fst_jax.gepa.engine import GEPAEngine
from fst_jax.gepa.selection import EpsilonGreedySelector
from fst_jax.rl import RLConfig
from gepa_helpers import ScriptedEvaluate, ScriptedReflection


def test_gepa_config_from_run_config_reaches_every_policy():
    c = default_config()
    g = c.gepa
    g.budget_rollouts, g.proposals_per_iteration, g.minibatch_size = 300, 3, 4
    g.selection, g.epsilon, g.acceptance, g.component_selection = "epsilon_greedy", 0.3, "improvement_or_equal", "all"
    g.use_merge, g.max_merge_invocations, g.merge_items = True, 2, 7
    g.max_iterations_without_improvement, g.max_prompt_chars, g.reflection_template = 9, 123, "T <current_text> <records>"
    g.seed_scoring_passes, g.reflection.max_consecutive_failures = 0.5, 4
    config = GEPAConfig.from_config(c, window_size=40, seed=11, output_dir=None)
    assert (config.max_metric_calls, config.proposals_per_iteration, config.minibatch_size) == (300, 3, 4)
    assert (config.selection, config.epsilon, config.acceptance, config.component_selection) == (
        "epsilon_greedy", 0.3, "improvement_or_equal", "all")
    assert (config.use_merge, config.max_merge_invocations, config.merge_items) == (True, 2, 7)
    assert (config.max_iterations_without_improvement, config.max_text_chars) == (9, 123)
    assert config.reflection_template == "T <current_text> <records>" and config.seed == 11
    assert config.seed_budget == 20 and config.strict_budget and config.max_consecutive_reflection_failures == 4
    engine = GEPAEngine(ScriptedEvaluate(), ScriptedReflection(), [1, 2], [1, 2], config)
    assert isinstance(engine.selector, EpsilonGreedySelector) and engine.selector.epsilon == 0.3
    assert isinstance(engine.acceptance, ImprovementOrEqual)


def test_reflection_lm_from_config(monkeypatch):
    r = default_config().gepa.reflection
    local = reflection_lm_from_config(r, generate_text=lambda p, **kw: [("x", True)] * len(p))
    assert isinstance(local, LocalReflectionLM) and local.max_new_tokens == r.max_new_tokens
    r.kind, r.model, r.api_key_env, r.timeout_s, r.max_retries, r.max_concurrency = "openai", "m", "", 7.0, 2, 3
    r.temperature, r.max_new_tokens = 0.2, 99
    lm = reflection_lm_from_config(r)
    assert isinstance(lm, OpenAIReflectionLM) and lm.api_key_env is None  # "" = no key
    assert (lm.timeout_s, lm.retries, lm.max_concurrency, lm.temperature, lm.max_tokens) == (7.0, 2, 3, 0.2, 99)
    r.model = ""
    with pytest.raises(ValueError, match="config.gepa.reflection.model is empty"):
        reflection_lm_from_config(r)
    register_reflection_lm("upper", lambda suffix: CallableReflectionLM(lambda ps: [p.upper() + suffix for p in ps]))
    r.kind, r.options = "upper", {"suffix": "!"}
    assert reflection_lm_from_config(r).complete(["ab"]) == ["AB!"]
    r.kind = "nope"
    with pytest.raises(ValueError, match="config.gepa.reflection.kind"):
        reflection_lm_from_config(r)


def test_rl_config_from_run_config():
    c = default_config()
    c.rl.tau, c.rl.loss, c.sampling.temperature, c.cycle.rollouts_per_problem = 2.5, "ppo_clip", 0.7, 4
    rl = RLConfig.from_config(c)
    assert (rl.tau, rl.loss, rl.temperature, rl.rollouts_per_problem) == (2.5, "ppo_clip", 0.7, 4)


def test_bad_population_rule_is_named():
    c = default_config()
    c.model.path = "x"
    c.cycle.population_rule = "best"
    with pytest.raises(ValueError, match="config.cycle.population_rule"):
        validate(c)


@pytest.mark.parametrize("field, value, message", [
    ("population_fill", "random", "config.gepa.population_fill"),
    ("seed_scoring_passes", 0.0, "config.gepa.seed_scoring_passes"),
])
def test_bad_gepa_fields_are_named(field, value, message):
    c = default_config()
    c.model.path = "x"
    c.gepa[field] = value
    with pytest.raises(ValueError, match=message):
        validate(c)
