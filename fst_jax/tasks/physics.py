"""Physics with numeric answers: the last `\\boxed{...}` read as a number and compared within a relative tolerance.

Problems (JSON Lines through a field mapping): `question`, `answer` (a number, or text such as
"3.0 \\times 10^8 m/s") and an optional `unit` the answer is expected in (stated in the user message).

Reading a number (`parse_number`), from the last complete top-level box (after any `</think>`):
  - LaTeX spacing and wrappers go: `$`, `\\left`/`\\right`, `\\,` `\\;` `\\!` `~`, `{,}`; units written as
    `\\text{...}`, `\\mathrm{...}`, `\\textrm{...}`, `\\operatorname{...}`, degrees (`^\\circ`, `°`) and `%` are
    dropped. Units are stripped, never converted: the answer must be in the unit the problem asks for.
  - A leading number with thousands separators (`12,300`, `12{,}300`, `12\\,300`), a decimal point,
    an exponent (`1.5e-3`, `1.5E3`) and/or a power of ten (`3 \\times 10^{8}`, `3×10^8`, `3\\cdot10^{-2}`,
    `3*10**8`, a bare `10^{-3}`); "−" (U+2212) is a minus sign. What follows must be a unit (it starts with a
    letter, `µ`, `Ω`, `°`, or nothing); `1,2` is not a number. Digits are ASCII 0-9 (a fullwidth "１２"
    or Arabic-Indic "٣" is not read: the answer scores 0).
  - Otherwise math-verify parses the text (`\\frac{3}{4}`, `\\sqrt{2}`, `2\\pi`) and a real constant
    expression is evaluated numerically (`3/4` too). Text with e-notation never goes there (math-verify
    reads the e of `1.5e-3` as Euler's number).
Comparison: |predicted − gold| ≤ `rel_tol`·|gold| + `abs_tol` (defaults 1e-2 and 0). A gold answer that is
not a number (a symbolic expression) is compared with math-verify's equivalence instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from fst_jax.tasks.base import Field, Problem, Score, register_task, shorten
from fst_jax.tasks.math import equivalent, final_boxed, gold_answer, parse_boxed, parse_timeout

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final numeric answer within \\boxed{}."
_UNIT_MACRO = re.compile(r"\\(?:text|mathrm|textrm|operatorname|mbox|rm)\s*\{[^{}]*\}")
_SPACING = re.compile(r"\\left|\\right|\\[,;:! ]|~|\$|\{,\}|\\displaystyle")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\%|%")
_NUMBER = re.compile(r"""
    ^\s*(?P<sign>[-+])?\s*
    (?:(?P<mantissa>\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)(?:[eE](?P<exp>[-+]?\d+))?)?
    (?:\s*(?:(?P<times>\\times|\\cdot|\*|×|·)\s*)?
        10\s*(?:\^|\*\*)\s*(?:\{\s*(?P<pow_braced>[-+]?\s*\d+)\s*\}|(?P<pow>[-+]?\d+)))?
    """, re.VERBOSE | re.ASCII)  # ASCII: \d must not match "１" or "٣"
_E_NOTATION = re.compile(r"[0-9.][eE][-+]?[0-9]")
_UNIT_START = re.compile(r"[A-Za-zµμΩÅ°]")


def _clean(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _UNIT_MACRO.sub(" ", text)
    text = _SPACING.sub(lambda m: "" if m.group(0) in ("\\,", "\\!", "{,}", "\\;", "\\:") else " ", text)
    return _DEGREES.sub(" ", text).strip()


def _plain_number(text: str) -> tuple[bool, float | None]:
    """(whether `text` is a plain number, its value: None when out of float range)."""
    m = _NUMBER.match(text)
    if m is None or (m.group("mantissa") is None and m.group("pow") is None and m.group("pow_braced") is None):
        return False, None
    power = m.group("pow") or m.group("pow_braced")
    if m.group("mantissa") is None and m.group("times"):
        return True, None  # "\times 10^3" with no number before it: not an answer (not math-verify's either)
    rest = text[m.end():].strip()
    if rest and not _UNIT_START.match(rest):
        return False, None  # "3/4", "1,2", "2\pi": not a plain number
    try:
        value = float(m.group("mantissa").replace(",", "")) if m.group("mantissa") else 1.0
        if m.group("exp"):
            value *= 10.0 ** int(m.group("exp"))
        if power is not None:
            value *= 10.0 ** int(power.replace(" ", ""))
    except (OverflowError, ValueError):
        return True, None
    value = -value if m.group("sign") == "-" else value
    return True, (value if math.isfinite(value) else None)


def _math_verify_number(text: str, timeout_s: int | None) -> float | None:
    parsed = parse_boxed(text, timeout_s)
    if not parsed:
        return None
    expr = parsed[0]
    try:
        if not getattr(expr, "is_number", False):
            return None
        value = complex(expr.evalf())
    except Exception:  # sympy raises many things on odd input; a non-number is simply not an answer
        return None
    if abs(value.imag) > 1e-12 * max(1.0, abs(value.real)) or not math.isfinite(value.real):
        return None
    return value.real


def parse_number(text: str, timeout_s: int | None = None, max_chars: int = 1000) -> float | None:
    """The number `text` denotes (see the module docstring), or None. Never raises."""
    if not isinstance(text, str) or not text.strip() or len(text) > max_chars:
        return None
    cleaned = _clean(text)
    if not cleaned:
        return None
    plain, value = _plain_number(cleaned)
    # math-verify reads the e of 1.5e-3 as Euler's number, and non-ASCII digits are not read at all
    if not plain and not _E_NOTATION.search(cleaned) and cleaned.isascii():
        value = _math_verify_number(cleaned, timeout_s)
    return value


def _factor_hint(predicted: float, gold: float) -> str:
    if predicted and gold and (predicted > 0) == (gold > 0):
        k = math.log10(abs(predicted / gold))
        if abs(k - round(k)) < 0.005 and round(k):
            return f" It is off by a factor of 10^{round(k)}: check the units and prefixes."
    if predicted and gold and math.isclose(predicted, -gold, rel_tol=1e-2):
        return " It has the wrong sign."
    return ""


@register_task("physics")
@dataclass(frozen=True)
class PhysicsTask:
    """Options: `instruction` appended to the question (empty: none), `rel_tol` and `abs_tol` for the
    comparison, `timeout_seconds` for math-verify, `max_answer_chars` beyond which an answer is not read."""

    instruction: str = DEFAULT_INSTRUCTION
    rel_tol: float = 1e-2
    abs_tol: float = 0.0
    timeout_seconds: int = 5
    max_answer_chars: int = 1000
    name: str = field(default="physics", init=False)
    fields: Any = field(default_factory=lambda: {
        "question": Field((str,), description="the problem statement"),
        "answer": Field((str, int, float), to_str=True, description="the numeric answer (units allowed)"),
        "unit": Field((str,), required=False, description="the unit the answer should be given in"),
    }, init=False)

    def __post_init__(self):
        if not 0.0 <= self.rel_tol < 1.0 or self.abs_tol < 0 or self.timeout_seconds < 0:
            raise ValueError("physics task: rel_tol must be in [0, 1), abs_tol and timeout_seconds >= 0")

    def _timeout(self) -> int | None:
        return parse_timeout(self.timeout_seconds)

    def gold(self, problem: Problem) -> tuple[str, float | None]:
        """(the gold answer's text, its value or None when it is not a number)."""
        text = gold_answer(str(problem["answer"]))
        return text, parse_number(text, self._timeout(), self.max_answer_chars)

    def check_problem(self, problem: Problem) -> str | None:
        """A reason the loaded problem is unusable, or None."""
        return None if gold_answer(str(problem["answer"])) else "the answer is empty"

    def format_problem(self, problem: Problem) -> str:
        question = str(problem["question"]).strip()
        if problem.get("unit"):
            question += f"\n\nGive the answer in {problem['unit']}."
        return f"{question}\n\n{self.instruction}" if self.instruction else question

    def score(self, problem: Problem, completion: str) -> Score:
        completion = completion if isinstance(completion, str) else str(completion)
        gold_text, gold = self.gold(problem)
        want = f"The expected answer is {shorten(gold_text)}."
        predicted_text, why = final_boxed(completion)
        if predicted_text is None:
            return Score(0.0, f"No final answer was read: {why}. {want}")
        predicted_text = predicted_text.strip()
        if not predicted_text:
            return Score(0.0, f"The final \\boxed{{}} is empty. {want}", "")
        if gold is None:  # a symbolic gold answer: math-verify decides
            ok = equivalent(gold_text, predicted_text, self.timeout_seconds, self.max_answer_chars)
            verdict = "matches" if ok else "does not match"
            return Score(float(ok), f"{'Correct' if ok else 'Incorrect'}: {shorten(predicted_text)} {verdict} the "
                         f"expected answer {shorten(gold_text)}.", predicted_text)
        predicted = parse_number(predicted_text, self._timeout(), self.max_answer_chars)
        if predicted is None:
            return Score(0.0, f"The final answer {shorten(predicted_text)} is not a number that could be read "
                         "(write digits 0-9, optionally with an exponent such as 3.2 \\times 10^{-19}, and "
                         f"the unit after the number). {want}", predicted_text)
        if abs(predicted - gold) <= self.rel_tol * abs(gold) + self.abs_tol:
            return Score(1.0, f"Correct: {shorten(predicted_text)} (= {predicted:.6g}) is within "
                         f"{self.rel_tol:.2%} of {shorten(gold_text)}.", predicted_text)
        error = f", {abs(predicted - gold) / abs(gold):.1%} away" if gold else ""
        return Score(0.0, f"Incorrect: the final answer {shorten(predicted_text)} (= {predicted:.6g}) does not "
                     f"match {shorten(gold_text)} (= {gold:.6g}) within {self.rel_tol:.2%}{error}."
                     f"{_factor_hint(predicted, gold)} {want}", predicted_text)
