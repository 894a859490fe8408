"""The new tasks through the path users take: configs that load and validate, and one FSTRunner run on a tiny
random model that trains star_graph → hover → physics in turn, GEPA reflecting on each task's feedback."""

import importlib.util
import json
import os
import shutil

import pytest
from test_train_system import tiny_checkpoint  # noqa: F401  (the tiny random HF checkpoint fixture)

from fst_jax.config import default_config, parse_schedule, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


def load_config(name):
    """configs/<name>.py's get_config(), loaded by path as launch/train.py's --config loads it."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_paper_configs_load_and_validate():
    base = load_config("fst_qwen3")
    for name in ("fst_qwen3_math", "fst_qwen3_hover", "fst_qwen3_continual", "fst_star_graph"):
        c = load_config(name)
        validate(c)
        # built from fst_qwen3's recipe: everything outside the task parts is unchanged
        for section in ("rl", "gepa", "eval", "mesh", "sampling", "checkpoint"):
            assert c[section].to_dict() == base[section].to_dict(), (name, section)
    math = load_config("fst_qwen3_math")
    assert math.task == "math" and math.tasks.math.fields.to_dict() == {"question": "problem", "answer": "answer"}
    hover = load_config("fst_qwen3_hover")
    assert hover.tasks.hover.task == "hover" and hover.tasks.hover.options.min_hops == 3
    assert (hover.tasks.hover.options.hop1_k, hover.tasks.hover.options.hop2_k) == (7, 10)
    continual = load_config("fst_qwen3_continual")
    assert parse_schedule(continual) == [("hover", 200), ("codeio", 200), ("physics", 200)]
    assert continual.total_steps == 600 and continual.gepa.seed_prompt == default_config().gepa.seed_prompt
    assert continual.tasks.codeio.to_dict() == base.tasks.codeio.to_dict()
    star = load_config("fst_star_graph")
    assert star.model.path.endswith("Qwen3-4B-Instruct-2507") and star.model.enable_thinking is False
    assert (star.cycle.population_size, star.cycle.rollouts_per_problem, star.cycle.problems_per_step,
            star.cycle.rl_steps, star.gepa.budget_rollouts) == (8, 8, 32, 6, 960)
    assert (star.tasks.star.num_train, star.tasks.star.num_val) == (10_000, 200)
    assert star.tasks.star.options.to_dict() == {"degree": 25, "path_length": 20, "num_nodes": 500, "reward": "exact"}
    tiny = load_config("fst_tiny")
    tiny.task = "star"
    validate(tiny)
    assert tiny.tasks.star.options.degree == 3 and tiny.tasks.star.options.path_length == 3


class RecordingReflectionLM:
    """Passes reflection prompts through to the runner's own reflection LM and keeps them."""

    def __init__(self, inner):
        self.inner, self.prompts = inner, []

    def complete(self, prompts):
        self.prompts.extend(prompts)
        return self.inner.complete(prompts)


@pytest.mark.slow
def test_star_hover_physics_run_through_fst_runner(tiny_checkpoint, tmp_path):
    from fst_jax.trainer.runner import FSTRunner

    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(os.path.join(DATA, "hover_corpus.jsonl"), corpus)
    c = default_config()
    c.seed, c.method = 1, "fst"
    c.model.path = tiny_checkpoint
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.tasks = {
        "star": dict(task="star_graph", options={"degree": 2, "path_length": 3, "num_nodes": 20,
                                                 "instruction": "Path in \\boxed{}."},
                     num_train=16, num_val=2, train_files=""),
        "hover": dict(task="hover", train_files=os.path.join(DATA, "hover_small.json"), val_fraction=0.34,
                      fields={"id": "uid"}, options={"corpus": str(corpus), "hop1_k": 2, "max_doc_chars": 30,
                                                     "instruction": "### query:"}),
        "physics": dict(task="physics", train_files=os.path.join(DATA, "physics_small.jsonl"), val_fraction=0.34,
                        fields={"question": "problem", "answer": "final_answer", "unit": "unit", "id": "pid"},
                        options={"instruction": "Answer in \\boxed{}."}),
    }
    c.schedule, c.total_steps, c.forgetting_tasks = "star:2,hover:2,physics:2", 6, "star,hover"
    c.gepa.seed_prompt = "Solve it."  # short prompts: every task's rollouts fit one 512-token bucket
    c.cycle.rl_steps, c.cycle.problems_per_step, c.cycle.rollouts_per_problem, c.cycle.population_size = 2, 2, 2, 2
    c.sampling.max_new_tokens = 4
    c.rl.learning_rate, c.rl.warmup_steps = 1e-2, 0
    # the seed on the 4-problem window, then a proposal (2 + 2 minibatch calls) and its full evaluation
    c.gepa.budget_rollouts, c.gepa.proposals_per_iteration, c.gepa.minibatch_size = 16, 1, 2
    c.gepa.reflection.max_new_tokens = 4
    c.eval.at_start, c.eval.every, c.eval.k, c.eval.max_new_tokens, c.eval.kl_prompts = False, 0, 1, 4, 0
    c.checkpoint.async_save = False
    c.log.progress = c.log.tensorboard = False

    runner = FSTRunner(c, str(tmp_path / "run"))
    runner.reflection_lm = recorder = RecordingReflectionLM(runner.reflection_lm)
    runner.run()

    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["kind"] == "train"]
    assert [(r["step"], r["task"]) for r in train] == [(1, "star"), (2, "star"), (3, "hover"), (4, "hover"),
                                                      (5, "physics"), (6, "physics")]
    assert all(0.0 <= r["train/reward"] <= 1.0 for r in train)
    (final,) = [r for r in records if r["kind"] == "eval"]             # at the end: physics, and the others
    assert {"val/reward", "forgetting/star", "forgetting/hover"} <= set(final)
    assert len([r for r in records if r["kind"] == "gepa_cycle"]) == 3
    # GEPA's reflection saw each task's own feedback
    reflected = "\n".join(recorder.prompts)
    assert "The correct answer is \\boxed{" in reflected                      # star_graph
    assert "supporting documents were retrieved" in reflected                # hover
    assert "The expected answer is" in reflected                              # physics
