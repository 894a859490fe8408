"""CodeIO: predict what a program prints or returns for a given input; exact match after normalisation.

The problem holds the full question (`question`) or a program and its input (`code`, `input`), and the
expected output (`answer`, a string or any JSON value). The model's output is parsed, never executed.

Answer extraction (`extract_prediction`), on the text after the last `</think>` (a Qwen3 thinking block is
reasoning, not the answer; an unclosed `<think>` means no answer was given):
  1. the body of the last complete ```-fenced block (a language tag such as ```json is dropped), else
  2. the text after the last line-initial `Output:` (any case, optional markdown bold), else
  3. the whole remaining text.
If the answer is a JSON object `{"output": X}` (the CodeI/O prompt's format) and the expected output is not
itself such an object, X is the answer.

Comparison (`outputs_match`): each side is normalised to a value — a non-string expected value is used as
is; a string is parsed as JSON, else as a Python literal (`ast.literal_eval`: literals only, it evaluates
nothing; inputs over `max_literal_chars` are not tried), else kept as a whitespace-normalised string. Values
then compare structurally: numbers by value (1.0 == 1, floats within `float_rel_tol`, NaN == NaN, but
booleans are not numbers), lists and tuples alike, dict keys compared as strings and in any order, sets as
sets, strings after collapsing whitespace. So `[1, 2.0]` == `(1,2)`, `{"b": 1, "a": 2}` == `{'a': 2, 'b': 1}`,
`"hi"` == `hi`, but `"1"` != `1` and `true` != `1`.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fst_jax.tasks.base import ANY_JSON, Field, Problem, Score, register_task, shorten

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_OUTPUT_LABEL = re.compile(r"^[ \t>*_#]*output[*_]*\s*:[*_]*[ \t]*", re.IGNORECASE | re.MULTILINE)
DEFAULT_INSTRUCTION = ("Predict the exact output of the program for the given input, without running it. "
                       "Give your final answer in a ``` code block at the end of your response.")
_NOT_A_VALUE = object()


def answer_region(completion: str) -> str | None:
    """The completion after its thinking block; None when a `<think>` is never closed (no answer given)."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1]
    if "<think>" in completion:
        return None
    return completion


def extract_prediction(completion: str) -> tuple[str | None, str]:
    """(predicted output text or None, where it came from: "fence" | "output_label" | "text" | reason)."""
    region = answer_region(completion)
    if region is None:
        return None, "the response ended inside its <think> block"
    fences = _FENCE.findall(region)
    if fences:
        return fences[-1].strip(), "fence"
    labels = list(_OUTPUT_LABEL.finditer(region))
    if labels:
        return region[labels[-1].end():].strip(), "output_label"
    text = region.strip()
    if not text:
        return None, "the response is empty"
    return text, "text"


def _collapse_ws(s: str) -> str:
    return " ".join(s.split())


def parse_value(text: str, max_literal_chars: int = 10_000) -> Any:
    """`text` as a JSON value, else a Python literal, else its whitespace-normalised string. Never raises."""
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except Exception:  # ValueError, RecursionError on deep nesting, ...
        pass
    if len(stripped) <= max_literal_chars:
        try:
            return ast.literal_eval(stripped)
        except Exception:  # SyntaxError, ValueError, MemoryError, RecursionError, ...
            pass
    return _collapse_ws(stripped)


def values_equal(a: Any, b: Any, rel_tol: float = 1e-9, _depth: int = 0) -> bool:
    """Structural equality as described in the module docstring."""
    if _depth > 200:
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) or isinstance(b, float):
            fa, fb = float(a), float(b)
            if math.isnan(fa) or math.isnan(fb):
                return math.isnan(fa) and math.isnan(fb)
            return math.isclose(fa, fb, rel_tol=rel_tol, abs_tol=0.0)
        return a == b
    if isinstance(a, str) and isinstance(b, str):
        return _collapse_ws(a) == _collapse_ws(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(values_equal(x, y, rel_tol, _depth + 1) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        ka = {str(k): v for k, v in a.items()}
        kb = {str(k): v for k, v in b.items()}
        return ka.keys() == kb.keys() and all(values_equal(ka[k], kb[k], rel_tol, _depth + 1) for k in ka)
    if isinstance(a, (set, frozenset)) and isinstance(b, (set, frozenset)):
        return a == b
    if a is None or b is None:
        return a is None and b is None
    return type(a) is type(b) and a == b  # e.g. complex literals


def _unwrap_output(pred: Any, expected: Any) -> Any:
    if isinstance(pred, dict) and list(pred) == ["output"] and not (
            isinstance(expected, dict) and list(expected) == ["output"]):
        return pred["output"]
    return pred


def outputs_match(expected: Any, predicted_text: str, rel_tol: float = 1e-9,
                  max_literal_chars: int = 10_000) -> bool:
    """Whether `predicted_text` denotes the `expected` output (a string to parse, or a JSON value)."""
    exp = parse_value(expected, max_literal_chars) if isinstance(expected, str) else expected
    pred = _unwrap_output(parse_value(predicted_text, max_literal_chars), exp)
    if values_equal(exp, pred, rel_tol):
        return True
    # Both sides also compared as raw text, so an expected string that happens to parse still matches itself.
    exp_text = expected if isinstance(expected, str) else json.dumps(expected)
    return _collapse_ws(exp_text) == _collapse_ws(predicted_text)


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "an object", set: "a set", type(None): "null/None"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=repr)


@register_task("codeio")
@dataclass(frozen=True)
class CodeIOTask:
    """Options: `instruction` appended to the question (empty: none), `float_rel_tol` for numbers,
    `max_literal_chars` bounding Python-literal parsing."""

    instruction: str = DEFAULT_INSTRUCTION
    float_rel_tol: float = 1e-9
    max_literal_chars: int = 10_000
    name: str = field(default="codeio", init=False)
    fields: Any = field(default_factory=lambda: {
        "question": Field((str,), required=False, description="the full question (else built from code+input)"),
        "code": Field((str,), required=False, description="the program"),
        "input": Field(ANY_JSON, required=False, description="the program's input"),
        "answer": Field(ANY_JSON, description="the expected output: a string or any JSON value"),
    }, init=False)

    def __post_init__(self):
        if not 0.0 <= self.float_rel_tol < 1.0 or self.max_literal_chars < 0:
            raise ValueError("codeio task: float_rel_tol must be in [0, 1) and max_literal_chars >= 0")

    def check_problem(self, problem: Problem) -> str | None:
        """A reason the problem cannot be posed, or None (called on load for each record)."""
        if "question" in problem or ("code" in problem and "input" in problem):
            return None
        return "a codeio problem needs a 'question', or both 'code' and 'input'"

    def format_problem(self, problem: Problem) -> str:
        if "question" in problem:
            body = str(problem["question"]).strip()
        else:
            inp = problem["input"]
            inp = inp if isinstance(inp, str) else json.dumps(inp)
            body = f"Program:\n```python\n{str(problem['code']).rstrip()}\n```\n\nInput:\n```\n{inp}\n```"
        return f"{body}\n\n{self.instruction}" if self.instruction else body

    def score(self, problem: Problem, completion: str) -> Score:
        expected = problem["answer"]
        completion = completion if isinstance(completion, str) else str(completion)
        shown = shorten(_show(expected))
        predicted, where = extract_prediction(completion)
        if predicted is None:
            return Score(0.0, f"No output was given: {where}. The expected output is {shown}.")
        if outputs_match(expected, predicted, self.float_rel_tol, self.max_literal_chars):
            return Score(1.0, f"Correct: the predicted output {shorten(predicted)} matches the expected output.",
                         predicted)
        feedback = f"Incorrect: the predicted output was {shorten(predicted)}, but the expected output is {shown}."
        exp_v = parse_value(expected, self.max_literal_chars) if isinstance(expected, str) else expected
        pred_v = _unwrap_output(parse_value(predicted, self.max_literal_chars), exp_v)
        if _type_name(exp_v) != _type_name(pred_v):
            feedback += f" (Expected {_type_name(exp_v)}, got {_type_name(pred_v)}.)"
        if where == "text":
            feedback += " No ``` block or 'Output:' line was found, so the whole response was read as the answer."
        return Score(0.0, feedback, predicted)
