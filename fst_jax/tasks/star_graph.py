"""Star-graph search: find the path from the centre of a star graph to the end of one of its arms.

A star graph (Bachmann & Nagarajan's path-star task, as the FST paper's App. C uses it) has `degree` arms
leaving one centre node, the *source*. `path_length` counts the nodes on a path from the source to an arm's
end, both included, so each arm holds `path_length - 1` nodes and the graph `1 + degree·(path_length - 1)`
distinct labels drawn from `0 .. num_nodes - 1` (the paper's d = 25, p = 20, n = 500 uses 476 of 500). Edges
point away from the centre; the prompt lists them shuffled, with the source and the *target* (one arm's end).

Problem dicts: `edges` (list of [u, v]), `source`, `target`, `path` (the node list from source to target,
inclusive) and `id`. `make_problems(n, seed)` generates them (same seed, same problems); they also load from
JSON Lines with the same fields, checked on load: every path must be valid in its edge list.

Reward: 1 iff the last `\\boxed{...}` of the completion (after any `</think>`) holds exactly the path without
the source — node labels in order, separated by commas and/or whitespace (`\\boxed{7, 3, 12}`,
`\\boxed{7 3 12}`); labels are ASCII digits (a "７" or "٧" is not a label). `reward="prefix"` instead gives
the nodes right before the first mistake over the longer of answer and path (a dense signal for models that
score 0 on exact match), so still 1 only for the exact path. Feedback, for GEPA's reflection, says where
the proposed path first leaves the graph (a missing edge, an unknown label) or the target's arm, or whether
it stops short, runs on, or wrongly includes the source.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fst_jax.tasks.base import Field, Problem, Score, register_task, shorten
from fst_jax.tasks.math import final_boxed

DEFAULT_INSTRUCTION = ("Find the path from the source node to the target node, following the directed edges. "
                       "Give the nodes of the path after the source, in order and separated by commas, as your "
                       "final answer in \\boxed{}, e.g. \\boxed{4, 9, 2}.")
_SEPARATOR = re.compile(r"[\s,]+")
_LABEL = re.compile(r"[0-9]+")


def make_star_graph(rng: random.Random, degree: int, path_length: int,
                    num_nodes: int) -> tuple[list[list[int]], int, int, list[int]]:
    """(shuffled edges, source, target, path source→target inclusive) of one random star graph."""
    labels = rng.sample(range(num_nodes), 1 + degree * (path_length - 1))
    source, rest = labels[0], labels[1:]
    arms = [rest[i * (path_length - 1):(i + 1) * (path_length - 1)] for i in range(degree)]
    edges = [[prev, node] for arm in arms for prev, node in zip([source] + arm[:-1], arm)]
    rng.shuffle(edges)
    arm = arms[rng.randrange(degree)]
    return edges, source, arm[-1], [source] + arm


def path_error(edges: Sequence[Sequence[int]], source: int, target: int, path: Sequence[int]) -> str | None:
    """Why `path` is not a source→target path along `edges` (None: it is)."""
    if len(path) < 2 or path[0] != source or path[-1] != target:
        return f"the path must run from the source {source} to the target {target}, got {list(path)[:8]}"
    edge_set = {(u, v) for u, v in edges}
    for u, v in zip(path, path[1:]):
        if (u, v) not in edge_set:
            return f"the path uses {u} -> {v}, which is not an edge"
    return None


def parse_path(text: str) -> tuple[list[int] | None, str]:
    """The node labels in an answer ("7, 3 12" → [7, 3, 12]) or (None, why not)."""
    tokens = [t for t in _SEPARATOR.split(text.strip()) if t]
    if not tokens:
        return None, "the final \\boxed{} is empty"
    for t in tokens:
        if not _LABEL.fullmatch(t):
            return None, (f"{shorten(t, 40)!r} is not a node label (labels are whole numbers written with "
                          "the digits 0-9, separated by commas or spaces)")
    return [int(t) for t in tokens], ""


def _show(nodes: Sequence[int]) -> str:
    return ", ".join(map(str, nodes))


@register_task("star_graph")
@dataclass(frozen=True)
class StarGraphTask:
    """Options: `degree` (arms), `path_length` (nodes source→target inclusive), `num_nodes` (label range),
    `instruction` appended to the graph (empty: none), `reward` "exact" (the paper's) or "prefix"."""

    degree: int = 25
    path_length: int = 20
    num_nodes: int = 500
    instruction: str = DEFAULT_INSTRUCTION
    reward: str = "exact"
    name: str = field(default="star_graph", init=False)
    fields: Any = field(init=False, repr=False, default_factory=lambda: {
        "edges": Field((list,), description="the edges [u, v], directed away from the centre"),
        "source": Field((int,), description="the centre node"),
        "target": Field((int,), description="the end of one arm"),
        "path": Field((list,), description="the nodes from source to target, inclusive"),
    })

    def __post_init__(self):
        if self.degree < 1 or self.path_length < 2:
            raise ValueError(f"star_graph task: need degree >= 1 and path_length >= 2, got degree={self.degree}, "
                             f"path_length={self.path_length}")
        needed = 1 + self.degree * (self.path_length - 1)
        if self.num_nodes < needed:
            raise ValueError(f"star_graph task: num_nodes={self.num_nodes} labels are too few for degree="
                             f"{self.degree} arms of path_length={self.path_length} (needs >= {needed})")
        if self.reward not in ("exact", "prefix"):
            raise ValueError(f"star_graph task: reward must be 'exact' or 'prefix', got {self.reward!r}")

    def make_problems(self, n: int, seed: int) -> list[dict[str, Any]]:
        """`n` problems from `seed`: the same seed and options always give the same problems."""
        rng = random.Random(f"star_graph|{self.degree}|{self.path_length}|{self.num_nodes}|{seed}")
        out = []
        for i in range(n):
            edges, source, target, path = make_star_graph(rng, self.degree, self.path_length, self.num_nodes)
            out.append({"edges": edges, "source": source, "target": target, "path": path, "id": str(i)})
        return out

    def check_problem(self, problem: Problem) -> str | None:
        """A reason the loaded problem is unusable, or None."""
        edges = problem["edges"]
        if not all(isinstance(e, list) and len(e) == 2 and all(type(x) is int for x in e) for e in edges):
            return "'edges' must be a list of [u, v] pairs of integers"
        path = problem["path"]
        if not all(type(x) is int for x in path):
            return "'path' must be a list of integers"
        return path_error(edges, problem["source"], problem["target"], path)

    def format_problem(self, problem: Problem) -> str:
        edges = " | ".join(f"{u},{v}" for u, v in problem["edges"])
        body = f"Edges: {edges}\nSource: {problem['source']}\nTarget: {problem['target']}"
        return f"{body}\n\n{self.instruction}" if self.instruction else body

    def score(self, problem: Problem, completion: str) -> Score:
        completion = completion if isinstance(completion, str) else str(completion)
        source, target = int(problem["source"]), int(problem["target"])
        answer = [int(x) for x in problem["path"][1:]]
        want = f"The correct answer is \\boxed{{{_show(answer)}}}."
        text, why = final_boxed(completion)
        if text is None:
            return Score(0.0, f"No path was read: {why}. {want}")
        proposed, why = parse_path(text)
        if proposed is None:
            return Score(0.0, f"The answer could not be read: {why}. {want}", text.strip())
        extracted = _show(proposed)
        if proposed == answer:
            return Score(1.0, f"Correct: {extracted} is the path from {source} to {target}.", extracted)
        right = next((i for i, (a, b) in enumerate(zip(proposed, answer)) if a != b), min(len(proposed), len(answer)))
        reward = right / max(len(answer), len(proposed)) if self.reward == "prefix" else 0.0
        return Score(reward, f"Incorrect: {self._diagnose(problem, proposed)} {want}", extracted)

    def _diagnose(self, problem: Problem, proposed: list[int]) -> str:
        """Where `proposed` first leaves the graph or the target's arm (it is not the exact answer)."""
        source, target = int(problem["source"]), int(problem["target"])
        path = [int(x) for x in problem["path"]]
        successors = {int(u): int(v) for u, v in problem["edges"]}  # one successor per node in a star's arm
        nodes = {int(x) for e in problem["edges"] for x in e}
        centre_out = {int(v) for u, v in problem["edges"] if int(u) == source}
        if proposed[0] == source:
            return (f"the answer starts with the source {source}; list only the nodes after it.")
        prev = source
        for i, node in enumerate(proposed):
            step = f"step {i + 1} ({prev} -> {node})"
            if node not in nodes:
                return f"at {step} the path leaves the graph: {node} is not a node of this graph."
            if prev == source and node not in centre_out:
                return f"at {step} the path leaves the graph: there is no edge from the source {source} to {node}."
            if prev != source and successors.get(prev) != node:
                return f"at {step} the path leaves the graph: there is no edge from {prev} to {node}."
            if i + 1 < len(path) and node != path[i + 1]:
                return (f"at {step} the path enters the wrong arm: from {prev} the way to the target {target} "
                        f"goes to {path[i + 1]}, not {node}.")
            if node == target and i + 1 < len(proposed):
                return f"the path reaches the target {target} at step {i + 1} but goes on past it."
            prev = node
        return f"the path stops at {prev} after {len(proposed)} step(s), before reaching the target {target}."
