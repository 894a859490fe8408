"""Epoch-shuffled minibatches of training-item ids for reflection (3 items by default).

Each epoch the ids are shuffled with the search's `random.Random`; when the count is not a multiple of the
minibatch size, the epoch is padded with the least-used ids (the most recently shuffled first), so every
minibatch is full. Minibatches are consecutive chunks of the shuffled epoch.

This is the reference `gepa` sampler's behaviour with one minibatch per iteration. The reference derives the
chunk from the iteration counter, so with several proposals per iteration its chunks overlap between
iterations; we count chunks drawn instead, so every proposal gets the next fresh chunk (identical when one
proposal is made per iteration).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EpochShuffledSampler:
    """Yields minibatches of item ids; its whole state is plain data (see `to_dict`)."""

    minibatch_size: int = 3
    shuffled: list[Hashable] = field(default_factory=list)
    epoch: int = -1
    last_num_items: int = 0
    chunks_drawn: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.minibatch_size, int) or self.minibatch_size < 1:
            raise ValueError(f"minibatch_size must be a positive integer, got {self.minibatch_size!r}")

    def next_ids(self, item_ids: Sequence[Hashable], rng: random.Random) -> list[Hashable]:
        """The next minibatch of ids drawn from `item_ids` (reshuffled at each epoch or when they change)."""
        if len(item_ids) == 0:
            raise ValueError("cannot sample a minibatch from an empty training set; pass at least one item")
        start = self.chunks_drawn * self.minibatch_size
        epoch = 0 if self.epoch == -1 else start // len(self.shuffled)
        if not self.shuffled or len(item_ids) != self.last_num_items or epoch > self.epoch:
            self.epoch = epoch
            self._reshuffle(item_ids, rng)
        start %= len(self.shuffled)
        self.chunks_drawn += 1
        return list(self.shuffled[start : start + self.minibatch_size])

    def _reshuffle(self, item_ids: Sequence[Hashable], rng: random.Random) -> None:
        self.last_num_items = len(item_ids)
        self.shuffled = list(item_ids)
        rng.shuffle(self.shuffled)
        counts = Counter(self.shuffled)
        num_pad = -len(self.shuffled) % self.minibatch_size
        for _ in range(num_pad):
            # Least used id; among equals the one shuffled last (the reference's tie order).
            least = min(counts.values())
            pick = [i for i, n in counts.items() if n == least][-1]
            self.shuffled.append(pick)
            counts[pick] += 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state; `from_dict` restores a sampler that continues exactly."""
        return {
            "minibatch_size": self.minibatch_size,
            "shuffled": list(self.shuffled),
            "epoch": self.epoch,
            "last_num_items": self.last_num_items,
            "chunks_drawn": self.chunks_drawn,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochShuffledSampler:
        """Inverse of `to_dict`."""
        return cls(
            minibatch_size=int(d["minibatch_size"]),
            shuffled=list(d["shuffled"]),
            epoch=int(d["epoch"]),
            last_num_items=int(d["last_num_items"]),
            chunks_drawn=int(d["chunks_drawn"]),
        )
