"""Tasks: problem schema, user message, and a reward in [0, 1] with textual feedback for GEPA.

    task = get_task("math")                                   # options: get_task("math", instruction="")
    problems = load_problems("train.jsonl", task, fields={"question": "problem", "answer": "solution"})
    score = task.score(problems[0], completion)               # Score(reward, feedback, extracted)

Registered: math, codeio, star_graph, hover, physics, and the synthetic rule/skill tasks of the tiny default.
"""

from fst_jax.tasks.base import ANY_JSON, Field, Problem, Score, Task, get_task, register_task, task_names
from fst_jax.tasks.codeio import CodeIOTask, extract_prediction, outputs_match
from fst_jax.tasks.hover import HoverTask, extract_query
from fst_jax.tasks.io import DataError, load_problems, read_records
from fst_jax.tasks.math import MathTask, equivalent, last_boxed, scan_boxed
from fst_jax.tasks.physics import PhysicsTask, parse_number
from fst_jax.tasks.star_graph import StarGraphTask
from fst_jax.tasks.synthetic import SkillTask, SyntheticRuleTask  # noqa: F401  (registers "rule", "skill")

__all__ = [
    "ANY_JSON", "CodeIOTask", "DataError", "Field", "MathTask", "Problem", "Score", "Task", "equivalent",
    "extract_prediction", "extract_query", "get_task", "HoverTask", "last_boxed", "load_problems", "outputs_match", "parse_number", "PhysicsTask", "read_records",
    "register_task", "scan_boxed", "StarGraphTask", "task_names",
]
