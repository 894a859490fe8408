"""Whether a child replaces nothing but earns a place: minibatch comparison with its parent.

Default (the reference's): the child's minibatch score sum must be strictly greater than the parent's on the
same items. Parents that already score perfectly on the minibatch are skipped before reflection (nothing to
learn from, and no reflection or child rollouts are spent). Accepted children are then scored on every
validation item by the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class AcceptanceCriterion(Protocol):
    """Decides from minibatch scores (parent's, child's; same items, same order) whether to keep the child."""

    def accept(self, parent_scores: Sequence[float], child_scores: Sequence[float]) -> bool: ...


@dataclass
class StrictImprovement:
    """sum(child) > sum(parent)."""

    def accept(self, parent_scores: Sequence[float], child_scores: Sequence[float]) -> bool:
        return sum(child_scores) > sum(parent_scores)


@dataclass
class ImprovementOrEqual:
    """sum(child) >= sum(parent): allows sideways moves."""

    def accept(self, parent_scores: Sequence[float], child_scores: Sequence[float]) -> bool:
        return sum(child_scores) >= sum(parent_scores)


# name -> criterion class; one entry per criterion, resolved by `make_acceptance` (config.gepa.acceptance)
ACCEPTANCE: dict[str, type] = {"strict_improvement": StrictImprovement, "improvement_or_equal": ImprovementOrEqual}


def make_acceptance(name: str) -> AcceptanceCriterion:
    """The criterion called `name` (a key of `ACCEPTANCE`)."""
    if name not in ACCEPTANCE:
        raise ValueError(f"unknown acceptance criterion {name!r}; choose one of {', '.join(ACCEPTANCE)}")
    return ACCEPTANCE[name]()


def is_perfect(scores: Sequence[float], perfect_score: float | None) -> bool:
    """True when every minibatch score reaches `perfect_score` (never, if it is None)."""
    return perfect_score is not None and len(scores) > 0 and all(s >= perfect_score for s in scores)
