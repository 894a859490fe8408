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


def shorten(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters (middle elided) so feedback stays readable for the reflection LM."""
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"
