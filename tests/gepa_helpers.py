"""Deterministic scripted evaluation and reflection for GEPA engine tests (shared by test_gepa_engine.py).

Both are pure functions of their inputs, so two searches given the same decisions see the same numbers, and a
resumed search sees what the uninterrupted one saw. Reflection reads the current text from the prompt's first
fenced block and the minibatch from "item=<id>" markers in the feedback, so it behaves identically under our
reflection template and gepa's.
"""

from __future__ import annotations

import hashlib
import re

from fst_jax.gepa.state import EvalResult


def _h(*parts: object) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def candidate_text(candidate: dict[str, str]) -> str:
    return " / ".join(candidate[k] for k in sorted(candidate))


def score(candidate: dict[str, str], item: object) -> float:
    """0, 0.5 or 1; candidates with more reflective edits ("+" marks) tend to score higher."""
    text = candidate_text(candidate)
    p = min(85, 30 + 10 * text.count("+"))
    r = _h(text, item) % 100
    return 1.0 if r < p else (0.5 if r < p + 8 else 0.0)


class ScriptedEvaluate:
    """`evaluate(pairs, capture_traces)`; records every call (pairs, flag) for call-count checks."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[tuple[dict[str, str], object]], bool]] = []

    def __call__(self, pairs, capture_traces):
        self.calls.append(([(dict(c), i) for c, i in pairs], capture_traces))
        return [one_result(c, i) for c, i in pairs]


def one_result(candidate: dict[str, str], item: object) -> EvalResult:
    s = score(candidate, item)
    return EvalResult(score=s, output=f"answer-{_h(candidate_text(candidate), item) % 1000}",
                      feedback=f"item={item} score={s}: " + ("correct" if s == 1.0 else "check the units"))


FIRST_BLOCK = re.compile(r"```\n(.*?)\n```", re.S)


def reflect_reply(prompt: str, bad_every: int = 0) -> str:
    """New text = current text + "+tag", tag from the text and minibatch; optionally some unusable replies."""
    current = FIRST_BLOCK.search(prompt).group(1)
    items = re.findall(r"item=(\w+)", prompt)
    tag = _h(current, ",".join(items)) % 10_000
    if bad_every and tag % bad_every == 0:
        return "I would change the prompt but forgot the fences."
    return f"Here is the revision:\n```\n{current} +{tag}\n```"


class ScriptedReflection:
    """Reflection LM with `complete(prompts)`; counts calls and prompts."""

    def __init__(self, bad_every: int = 0) -> None:
        self.bad_every = bad_every
        self.calls: list[list[str]] = []

    def complete(self, prompts: list[str]) -> list[str]:
        self.calls.append(list(prompts))
        return [reflect_reply(p, self.bad_every) for p in prompts]
