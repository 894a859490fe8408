"""Synthetic string-rule tasks and general skills: the embedded default's data, made on the fly from a seed.

A *rule* is a short text the system prompt can state, naming one string transformation or a composition:

    reverse | sort | swap pairs | upper | rotate K | shift K        (steps)
    "reverse, then shift 2"                                         (a composition: steps joined by ", then ")

`rotate K` moves the first K characters to the end; `shift K` moves every letter K places on in the alphabet
(z wraps to a, case kept); `swap pairs` swaps characters 1↔2, 3↔4, … (an odd last one stays); `upper`
upper-cases. `apply_rule(rule, text)` computes a rule; `parse_rule` checks one (None: not a rule).

The tiny model (tools/make_tiny_model.py) is trained on `TRAIN_RULES`: every single step except the held-out
parameter and every two-step composition whose *function* is not a held-out rule's. `HELD_OUT_RULES` (and any
rule computing the same function on `PROBE_INPUTS`) never appear in its training data.

Tasks (`get_task(name, **options)`):
  "rule"   `SyntheticRuleTask(rule=...)`: the user message is only the input string; the rule is hidden (the
           system prompt must find it). Dense reward: position-wise fraction of characters right over the
           longer of answer and completion (so length errors cost), 1.0 iff exact; `reward="exact"`: 1.0 or
           0.0 (the feedback text is the same either way). Feedback: "correct" or "want: <answer>"
           (`feedback="full"`: "input: …; want: …; got: …").
  "skill"  `SkillTask(skill=...)`: general skills that measure forgetting (copy, count, last, add); the
           instruction is in the user message ("count: abcde" → "5"), exact-match reward.
Both make their own problems deterministically: `task.make_problems(n, seed)`, records with the task's
`fields`, so they also load from JSONL through `load_problems`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fst_jax.tasks.base import Field, Problem, Score, register_task, shorten

__all__ = [
    "GENERIC_INSTRUCTIONS", "HELD_OUT_RULES", "IN_FAMILY_RL_RULES", "PROBE_INPUTS", "SEED_PROMPT", "SKILLS",
    "SINGLE_RULES", "SkillTask", "SyntheticRuleTask", "TINY_REFLECTION_TEMPLATE", "TRAIN_RULES", "apply_rule",
    "dense_reward", "parse_rule", "random_input", "rule_function_key",
]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
THEN = ", then "
_FIXED_STEPS = ("reverse", "sort", "swap pairs", "upper")
_PARAM_STEP = re.compile(r"^(rotate|shift) ([1-9]\d?)$")

# The task-agnostic system prompt a run starts from; GENERIC_INSTRUCTIONS are the phrasings the tiny model
# saw with no rule stated (it then applies some rule of its own choosing, so sampled rollouts vary).
SEED_PROMPT = "Transform the text."
GENERIC_INSTRUCTIONS = (SEED_PROMPT, "Apply the rule.", "Rewrite the input.", "Follow the rule.")

# The reflection prompt the tiny model was trained on (GEPA's <current_text>/<records> placeholders); the
# reply is the new rule in a ``` fence.
TINY_REFLECTION_TEMPLATE = "Fix the instruction.\nInstruction: <current_text>\n<records>\nNew instruction in ```:"

SINGLE_RULES = ("reverse", "sort", "swap pairs", "upper", "rotate 1", "rotate 2", "rotate 3",
                "shift 1", "shift 2", "shift 3", "shift 4", "shift 5")
# Never in the tiny model's training data (nor any rule computing the same function): a held-out parameter
# and held-out compositions of steps it knows.
HELD_OUT_RULES = ("shift 4", "reverse, then shift 1", "swap pairs, then upper", "rotate 1, then reverse",
                  "sort, then rotate 2")
# In-family rules for RL tasks: the base model follows them when told, but the seed prompt does not say them.
IN_FAMILY_RL_RULES = ("reverse, then shift 2", "swap pairs, then shift 1", "rotate 2, then upper",
                      "sort, then shift 3", "reverse", "shift 3")


def parse_rule(text: str) -> tuple[str, ...] | None:
    """The rule's steps, e.g. ("reverse", "shift 2"), or None when `text` is not a rule (1 to 3 steps)."""
    if not isinstance(text, str):
        return None
    steps = tuple(text.strip().rstrip(".").split(THEN))
    if not 1 <= len(steps) <= 3:
        return None
    for step in steps:
        m = _PARAM_STEP.match(step)
        if step not in _FIXED_STEPS and not (m and int(m.group(2)) <= 25):
            return None
    return steps


def _shift(ch: str, k: int) -> str:
    if "a" <= ch <= "z":
        return chr((ord(ch) - 97 + k) % 26 + 97)
    if "A" <= ch <= "Z":
        return chr((ord(ch) - 65 + k) % 26 + 65)
    return ch


def _apply_step(step: str, s: str) -> str:
    if step == "reverse":
        return s[::-1]
    if step == "sort":
        return "".join(sorted(s))
    if step == "upper":
        return s.upper()
    if step == "swap pairs":
        chars = list(s)
        for i in range(0, len(chars) - 1, 2):
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        return "".join(chars)
    kind, k = step.split()
    k = int(k)
    if kind == "rotate":
        k = k % len(s) if s else 0
        return s[k:] + s[:k]
    return "".join(_shift(c, k) for c in s)


def apply_rule(rule: str, text: str) -> str:
    """`text` transformed by `rule` (a ValueError names the rule when it is not one)."""
    steps = parse_rule(rule)
    if steps is None:
        raise ValueError(f"{rule!r} is not a rule: use steps {', '.join(_FIXED_STEPS)}, 'rotate K' or "
                         f"'shift K' joined by {THEN!r}")
    for step in steps:
        text = _apply_step(step, text)
    return text


def random_input(rng: random.Random, min_len: int = 5, max_len: int = 8) -> str:
    """A random lowercase string of `min_len` to `max_len` letters."""
    n = rng.randint(min_len, max_len)
    return "".join(rng.choice(LETTERS) for _ in range(n))


PROBE_INPUTS = tuple(random_input(random.Random(1000 + i), 4, 9) for i in range(64))


def rule_function_key(rule: str) -> tuple[str, ...]:
    """The rule's outputs on `PROBE_INPUTS`: rules with equal keys compute the same function."""
    return tuple(apply_rule(rule, s) for s in PROBE_INPUTS)


def _train_rules() -> tuple[str, ...]:
    held = {rule_function_key(r) for r in HELD_OUT_RULES}
    singles = [r for r in SINGLE_RULES if rule_function_key(r) not in held]
    family = lambda r: r.split()[0]  # noqa: E731 - rotate/shift steps of one kind do not compose
    pairs = [f"{a}{THEN}{b}" for a in singles for b in singles if family(a) != family(b)]
    out = singles + [r for r in pairs if rule_function_key(r) not in held]
    return tuple(out)


TRAIN_RULES = _train_rules()


def dense_reward(answer: str, got: str) -> float:
    """Characters right position by position, over the longer of the two strings (so length errors cost)."""
    n = max(len(answer), len(got))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(answer, got)) / n


def _extract(completion: str) -> str:
    if "</think>" in completion:
        completion = completion.rsplit("</think>", 1)[1]
    return completion.strip()


@register_task("rule")
@dataclass(frozen=True)
class SyntheticRuleTask:
    """A hidden string rule: the user message is the input, the answer `apply_rule(rule, input)`.

    Options: `rule` (the hidden rule text), input lengths `min_len`/`max_len` for `make_problems`,
    `feedback` "short" ("want: <answer>", the tiny model's format) or "full" (input, want, got), and `reward`
    "dense" (characters right, position by position: partial credit a policy can climb) or "exact" (1 or 0:
    only a whole right answer counts, so a policy that never produces one gets no signal from the reward,
    while the feedback text still shows what was wanted).
    """

    rule: str = IN_FAMILY_RL_RULES[0]
    min_len: int = 5
    max_len: int = 8
    feedback: str = "short"
    reward: str = "dense"
    name: str = field(default="rule", init=False)
    fields: Any = field(init=False, repr=False, default_factory=lambda: {
        "input": Field((str,), description="the string to transform (the whole user message)"),
        "answer": Field((str,), description="the transformed string"),
        "rule": Field((str,), required=False, description="the hidden rule (informational)"),
    })

    def __post_init__(self):
        if parse_rule(self.rule) is None:
            apply_rule(self.rule, "")  # raises with the rule grammar
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"rule task: need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.feedback not in ("short", "full"):
            raise ValueError(f"rule task: feedback must be 'short' or 'full', got {self.feedback!r}")
        if self.reward not in ("dense", "exact"):
            raise ValueError(f"rule task: reward must be 'dense' or 'exact', got {self.reward!r}")

    def make_problems(self, n: int, seed: int) -> list[dict[str, Any]]:
        """`n` problems from `seed` (same seed, same problems); distinct inputs while there are enough."""
        rng = random.Random(f"rule|{self.rule}|{seed}")
        out, seen = [], set()
        while len(out) < n:
            s = random_input(rng, self.min_len, self.max_len)
            if s in seen and len(seen) < 10 * n:
                continue
            seen.add(s)
            out.append({"input": s, "answer": apply_rule(self.rule, s), "rule": self.rule, "id": str(len(out))})
        return out

    def format_problem(self, problem: Problem) -> str:
        return str(problem["input"])

    def score(self, problem: Problem, completion: str) -> Score:
        answer, got = str(problem["answer"]), _extract(completion)
        if got == answer:
            return Score(1.0, "correct", got)
        right = dense_reward(answer, got)
        reward = right if self.reward == "dense" else 0.0
        if self.feedback == "short":
            return Score(reward, f"want: {answer}", got)
        return Score(reward, f"input: {problem['input']}; want: {answer}; got: {shorten(got, 80)} "
                             f"({right:.0%} of characters right)", got)


SKILLS = ("copy", "count", "last", "add")


def skill_example(skill: str, rng: random.Random) -> tuple[str, str]:
    """(user message, answer) of one general-skill problem."""
    if skill == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return f"add: {a}+{b}", str(a + b)
    s = random_input(rng, 3, 9)
    answer = {"copy": s, "count": str(len(s)), "last": s[-1]}[skill]
    return f"{skill}: {s}", answer


@register_task("skill")
@dataclass(frozen=True)
class SkillTask:
    """A general skill (copy, count, last, add) stated in the user message; exact-match reward."""

    skill: str = "copy"
    name: str = field(default="skill", init=False)
    fields: Any = field(init=False, repr=False, default_factory=lambda: {
        "question": Field((str,), description="the user message, e.g. 'count: abcde'"),
        "answer": Field((str,), to_str=True),
    })

    def __post_init__(self):
        if self.skill not in SKILLS:
            raise ValueError(f"skill task: skill must be one of {SKILLS}, got {self.skill!r}")

    def make_problems(self, n: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(f"skill|{self.skill}|{seed}")
        out = []
        for i in range(n):
            q, a = skill_example(self.skill, rng)
            out.append({"question": q, "answer": a, "id": str(i)})
        return out

    def format_problem(self, problem: Problem) -> str:
        return str(problem["question"])

    def score(self, problem: Problem, completion: str) -> Score:
        answer, got = str(problem["answer"]), _extract(completion)
        if got == answer:
            return Score(1.0, "correct", got)
        return Score(0.0, f"want: {answer}", got)


def rules_for_training(rng: random.Random, k: int) -> Sequence[str]:
    """`k` training rules, half of them single steps (they are the building blocks)."""
    singles = [r for r in TRAIN_RULES if THEN not in r]
    return [rng.choice(singles) if rng.random() < 0.3 else rng.choice(TRAIN_RULES) for _ in range(k)]
