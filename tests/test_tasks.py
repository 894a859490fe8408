"""Tasks: boxed-answer parsing, math-verify equivalence, CodeIO normalisation, feedback, problem files."""

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fst_jax.tasks import (
    CodeIOTask, DataError, MathTask, Score, Task, extract_prediction, get_task, last_boxed, load_problems,
    outputs_match, read_records, scan_boxed, task_names,
)
from fst_jax.tasks import math as math_task

DATA = Path(__file__).parent / "data"
MATH_FIELDS = {"question": "problem", "answer": "solution"}


# ---- the boxed-answer parser ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed {x+1}", "x+1"),
    ("\\boxed\n{7}", "7"),
    (r"\fbox{12}", "12"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                  # escaped braces are literal
    (r"\boxed{a\}b}", r"a\}b"),
    (r"\boxed{\boxed{1}}", r"\boxed{1}"),                # a box inside a box belongs to it
    (r"first \boxed{1} then \boxed{2}, finally \boxed{3}", "3"),   # the LAST box
    (r"\boxed{1} \boxed{2", "1"),                         # an unclosed box ends the scan
    (r"\boxeds{3} \boxed{4}", "4"),                       # \boxeds is another macro
    (r"$\text{area} = \boxed{\dfrac{49}{2}}$ units", r"\dfrac{49}{2}"),
    (r"\boxed{}", ""),
    ("no box here", None),
    (r"\boxed{never closed", None),
    (r"\boxed 5", None),                                  # only the braced form is an answer
    ("", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_scan_boxed_reports_all_boxes_and_unclosed():
    scan = scan_boxed(r"\boxed{a} and \fbox{b{c}} then \boxed{d")
    assert scan.boxes == ("a", "b{c}")
    assert scan.unclosed is True
    assert scan_boxed(r"\boxed{a}").unclosed is False


# Balanced LaTeX-ish strings: plain characters, escaped characters (\x) and nested {...} groups.
_plain = st.text(alphabet=st.characters(blacklist_characters="{}\\", blacklist_categories=("Cs",)), max_size=8)
_escaped = st.sampled_from([r"\{", r"\}", r"\\", r"\frac", r"\boxed", r"\,", "\\ "])
balanced = st.recursive(
    st.lists(st.one_of(_plain, _escaped), max_size=4).map("".join),
    lambda inner: st.lists(st.one_of(_plain, _escaped, inner.map(lambda s: "{" + s + "}")), max_size=4).map("".join),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(balanced)
def test_boxed_round_trip(s):
    assert last_boxed("\\boxed{" + s + "}") == s


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\\", blacklist_categories=("Cs",)), max_size=30),
       balanced)
def test_boxed_round_trip_after_prose(prefix, s):
    # Prose (its braces made harmless, since an unclosed brace there is not our concern) never hides the box.
    assert last_boxed(prefix.replace("{", "(").replace("}", ")") + " \\boxed{" + s + "} done.") == s


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\{}boxedfx 1$")) | st.characters(), max_size=200))
def test_boxed_parser_never_crashes(text):
    scan = scan_boxed(text)
    assert all(isinstance(b, str) for b in scan.boxes)
    assert last_boxed(text) in (*scan.boxes[-1:], None)


# ---- math scoring -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def math():
    return get_task("math")


@pytest.mark.parametrize("gold, completion, reward", [
    (r"\frac{1}{2}", r"The answer is \boxed{0.5}.", 1.0),
    ("0.5", r"\boxed{\frac{1}{2}}", 1.0),
    (r"\frac{3}{8}", r"\boxed{\dfrac{3}{8}}", 1.0),
    ("2x", r"\boxed{x*2}", 1.0),
    ("2x", r"\boxed{2 x}", 1.0),
    (r"\{1, 2\}", r"\boxed{\{2, 1\}}", 1.0),
    ("42", r"\boxed{42}", 1.0),
    ("42", r"\boxed{41}", 0.0),
    (r"\frac{1}{2}", r"\boxed{\frac{1}{3}}", 0.0),
    ("2x", r"\boxed{2y}", 0.0),
    ("42", r"\boxed{42} wait, no: \boxed{43}", 0.0),      # the last box counts ...
    ("43", r"\boxed{42} wait, no: \boxed{43}", 1.0),      # ... in both directions
    ("9", "The answer is 9.", 0.0),                       # right value, but not boxed
])
def test_math_rewards(math, gold, completion, reward):
    assert math.score({"question": "q", "answer": gold}, completion).reward == reward


def test_math_gold_from_worked_solution(math):
    problem = {"question": "q", "answer": r"There are 8 marbles, so \boxed{\frac{3}{8}}."}
    s = math.score(problem, r"\boxed{0.375}")
    assert s == Score(1.0, r"Correct: the final answer 0.375 matches the expected answer \frac{3}{8}.", "0.375")


def test_math_feedback_names_expected_and_extracted(math):
    s = math.score({"question": "q", "answer": "42"}, r"I think \boxed{41}")
    assert s.reward == 0.0 and s.extracted == "41"
    assert "41" in s.feedback and "42" in s.feedback and s.feedback.startswith("Incorrect")


def test_math_feedback_when_no_box(math):
    s = math.score({"question": "q", "answer": "42"}, "I am not sure.")
    assert s.reward == 0.0 and s.extracted is None
    assert "no \\boxed" in s.feedback and "expected answer is 42" in s.feedback


def test_math_feedback_when_answer_not_boxed(math):
    s = math.score({"question": "q", "answer": r"\frac{1}{2}"}, "Dividing, x = 1/2")
    assert s.reward == 0.0
    assert "not inside \\boxed{}" in s.feedback and r"\boxed{\frac{1}{2}}" in s.feedback


def test_math_feedback_when_truncated_or_empty(math):
    s = math.score({"question": "q", "answer": "7"}, r"so the answer is \boxed{7")
    assert s.reward == 0.0 and "never closed" in s.feedback
    s = math.score({"question": "q", "answer": "7"}, r"\boxed{ }")
    assert s.reward == 0.0 and s.extracted == "" and "empty" in s.feedback


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=120))
def test_math_score_never_crashes(text):
    math = get_task("math")
    for completion in (text, "\\boxed{" + text + "}"):
        s = math.score({"question": "q", "answer": "3"}, completion)
        assert s.reward in (0.0, 1.0) and isinstance(s.feedback, str)


@pytest.mark.parametrize("weird", ["\\boxed{\\frac{1}{0}}", "\\boxed{" + "(" * 40 + "}", "\\boxed{\x00\ud800}",
                                   "\\boxed{" + "9" * 5000 + "}", "\\boxed{\\sqrt{-}}", "\\boxed{x=}"])
def test_math_score_survives_pathological_answers(math, weird):
    assert math.score({"question": "q", "answer": "3"}, weird).reward == 0.0


def test_math_scoring_in_a_worker_thread(math):
    # math-verify's timeout uses signal.alarm, which raises outside the main thread; we must not.
    problem = {"question": "q", "answer": r"\frac{1}{2}"}
    with ThreadPoolExecutor(2) as pool:
        rewards = list(pool.map(lambda c: math.score(problem, c).reward, [r"\boxed{0.5}", r"\boxed{0.6}"]))
    assert rewards == [1.0, 0.0]


def test_math_verify_errors_and_timeouts_are_a_zero(monkeypatch, math):
    import math_verify
    from math_verify.errors import TimeoutException

    def boom(*a, **k):
        raise TimeoutException("Operation timed out!")

    monkeypatch.setattr(math_verify, "verify", boom)
    assert math.score({"question": "q", "answer": "1/2"}, r"\boxed{0.5}").reward == 0.0
    assert math.score({"question": "q", "answer": "1/2"}, r"\boxed{ 1 / 2 }").reward == 1.0  # same string


def test_math_timeout_option_reaches_math_verify(monkeypatch):
    import math_verify

    seen = []
    real_parse = math_verify.parse

    def spy(pred, **kw):
        seen.append((threading.current_thread() is threading.main_thread(), kw.get("parsing_timeout")))
        return real_parse(pred, **kw)

    monkeypatch.setattr(math_verify, "parse", spy)
    math_task._parse_cached.cache_clear()
    task = get_task("math", timeout_seconds=2)
    assert task.score({"question": "q", "answer": "0.25"}, r"\boxed{1/4}").reward == 1.0
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(task.score, {"question": "q", "answer": "0.75"}, r"\boxed{3/4}").result().reward == 1.0
    assert (True, 2) in seen and (False, None) in seen and (True, 5) not in seen


def test_math_max_answer_chars_option():
    long_sum = "+".join(["1"] * 30)      # 59 characters, equal to 30
    assert get_task("math").score({"question": "q", "answer": "30"}, f"\\boxed{{{long_sum}}}").reward == 1.0
    short = get_task("math", max_answer_chars=20)
    assert short.score({"question": "q", "answer": "30"}, f"\\boxed{{{long_sum}}}").reward == 0.0
    assert short.score({"question": "q", "answer": "30"}, r"\boxed{30}").reward == 1.0


def test_math_instruction_option():
    p = {"question": "  What is 6 times 7? ", "answer": "42"}
    assert get_task("math").format_problem(p) == (
        "What is 6 times 7?\n\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert get_task("math", instruction="").format_problem(p) == "What is 6 times 7?"
    assert get_task("math", instruction="Box it.").format_problem(p) == "What is 6 times 7?\n\nBox it."


# ---- CodeIO -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expected, predicted, match", [
    ("1", "1.0", True),                                     # numbers by value
    (1, "1.0", True),
    ('{"a": 1, "b": [1, 2]}', '{"b": [1, 2.0], "a": 1}', True),   # key order irrelevant
    ({"a": 1, "b": [1, 2]}, "{'b': (1, 2), 'a': 1}", True),       # Python literal, tuple == list
    ("[1, 2, 3]", "[1,2,3]", True),
    ("[1, 2, 3]", "[1, 3, 2]", False),
    ("hello  world", "hello world\n", True),               # whitespace-normalised strings
    ('"hello"', "hello", True),                             # a JSON string equals its bare text
    ("hello", "'hello'", True),
    ("Hello", "hello", False),
    ("1", '"1"', False),                                    # a number is not a string
    ("true", "1", False),                                   # booleans are not numbers
    (True, "True", True),                                   # Python and JSON spellings of a boolean
    (None, "None", True),
    ("null", "None", True),
    ({"1": 2}, "{1: 2}", True),                             # dict keys compared as strings
    ("0.1", "0.1000000000001", True),                       # float tolerance 1e-9
    ("0.1", "0.11", False),
    ("NaN", "nan", False),                                  # bare nan is not a literal: compared as text
    ("NaN", "NaN", True),
    ("{1, 2}", "{2, 1}", True),                             # sets
    ("[1, 2", "[1,  2", True),                              # unparseable both: text compare
    ("", "", True),
])
def test_codeio_outputs_match(expected, predicted, match):
    assert outputs_match(expected, predicted) is match


@pytest.mark.parametrize("completion, answer, where", [
    ("reasoning...\n```json\n[1, 2]\n```", "[1, 2]", "fence"),
    ("```\n1\n```\nactually:\n```python\n2\n```\n", "2", "fence"),
    ("Let me trace it.\nOutput: 42\n", "42", "output_label"),
    ("**Output:** [3]", "[3]", "output_label"),
    ("output: 1\nOUTPUT: 2", "2", "output_label"),
    ("  42  ", "42", "text"),
    ("<think>maybe ```\n1\n```</think>\n```\n2\n```", "2", "fence"),
    ("<think>never finished ```\n1\n```", None, "the response ended inside its <think> block"),
    ("   ", None, "the response is empty"),
])
def test_codeio_extraction(completion, answer, where):
    assert extract_prediction(completion) == (answer, where)


def test_codeio_scoring_and_feedback():
    task = get_task("codeio")
    problem = {"code": "def f(xs):\n    return sorted(xs)[::-1]", "input": [3, 1, 2], "answer": [3, 2, 1]}
    assert task.score(problem, "Reversed sort.\n```\n[3, 2, 1]\n```").reward == 1.0
    assert task.score(problem, '```json\n{"output": [3, 2, 1]}\n```').reward == 1.0   # CodeI/O's format
    s = task.score(problem, "```\n[1, 2, 3]\n```")
    assert s.reward == 0.0 and s.extracted == "[1, 2, 3]"
    assert s.feedback == "Incorrect: the predicted output was [1, 2, 3], but the expected output is [3, 2, 1]."
    s = task.score(problem, "```\n'321'\n```")
    assert "(Expected a list, got a string.)" in s.feedback
    s = task.score(problem, "I believe it is 3 2 1")
    assert "No ``` block or 'Output:' line" in s.feedback
    s = task.score(problem, "<think>hmm")
    assert s.reward == 0.0 and "inside its <think> block" in s.feedback and "[3, 2, 1]" in s.feedback


def test_codeio_never_executes_model_output(tmp_path):
    marker = tmp_path / "pwned"
    task = get_task("codeio")
    payload = f"```\n__import__('pathlib').Path({str(marker)!r}).write_text('x')\n```"
    assert task.score({"question": "q", "answer": "1"}, payload).reward == 0.0
    assert task.score({"question": "q", "answer": "1"}, f"Output: {payload[4:-4]}").reward == 0.0
    assert not marker.exists()


def test_codeio_format_problem():
    task = get_task("codeio", instruction="")
    assert task.format_problem({"question": " Q? ", "answer": 1}) == "Q?"
    assert task.format_problem({"code": "def f(x):\n    return x\n", "input": {"x": 1}, "answer": 1}) == (
        'Program:\n```python\ndef f(x):\n    return x\n```\n\nInput:\n```\n{"x": 1}\n```')
    assert get_task("codeio").format_problem({"question": "Q", "answer": 1}).startswith("Q\n\nPredict the exact")


def test_codeio_options():
    assert not outputs_match("1.0", "1.0001")
    assert get_task("codeio", float_rel_tol=1e-3).score({"question": "q", "answer": 1.0}, "1.0001").reward == 1.0
    # With literal parsing off, a Python dict no longer equals the JSON one.
    assert get_task("codeio").score({"question": "q", "answer": {"a": 1}}, "{'a': 1}").reward == 1.0
    no_literals = get_task("codeio", max_literal_chars=0)
    assert no_literals.score({"question": "q", "answer": {"a": 1}}, "{'a': 1}").reward == 0.0


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200), st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.none(),
                                        st.lists(st.integers(), max_size=3)))
def test_codeio_score_never_crashes(text, expected):
    s = get_task("codeio").score({"question": "q", "answer": expected}, text)
    assert s.reward in (0.0, 1.0)


@pytest.mark.parametrize("value", [1, -2.5, [1, [2, {"a": None}]], {"k": "v", "n": [True, False]}, "text", None])
def test_codeio_json_round_trip_is_correct(value):
    assert get_task("codeio").score({"question": "q", "answer": value}, f"```\n{json.dumps(value)}\n```").reward == 1.0


# ---- the registry -----------------------------------------------------------------------------------------

def test_registry():
    assert {"math", "codeio"} <= set(task_names())
    assert isinstance(get_task("math"), MathTask) and isinstance(get_task("codeio"), CodeIOTask)
    assert isinstance(get_task("math"), Task)
    with pytest.raises(ValueError, match="unknown task 'chemistry'; known tasks: .*codeio, .*math"):
        get_task("chemistry")
    with pytest.raises(ValueError, match=r"task 'math' has no option\(s\) 'temperature'; its options are: instruction"):
        get_task("math", temperature=0.6)
    with pytest.raises(ValueError, match="reward must lie in"):
        Score(1.5, "")


# ---- problem files ----------------------------------------------------------------------------------------

def test_load_math_fixture():
    problems = load_problems(DATA / "math_small.jsonl", get_task("math"), MATH_FIELDS)
    assert len(problems) == 10
    assert problems[0] == {"question": "A jar holds 3 red and 5 blue marbles. What fraction of the marbles are red?",
                           "answer": "There are 8 marbles, 3 of them red, so the fraction is \\boxed{\\frac{3}{8}}.",
                           "id": "math_small.jsonl:1"}
    assert problems[4]["id"] == "math_small.jsonl:6"            # the blank line 5 still counts
    assert problems[6]["answer"] == "49"                       # a numeric answer becomes a string
    with_ids = load_problems(DATA / "math_small.jsonl", get_task("math"), {**MATH_FIELDS, "id": "uid"})
    assert [p["id"] for p in with_ids] == [f"m{i}" for i in range(1, 11)]
    math = get_task("math")
    assert math.score(problems[5], r"\boxed{\{2,1\}}").reward == 1.0
    assert math.score(problems[6], r"\boxed{49}").reward == 1.0


def test_load_codeio_fixture():
    task = get_task("codeio")
    problems = load_problems(DATA / "codeio_small.jsonl", task,
                             {"question": "prompt", "code": "program", "input": "args", "answer": "expected"})
    assert [p["answer"] for p in problems] == [[3, 2, 1], {"a": 2, "b": 1, "c": 1}, 1.5, "HEY!", False, "11"]
    assert "question" not in problems[0] and problems[5]["question"].startswith("What does")
    assert task.score(problems[1], "```\n{'c': 1, 'b': 1, 'a': 2}\n```").reward == 1.0
    assert task.score(problems[4], "Output: False").reward == 1.0
    assert task.score(problems[4], "Output: 0").reward == 0.0


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_bad_json_names_file_and_line():
    path = DATA / "math_bad_json.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}, line 3: invalid JSON"):
        load_problems(path, get_task("math"), MATH_FIELDS)


@pytest.mark.parametrize("lines, message", [
    (['{"problem": "a", "solution": "1"}', '{"problem": "b"}'],
     r"line 2: missing field 'solution' \(mapped to 'answer'\); the record's keys are 'problem'"),
    (['{"problem": "a", "solution": "1"}', "", '{"problem": ["b"], "solution": "2"}'],
     r"line 3: field 'problem' should be a string, got a list"),
    (['{"problem": "a", "solution": true}'], r"line 1: field 'solution' should be a string or a number, got a boolean"),
    (['{"problem": "a", "solution": "1"}', '[1, 2]'], r"line 2: expected a JSON object, got a list"),
    (['[{"problem": "a", "solution": "1"},', '{"problem": "b", "solution": "2"}]'],
     r"line 1: invalid JSON.*looks like a JSON array"),
])
def test_malformed_records(tmp_path, lines, message):
    path = _write(tmp_path, "p.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}, {message}"):
        load_problems(path, get_task("math"), MATH_FIELDS)


def test_other_file_errors(tmp_path):
    math = get_task("math")
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl", math)
    with pytest.raises(DataError, match="no data files match"):
        load_problems(str(tmp_path / "*.jsonl"), math)
    empty = _write(tmp_path, "empty.jsonl", "\n\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(empty))}: contains no problems"):
        load_problems(empty, math)
    latin = _write(tmp_path, "latin.jsonl",
                   b'{"question": "a", "answer": "1"}\n{"question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(latin))}, line 2: not valid UTF-8"):
        load_problems(latin, math)
    with pytest.raises(DataError, match="names 'solutoin', which task 'math' does not use"):
        load_problems(DATA / "math_small.jsonl", math, {"question": "problem", "solutoin": "solution"})
    dup = _write(tmp_path, "dup.jsonl",
                 '{"i": 1, "question": "a", "answer": "1"}\n{"i": 1, "question": "b", "answer": "2"}\n')
    d = re.escape(str(dup))
    with pytest.raises(DataError, match=rf"{d}, line 2: duplicate id '1' \(first at {d}, line 1\)"):
        load_problems(dup, math, {"id": "i"})
    bad = _write(tmp_path, "c.jsonl", '{"code": "x", "answer": 1}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}, line 1: a codeio problem needs a 'question', "
                                        r"or both 'code' and 'input'"):
        load_problems(bad, get_task("codeio"))


def test_glob_lists_and_nested_keys(tmp_path):
    _write(tmp_path, "b.jsonl", '{"q": "b?", "rm": {"gt": "2"}}\n')
    _write(tmp_path, "a.jsonl", '{"q": "a?", "rm": {"gt": "1"}}\n')
    fields = {"question": "q", "answer": "rm.gt"}
    problems = load_problems(str(tmp_path / "*.jsonl"), get_task("math"), fields)
    assert [(p["question"], p["answer"], p["id"]) for p in problems] == [
        ("a?", "1", "a.jsonl:1"), ("b?", "2", "b.jsonl:1")]
    assert load_problems([tmp_path / "b.jsonl", tmp_path / "a.jsonl"], get_task("math"), fields)[0]["answer"] == "2"


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            load_problems(path, get_task("math"))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": ["a?", "b?"], "solution": ["1", None]}), path)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, row 2: field 'solution' should be"):
        load_problems(path, get_task("math"), MATH_FIELDS)
    assert [r for _, r in read_records(path)][0] == {"problem": "a?", "solution": "1"}
