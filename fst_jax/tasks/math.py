"""Math with a verifiable final answer: the last `\\boxed{...}` of the completion, checked by `math-verify`.

Answer extraction (`last_boxed`): scan left to right for `\\boxed{` or `\\fbox{` (whitespace allowed before
the brace, `\\boxed {x}`; `\\boxeds` is a different macro), and find each box's closing brace by counting
braces. A backslash escapes the next character, so `\\{` and `\\}` are literal braces inside the answer
(`\\boxed{\\{1, 2\\}}` holds `\\{1, 2\\}`). Boxes nested inside a box belong to it (`\\boxed{\\boxed{1}}`
holds `\\boxed{1}`), so `\\boxed{s}` always gives back `s` for balanced `s`. The answer is the content of the
last complete top-level box; a box whose brace never closes (a truncated response) swallows the rest of the
text and ends the scan.

Equivalence: the gold answer (if the mapped answer field holds a whole solution with a `\\boxed{}`, its last
box) and the extracted answer are each parsed by `math_verify.parse` as `\\boxed{...}` and compared with
`math_verify.verify(gold, prediction)` (e.g. \\frac{1}{2} = 0.5, 2x = x*2, \\{1,2\\} = \\{2,1\\}).
Identical strings (ignoring whitespace) score 1 without calling it.

Timeouts: math-verify bounds parsing and comparison with `signal.alarm`, which only works in the main
thread. There we pass `timeout_seconds` through (0 disables it); in any other thread (a thread-pool scorer)
we disable its timeouts rather than let it raise, and instead bound the work by `max_answer_chars` (longer
answers are compared as strings only). Note that math-verify's alarm replaces any SIGALRM alarm the caller
had set.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from fst_jax.tasks.base import Field, Problem, Score, register_task, shorten

logger = logging.getLogger("fst_jax.tasks.math")

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*\{")
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class BoxScan:
    """What `scan_boxed` found: the content of every complete top-level box and whether one never closed."""

    boxes: tuple[str, ...]
    unclosed: bool


def _closing_brace(text: str, start: int) -> int:
    """Index of the `}` closing the brace opened just before `start`, or -1 if it never closes."""
    depth = 1
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # escaped character: \{ \} \\ are not structure
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def scan_boxed(text: str) -> BoxScan:
    """All complete top-level `\\boxed{}`/`\\fbox{}` contents in order (see the module docstring)."""
    boxes: list[str] = []
    pos = 0
    while True:
        m = _BOX_OPEN.search(text, pos)
        if m is None:
            return BoxScan(tuple(boxes), unclosed=False)
        end = _closing_brace(text, m.end())
        if end < 0:
            return BoxScan(tuple(boxes), unclosed=True)
        boxes.append(text[m.end():end])
        pos = end + 1


def last_boxed(text: str) -> str | None:
    """The content of the last complete top-level box in `text`, or None if there is none."""
    boxes = scan_boxed(text).boxes
    return boxes[-1] if boxes else None


def final_boxed(completion: str) -> tuple[str | None, str]:
    """(the content of the completion's last complete top-level box, "") or (None, why there is none).

    Only the text after the last `</think>` counts (a thinking block is reasoning, not the answer); a
    `<think>` never closed means no answer was given.
    """
    if "</think>" in completion:
        completion = completion.rsplit("</think>", 1)[1]
    elif "<think>" in completion:
        return None, "the response ended inside its <think> block"
    scan = scan_boxed(completion)
    if scan.boxes:
        return scan.boxes[-1], ""
    if scan.unclosed:
        return None, "the final \\boxed{ was never closed (the response looks truncated)"
    return None, "the response contains no \\boxed{...}"


def _squash(s: str) -> str:
    return "".join(s.split())


def parse_timeout(timeout_seconds: float | None) -> int | None:
    """math-verify's parsing timeout in whole seconds, or None where it cannot apply: its timeout uses
    SIGALRM, which only the main thread can receive."""
    return max(1, int(timeout_seconds)) if timeout_seconds and _in_main_thread() else None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=8192)
def _parse_cached(latex: str, timeout_s: int | None) -> tuple:
    # Gold answers are parsed once per problem, not once per rollout. Results are immutable sympy/str.
    return tuple(parse_boxed(latex, timeout_s))


def parse_boxed(latex: str, timeout_s: int | None) -> list:
    """math-verify's parse of `latex` as a boxed answer ([] when it cannot be parsed; never raises)."""
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        return parse(f"\\boxed{{{latex}}}", parsing_timeout=timeout_s)
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        logger.debug("math-verify could not parse %r", latex[:200], exc_info=True)
        return []


def equivalent(gold: str, predicted: str, timeout_seconds: int = 5, max_answer_chars: int = 1000) -> bool:
    """Whether `predicted` is mathematically the same answer as `gold`, by math-verify. Never raises."""
    if _squash(gold) == _squash(predicted):
        return True
    if not predicted.strip() or len(predicted) > max_answer_chars or len(gold) > max_answer_chars:
        return False
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timeout_s = parse_timeout(timeout_seconds)
    try:
        gold_parsed = list(_parse_cached(gold, timeout_s))
        pred_parsed = parse_boxed(predicted, timeout_s)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))
    except (Exception, TimeoutException):
        logger.debug("math-verify failed on %r vs %r", gold[:200], predicted[:200], exc_info=True)
        return False


def gold_answer(answer: str) -> str:
    """The reference answer: the last box of a worked solution, else the field as written."""
    boxed = last_boxed(answer)
    return boxed.strip() if boxed is not None else answer.strip()


def _unboxed_tail_matches(completion: str, gold: str, cfg: "MathTask") -> bool:
    """Whether the answer appears, unboxed, on the completion's last non-empty line (for feedback only)."""
    lines = [ln for ln in completion.strip().splitlines() if ln.strip()]
    if not lines:
        return False
    last = lines[-1].strip().strip("$. ")
    if _squash(gold) and _squash(gold) in _squash(last) and len(last) <= cfg.max_answer_chars:
        return True
    tail = last.rsplit("=", 1)[-1].rsplit(" is ", 1)[-1].strip().strip("$. ")
    return equivalent(gold, tail, cfg.timeout_seconds, cfg.max_answer_chars)


@register_task("math")
@dataclass(frozen=True)
class MathTask:
    """Options: `instruction` appended to the question (empty: none), `timeout_seconds` for math-verify,
    `max_answer_chars` beyond which an answer is compared as a string only."""

    instruction: str = DEFAULT_INSTRUCTION
    timeout_seconds: int = 5
    max_answer_chars: int = 1000
    name: str = field(default="math", init=False)
    fields: Any = field(default_factory=lambda: {
        "question": Field((str,), description="the problem statement"),
        "answer": Field((str, int, float), to_str=True,
                        description="the final answer, or a worked solution ending in \\boxed{answer}"),
    }, init=False)

    def __post_init__(self):
        if self.timeout_seconds < 0 or self.max_answer_chars < 1:
            raise ValueError("math task: timeout_seconds must be >= 0 and max_answer_chars >= 1")

    def format_problem(self, problem: Problem) -> str:
        question = str(problem["question"]).strip()
        return f"{question}\n\n{self.instruction}" if self.instruction else question

    def score(self, problem: Problem, completion: str) -> Score:
        gold = gold_answer(str(problem["answer"]))
        completion = completion if isinstance(completion, str) else str(completion)
        scan = scan_boxed(completion)
        if not scan.boxes:
            if scan.unclosed:
                return Score(0.0, "The final \\boxed{ was never closed (the response looks truncated), so no "
                             f"answer was read. The expected answer is {shorten(gold)}.")
            if _unboxed_tail_matches(completion, gold, self):
                return Score(0.0, f"The response ends with the right value ({shorten(gold)}) but not inside "
                             f"\\boxed{{}}; the final answer must be written as \\boxed{{{shorten(gold)}}}.")
            return Score(0.0, "No final answer was found: the response contains no \\boxed{...}. "
                         f"The expected answer is {shorten(gold)}.")
        predicted = scan.boxes[-1].strip()
        if not predicted:
            return Score(0.0, f"The final \\boxed{{}} is empty. The expected answer is {shorten(gold)}.", "")
        if equivalent(gold, predicted, self.timeout_seconds, self.max_answer_chars):
            return Score(1.0, f"Correct: the final answer {shorten(predicted)} matches the expected answer "
                         f"{shorten(gold)}.", predicted)
        return Score(0.0, f"Incorrect: the final answer was {shorten(predicted)}, but the expected answer is "
                     f"{shorten(gold)}.", predicted)
