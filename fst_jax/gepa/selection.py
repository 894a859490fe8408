"""Parent selection strategies: `pareto` (default), `current_best`, `epsilon_greedy`.

Each is a tiny class behind the `CandidateSelector` protocol; `make_selector` resolves the string names used in
configs. All randomness comes from the search's `random.Random` (passed in), so decisions are reproducible
and resume exactly; the draws made are the reference `gepa` package's, so a search with one proposal per
iteration picks the same parents as the reference for the same seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fst_jax.gepa.pareto import pareto_multiplicities

if TYPE_CHECKING:
    from fst_jax.gepa.state import GEPAState


class CandidateSelector(Protocol):
    """Chooses the id of the candidate to mutate next."""

    def select(self, state: GEPAState, rng: random.Random) -> int: ...


def _first_argmax(values: list[float]) -> int:
    return values.index(max(values))


@dataclass
class ParetoSelector:
    """Drop dominated candidates, then draw one with probability proportional to the items it is best on."""

    def select(self, state: GEPAState, rng: random.Random) -> int:
        aggregates = state.aggregates()
        counts = pareto_multiplicities(state.item_best(), aggregates)
        pool = [cid for cid, n in counts.items() for _ in range(n)]
        if not pool:  # nothing scored yet: fall back to the best aggregate
            return _first_argmax(aggregates)
        return rng.choice(pool)


@dataclass
class CurrentBestSelector:
    """Always the highest aggregate score (earliest among equals)."""

    def select(self, state: GEPAState, rng: random.Random) -> int:
        return _first_argmax(state.aggregates())


@dataclass
class EpsilonGreedySelector:
    """With probability epsilon a uniformly random candidate, otherwise the current best."""

    epsilon: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")

    def select(self, state: GEPAState, rng: random.Random) -> int:
        if rng.random() < self.epsilon:
            return rng.randint(0, len(state.candidates) - 1)
        return _first_argmax(state.aggregates())


# name -> factory(epsilon); one entry per strategy, resolved by `make_selector` (config.gepa.selection)
SELECTORS: dict[str, Callable[[float], CandidateSelector]] = {
    "pareto": lambda epsilon: ParetoSelector(),
    "current_best": lambda epsilon: CurrentBestSelector(),
    "epsilon_greedy": EpsilonGreedySelector,
}


def make_selector(name: str, epsilon: float = 0.1) -> CandidateSelector:
    """The selector called `name` (a key of `SELECTORS`)."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selection strategy {name!r}; choose one of {', '.join(SELECTORS)}")
    return SELECTORS[name](epsilon)
