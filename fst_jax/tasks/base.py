"""What a task is: a problem schema, the user message built from a problem, and a scored, explained reward.

A *problem* is a plain dict of canonical fields (e.g. {"question": ..., "answer": ..., "id": ...}) built by
`fst_jax.tasks.io.load_problems` from a local file through a field mapping. A task turns it into the user
message (the system prompt comes from the prompt population) and scores a completion as a `Score`: a reward in
[0, 1] for the RL update and GEPA's Pareto front, and textual feedback that GEPA's reflection LM reads.

Rewards are pure Python on the host. Model output is parsed, never executed.

    task = get_task("math", instruction="")          # options are the task dataclass's fields
    task.score({"question": "1+1?", "answer": "2"}, "... so \\boxed{2}").reward   # 1.0
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

Problem = Mapping[str, Any]


@dataclass(frozen=True)
class Score:
    """One completion's reward and the feedback explaining it. `extracted` is the answer read (None: none)."""

    reward: float
    feedback: str
    extracted: str | None = None

    def __post_init__(self):
        if not 0.0 <= self.reward <= 1.0:
            raise ValueError(f"reward must lie in [0, 1], got {self.reward}")


@dataclass(frozen=True)
class Field:
    """A canonical problem field: the types a record's value may have and whether it must be present.

    `to_str` turns numbers into strings on load (a math answer written as 42 in JSON is the answer "42").
    """

    types: tuple[type, ...] = (str,)
    required: bool = True
    to_str: bool = False
    description: str = ""


ANY_JSON = (str, int, float, bool, list, dict, type(None))


@runtime_checkable
class Task(Protocol):
    """A task family. `fields` is the problem schema that loading checks every record against."""

    name: str
    fields: Mapping[str, Field]

    def format_problem(self, problem: Problem) -> str:
        """The user message for `problem`."""
        ...

    def score(self, problem: Problem, completion: str) -> Score:
        """Reward in [0, 1] and feedback. Never raises on any completion text."""
        ...


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Class decorator: make a task constructible as `get_task(name, **options)`."""

    def wrap(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"task {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **options: Any) -> Task:
    """Build the registered task `name` with `options` (its dataclass fields). Unknown names/options are errors."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    factory = _REGISTRY[name]
    if dataclasses.is_dataclass(factory):
        known = [f.name for f in dataclasses.fields(factory) if f.init]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"task {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
                             f"its options are: {', '.join(known)}")
    return factory(**options)


class RewardError(ValueError):
    """A task's `score` raised, or gave a reward that is not a finite number in [0, 1]. The message names the
    task, the problem's id, the step (once the trainer sets `step`) and the start of the completion."""

    def __init__(self, task_name: str, problem_id: Any, completion: str, problem: str, step: int | None = None):
        self.task_name, self.problem_id, self.completion, self.problem = task_name, problem_id, completion, problem
        self.step = step
        super().__init__(str(self))

    def __str__(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        start = self.completion[:60] + ("…" if len(self.completion) > 60 else "")
        return (f"task {self.task_name!r}, problem {self.problem_id}{at}: {self.problem}; the completion starts "
                f"{start!r}. Fix the task's score() (a reward in [0, 1] for any text) and rerun the same command "
                "to resume from the last checkpoint")


def checked_score(task: Task, problem: Problem, completion: str, *, task_name: str | None = None) -> Score:
    """`task.score(problem, completion)`, with a raising `score` or a reward that is not a finite number in
    [0, 1] turned into a `RewardError` that names the task, the problem and the completion. Every place that
    scores rollouts (RL, GEPA's evaluations) calls this, so a broken reward stops the run with one line."""
    name = task_name or getattr(task, "name", type(task).__name__)
    problem_id = problem.get("id", "?") if isinstance(problem, Mapping) else "?"
    try:
        score = task.score(problem, completion)
    except Exception as e:  # a task's bug, whatever its type: report where it happened
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RewardError(name, problem_id, completion,
                          f"score() raised {type(e).__name__}{': ' + text if text else ''}") from e
    reward = getattr(score, "reward", score)
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real):
        raise RewardError(name, problem_id, completion, f"score() returned reward {reward!r}, not a number")
    if not 0.0 <= reward <= 1.0:  # also False for NaN
        raise RewardError(name, problem_id, completion, f"reward {reward} is not a finite number in [0, 1]")
    return score


def shorten(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters (middle elided) so feedback stays readable for the reflection LM."""
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"
