"""Star-graph search: generation from a seed, path validity, the exact-match reward and GEPA feedback, loading."""

import json
import time

import pytest

from fst_jax.tasks import DataError, StarGraphTask, get_task, load_problems
from fst_jax.tasks.star_graph import parse_path, path_error

# A hand-made graph: centre 5, arms 5→1→2→3, 5→7→8→9, 5→4→6→0 (path_length 4: 3 nodes per arm).
EDGES = [[7, 8], [1, 2], [5, 4], [2, 3], [5, 1], [8, 9], [4, 6], [5, 7], [6, 0]]
PROBLEM = {"edges": EDGES, "source": 5, "target": 9, "path": [5, 7, 8, 9], "id": "hand"}
TASK = StarGraphTask(degree=3, path_length=4, num_nodes=10)


@pytest.mark.parametrize("options", [dict(), dict(degree=3, path_length=3, num_nodes=36), dict(degree=2, path_length=2,
                                                                                              num_nodes=3)])
def test_generation_is_reproducible_and_every_path_valid(options):
    task = get_task("star_graph", **options)
    d, p, n = task.degree, task.path_length, task.num_nodes
    problems = task.make_problems(30, seed=7)
    assert problems == task.make_problems(30, seed=7)
    assert problems != task.make_problems(30, seed=8)
    for prob in problems:
        edges, path = prob["edges"], prob["path"]
        assert path_error(edges, prob["source"], prob["target"], path) is None
        assert task.check_problem(prob) is None
        assert len(edges) == d * (p - 1) and len(path) == p
        nodes = {x for e in edges for x in e}
        assert len(nodes) == 1 + d * (p - 1) and all(0 <= x < n for x in nodes)
        assert sum(u == prob["source"] for u, _ in edges) == d                    # the centre has d arms
        assert not any(u == prob["target"] for u, _ in edges)                     # the target ends an arm
        assert task.score(prob, "\\boxed{" + ", ".join(map(str, path[1:])) + "}").reward == 1.0
    assert len({p_["target"] for p_ in problems}) > 1
    if n > 10:  # large label ranges: no two graphs alike
        assert len({tuple(map(tuple, p_["edges"])) for p_ in problems}) == 30


def test_paper_defaults_and_option_errors():
    task = get_task("star_graph")
    assert (task.degree, task.path_length, task.num_nodes, task.reward) == (25, 20, 500, "exact")
    with pytest.raises(ValueError, match=r"num_nodes=20 labels are too few for degree=5 arms of path_length=10 \(needs >= 46\)"):
        get_task("star_graph", degree=5, path_length=10, num_nodes=20)
    with pytest.raises(ValueError, match="reward must be 'exact' or 'prefix'"):
        get_task("star_graph", reward="dense")
    with pytest.raises(ValueError, match="has no option"):
        get_task("star_graph", arms=3)


def test_format_problem_lists_edges_source_target():
    text = TASK.format_problem(PROBLEM)
    assert text.startswith("Edges: 7,8 | 1,2 | 5,4 | 2,3 | 5,1 | 8,9 | 4,6 | 5,7 | 6,0\nSource: 5\nTarget: 9\n\n")
    assert "\\boxed{}" in text
    assert StarGraphTask(degree=3, path_length=4, num_nodes=10, instruction="").format_problem(PROBLEM).endswith(
        "Target: 9")


@pytest.mark.parametrize("completion", [
    "\\boxed{7, 8, 9}", "\\boxed{7 8 9}", "\\boxed{7,8,9}", "\\boxed{ 7 ,8\n9 }", "\\boxed{7, 8, 9,}",
    "first \\boxed{1, 2, 3} then \\boxed{7, 8, 9}",                  # the last box counts
    "<think>\\boxed{1, 2, 3}</think> so \\boxed{7, 8, 9}",            # not the thinking block's
    "x" * 100_000 + " \\boxed{7, 8, 9}",                              # a 100 kB reply
])
def test_exact_match_reward_correct(completion):
    t0 = time.perf_counter()
    s = TASK.score(PROBLEM, completion)
    assert (s.reward, s.extracted) == (1.0, "7, 8, 9") and s.feedback.startswith("Correct")
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("completion, feedback", [
    ("\\boxed{7, 8, 9} then \\boxed{1, 2, 3}", "at step 1 (5 -> 1) the path enters the wrong arm: from 5 the way "
                                               "to the target 9 goes to 7, not 1."),
    ("no box at all: 7, 8, 9", "No path was read: the response contains no \\boxed{...}."),
    ("\\boxed{}", "The answer could not be read: the final \\boxed{} is empty."),
    ("\\boxed{7, 8, 9", "the final \\boxed{ was never closed"),        # unbalanced: a truncated reply
    ("\\boxed{7, 8, 9}}", None),                                     # a stray closing brace after is harmless
    ("\\boxed{７, ８, ９}", "'７' is not a node label"),                  # unicode (fullwidth) digits
    ("\\boxed{٧, ٨, ٩}", "'٧' is not a node label"),                    # Arabic-Indic digits
    ("\\boxed{5, 7, 8, 9}", "the answer starts with the source 5; list only the nodes after it."),
    ("\\boxed{7, 9}", "at step 2 (7 -> 9) the path leaves the graph: there is no edge from 7 to 9."),
    ("\\boxed{7, 8, 11}", "at step 3 (8 -> 11) the path leaves the graph: 11 is not a node of this graph."),
    ("\\boxed{6, 0}", "at step 1 (5 -> 6) the path leaves the graph: there is no edge from the source 5 to 6."),
    ("\\boxed{7, 8}", "the path stops at 8 after 2 step(s), before reaching the target 9."),
    ("\\boxed{7, 8, 9, 7}", "the path reaches the target 9 at step 3 but goes on past it."),
    ("\\boxed{7; 8; 9}", "'7;' is not a node label"),
    ("<think>so \\boxed{7, 8, 9}", "the response ended inside its <think> block"),
    ("\\boxed{-7, 8, 9}", "'-7' is not a node label"),
])
def test_wrong_answers_score_zero_with_feedback(completion, feedback):
    s = TASK.score(PROBLEM, completion)
    if feedback is None:
        assert s.reward == 1.0
        return
    assert s.reward == 0.0
    assert feedback in s.feedback, s.feedback
    assert s.feedback.endswith("The correct answer is \\boxed{7, 8, 9}.")


def test_prefix_reward_is_dense_but_exact_only_for_the_path():
    task = StarGraphTask(degree=3, path_length=4, num_nodes=10, reward="prefix")
    assert [task.score(PROBLEM, f"\\boxed{{{a}}}").reward for a in ("7, 8, 9", "7, 8", "7, 8, 6", "7", "1, 2, 3",
                                                                      "7, 8, 9, 1")] == [1.0, 2 / 3, 2 / 3, 1 / 3, 0, 3 / 4]
    assert task.score(PROBLEM, "nothing").reward == 0.0


def test_parse_path():
    assert parse_path(" 12,3  4 ,5 ") == ([12, 3, 4, 5], "")
    assert parse_path("")[0] is None and parse_path("1.5")[0] is None and parse_path("a, b")[0] is None


def test_load_problems_from_jsonl_checks_every_path(tmp_path):
    problems = TASK.make_problems(3, seed=0)
    good = tmp_path / "star.jsonl"
    good.write_text("".join(json.dumps({"graph": p["edges"], "src": p["source"], "dst": p["target"],
                                        "path": p["path"]}) + "\n" for p in problems))
    fields = {"edges": "graph", "source": "src", "target": "dst"}
    loaded = load_problems(good, TASK, fields)
    assert [(p["edges"], p["source"], p["target"], p["path"]) for p in loaded] == \
        [(p["edges"], p["source"], p["target"], p["path"]) for p in problems]
    assert [p["id"] for p in loaded] == ["star.jsonl:1", "star.jsonl:2", "star.jsonl:3"]

    bad = tmp_path / "bad.jsonl"
    broken = dict(problems[1], path=[problems[1]["source"], problems[1]["target"]])
    bad.write_text(json.dumps(problems[0]) + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: the path uses \d+ -> \d+, which is not an edge"):
        load_problems(bad, TASK)
    (tmp_path / "bad2.jsonl").write_text(json.dumps(dict(problems[0], edges=[[1, 2, 3]])) + "\n")
    with pytest.raises(DataError, match="bad2.jsonl, line 1: 'edges' must be a list of \\[u, v\\] pairs"):
        load_problems(tmp_path / "bad2.jsonl", TASK)
    (tmp_path / "bad3.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="bad3.jsonl, line 1: invalid JSON"):
        load_problems(tmp_path / "bad3.jsonl", TASK)
    with pytest.raises(DataError, match="line 1: missing field 'edges'"):
        load_problems(good, TASK)                                   # the mapping is needed for this file
    with pytest.raises(DataError, match="names 'arms', which task 'star_graph' does not use"):
        load_problems(good, TASK, {"arms": "graph"})
    with pytest.raises(DataError, match="data file not found"):
        load_problems(tmp_path / "missing.jsonl", TASK)
