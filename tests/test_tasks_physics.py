"""Physics: numbers read from the last \\boxed{} (units, separators, scientific notation), relative tolerance,
math-verify for symbolic answers, feedback and loading."""

import json
import time
from pathlib import Path

import pytest

from fst_jax.tasks import DataError, PhysicsTask, get_task, load_problems, parse_number

DATA = Path(__file__).parent / "data"
FIELDS = {"question": "problem", "answer": "final_answer", "id": "pid"}
TASK = PhysicsTask()


@pytest.mark.parametrize("text, value", [
    ("19.6", 19.6), ("-4", -4.0), ("+.5", 0.5), ("3.", 3.0),
    ("19.6 m", 19.6), ("19.6\\,\\text{m}", 19.6), ("19.6 \\mathrm{m/s^2}", 19.6), ("5 eV", 5.0),
    ("86,400", 86400.0), ("86{,}400", 86400.0), ("86\\,400", 86400.0), ("1,234,567.5 J", 1234567.5),
    ("1.5e-3", 1.5e-3), ("1.5E3 J", 1500.0), ("2e8", 2e8),
    ("3.0 \\times 10^{8}\\,\\text{m/s}", 3e8), ("3\\times10^8", 3e8), ("3 \\cdot 10^{-2}", 0.03),
    ("3×10^8", 3e8), ("3*10**-2", 0.03), ("10^{-3}", 1e-3), ("−3.2", -3.2), ("$-1.6\\times 10^{-19}$ C", -1.6e-19),
    ("90^\\circ", 90.0), ("90°", 90.0), ("25\\%", 25.0),
    ("\\frac{3}{4}", 0.75), ("\\dfrac{1}{8}", 0.125), ("3/4", 0.75), ("\\sqrt{2}", 2 ** 0.5), ("2\\pi", 6.283185307179586),
    # not numbers
    ("1,2", None), ("x+1", None), ("", None), ("abc", None), ("１２", None), ("٣", None), ("1e400", None),
    ("\\times 10^3", None), ("1" * 2000, None),
])
def test_parse_number(text, value):
    got = parse_number(text, timeout_s=5)
    if value is None:
        assert got is None
    else:
        assert got == pytest.approx(value, rel=1e-12)


PROBLEM = {"question": "How far?", "answer": "3.0e8 m/s"}


@pytest.mark.parametrize("completion, reward, extracted", [
    ("so \\boxed{3.0 \\times 10^{8}\\ \\text{m/s}}", 1.0, "3.0 \\times 10^{8}\\ \\text{m/s}"),
    ("\\boxed{2.98e8}", 1.0, "2.98e8"),                                  # 0.67% off: inside 1e-2
    ("\\boxed{2.96e8}", 0.0, "2.96e8"),                                  # 1.3% off
    ("\\boxed{300,000,000}", 1.0, "300,000,000"),
    ("\\boxed{1} and then \\boxed{3e8}", 1.0, "3e8"),                    # the last box
    ("\\boxed{3e8} and then \\boxed{1}", 0.0, "1"),
    ("<think>\\boxed{3e8}</think>\\boxed{7}", 0.0, "7"),                 # not the thinking block's box
    ("\\boxed{3e8", 0.0, None),                                          # unbalanced: never closed
    ("\\boxed{}", 0.0, ""),
    ("the answer is 3e8", 0.0, None),
    ("\\boxed{３e8}", 0.0, "３e8"),                                        # unicode digits are not read
    ("x" * 100_000 + "\\boxed{3e8}", 1.0, "3e8"),                         # a 100 kB reply
])
def test_reward(completion, reward, extracted):
    t0 = time.perf_counter()
    s = TASK.score(PROBLEM, completion)
    assert (s.reward, s.extracted) == (reward, extracted), s.feedback
    assert time.perf_counter() - t0 < 2.0


def test_tolerance_is_configurable_and_relative_to_the_gold_answer():
    strict = get_task("physics", rel_tol=1e-3)
    assert strict.score(PROBLEM, "\\boxed{2.998e8}").reward == 1.0
    assert strict.score(PROBLEM, "\\boxed{2.98e8}").reward == 0.0
    zero = {"question": "?", "answer": "0"}
    assert TASK.score(zero, "\\boxed{0.0}").reward == 1.0
    assert TASK.score(zero, "\\boxed{1e-9}").reward == 0.0             # relative to 0: only 0 itself
    assert get_task("physics", abs_tol=1e-6).score(zero, "\\boxed{1e-9}").reward == 1.0
    with pytest.raises(ValueError, match="rel_tol must be in"):
        get_task("physics", rel_tol=2.0)


def test_feedback_names_the_values_and_hints():
    s = TASK.score(PROBLEM, "\\boxed{3e5}")
    assert "does not match 3.0e8 m/s (= 3e+08) within 1.00%" in s.feedback
    assert "off by a factor of 10^-3: check the units and prefixes" in s.feedback
    assert "wrong sign" in TASK.score(PROBLEM, "\\boxed{-3e8}").feedback
    assert "is not a number that could be read" in TASK.score(PROBLEM, "\\boxed{fast}").feedback
    assert "never closed" in TASK.score(PROBLEM, "\\boxed{3e8").feedback
    assert TASK.score(PROBLEM, "\\boxed{3e8}").feedback.startswith("Correct: 3e8 (= 3e+08) is within 1.00%")


def test_symbolic_gold_answers_use_math_verify():
    sym = {"question": "?", "answer": "\\frac{v^2}{2g}"}
    assert TASK.score(sym, "\\boxed{v^2/(2g)}").reward == 1.0
    assert TASK.score(sym, "\\boxed{v^2/g}").reward == 0.0
    root = {"question": "?", "answer": "\\sqrt{2}"}                      # a numeric constant: compared as a number
    assert TASK.score(root, "\\boxed{1.414}").reward == 1.0
    assert TASK.score(root, "\\boxed{\\sqrt{2}}").reward == 1.0


def test_load_fixture_with_field_mapping():
    problems = load_problems(DATA / "physics_small.jsonl", TASK, FIELDS)
    assert [p["id"] for p in problems] == ["p1", "p2", "p3", "p4", "p5", "p6"]
    assert problems[2]["answer"] == "9" and problems[0]["unit"] == "m" and "unit" not in problems[3]
    assert TASK.format_problem(problems[0]).endswith("Give the answer in m.\n\n" + TASK.instruction)
    answers = ["\\boxed{19.6 m}", "\\boxed{3.97e-19}", "\\boxed{9\\text{ J}}", "\\boxed{86400}", "\\boxed{1.41}",
               "\\boxed{-1.6 \\times 10^{-19}}"]
    assert [TASK.score(p, a).reward for p, a in zip(problems, answers)] == [1.0] * 6


def test_loader_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl", TASK, FIELDS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "q", "final_answer": "1"}) + "\n\n{\"problem\": \"q\",\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 3: invalid JSON"):
        load_problems(bad, TASK, {"question": "problem", "answer": "final_answer"})
    with pytest.raises(DataError, match=r"physics_small.jsonl, line 1: missing field 'solution' \(mapped to 'answer'\)"):
        load_problems(DATA / "physics_small.jsonl", TASK, {"question": "problem", "answer": "solution"})
    with pytest.raises(DataError, match="names 'units', which task 'physics' does not use"):
        load_problems(DATA / "physics_small.jsonl", TASK, {"units": "unit"})
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"problem": "q", "final_answer": " "}) + "\n")
    with pytest.raises(DataError, match="empty.jsonl, line 1: the answer is empty"):
        load_problems(empty, TASK, {"question": "problem", "answer": "final_answer"})
