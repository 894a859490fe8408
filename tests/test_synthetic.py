"""Synthetic rule and skill tasks: rules on hand-computed strings, the dense reward, feedback, problem making,
and the held-out rules' absence from the tiny model's training data."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from fst_jax.gepa.proposer import Proposer, extract_fenced
from fst_jax.tasks import get_task, load_problems
from fst_jax.tasks import synthetic as syn

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("rule,text,want", [
    ("reverse", "abcde", "edcba"),
    ("sort", "dbca", "abcd"),
    ("swap pairs", "abcde", "badce"),
    ("swap pairs", "abcdef", "badcfe"),
    ("upper", "abc", "ABC"),
    ("rotate 2", "abcde", "cdeab"),
    ("rotate 7", "abcde", "cdeab"),
    ("shift 1", "xyz", "yza"),
    ("shift 3", "Az", "Dc"),
    ("reverse, then shift 1", "abc", "dcb"),
    ("upper, then rotate 1", "abc", "BCA"),
    ("sort, then swap pairs, then upper", "dcba", "BADC"),
    ("reverse", "", ""),
    ("rotate 3", "", ""),
])
def test_rules_on_hand_computed_strings(rule, text, want):
    assert syn.apply_rule(rule, text) == want


@pytest.mark.parametrize("text", ["reverse then shift 1", "shift 0", "rotate 26", "rotate", "Reverse",
                                  "reverse, then reverse, then reverse, then reverse", "", "shift -1"])
def test_not_rules(text):
    assert syn.parse_rule(text) is None
    with pytest.raises(ValueError, match="is not a rule"):
        syn.apply_rule(text, "abc")


def test_parse_rule_tolerates_a_final_period_and_spaces():
    assert syn.parse_rule(" reverse, then shift 2. ") == ("reverse", "shift 2")


@pytest.mark.parametrize("answer,got,want", [
    ("abcd", "abcd", 1.0), ("abcd", "abxd", 0.75), ("abcd", "ab", 0.5), ("ab", "abcd", 0.5),
    ("abc", "", 0.0), ("", "", 1.0), ("abcd", "dcba", 0.0), ("abcd", "xabcd", 0.0),
])
def test_dense_reward_by_hand(answer, got, want):
    assert syn.dense_reward(answer, got) == pytest.approx(want)


def test_rule_task_score_and_feedback():
    task = get_task("rule", rule="reverse")
    problem = {"input": "abcd", "answer": "dcba"}
    assert task.format_problem(problem) == "abcd"
    ok = task.score(problem, " dcba\n")
    assert (ok.reward, ok.feedback, ok.extracted) == (1.0, "correct", "dcba")
    bad = task.score(problem, "dcxa")
    assert (bad.reward, bad.feedback, bad.extracted) == (0.75, "want: dcba", "dcxa")
    assert task.score(problem, "<think>abcd</think>\n\ndcba").reward == 1.0
    assert task.score(problem, "").reward == 0.0
    full = get_task("rule", rule="reverse", feedback="full").score(problem, "dcxa")
    assert full.feedback == "input: abcd; want: dcba; got: dcxa (75% of characters right)"
    exact = get_task("rule", rule="reverse", reward="exact", feedback="full")
    assert exact.score(problem, "dcba").reward == 1.0
    near = exact.score(problem, "dcxa")  # no partial credit; the same text
    assert (near.reward, near.feedback) == (0.0, full.feedback)


def test_rule_task_options_are_checked():
    with pytest.raises(ValueError, match="is not a rule"):
        get_task("rule", rule="turn it around")
    with pytest.raises(ValueError, match="feedback"):
        get_task("rule", feedback="long")
    with pytest.raises(ValueError, match="reward must be 'dense' or 'exact'"):
        get_task("rule", reward="binary")
    with pytest.raises(ValueError, match="min_len"):
        get_task("rule", min_len=6, max_len=5)
    with pytest.raises(ValueError, match="no option"):
        get_task("rule", rules="reverse")


def test_make_problems_is_deterministic_and_consistent(tmp_path):
    task = get_task("rule", rule="sort, then shift 3", min_len=4, max_len=6)
    a, b = task.make_problems(20, seed=3), task.make_problems(20, seed=3)
    assert a == b
    assert a != task.make_problems(20, seed=4)
    assert len({p["input"] for p in a}) == 20
    for p in a:
        assert 4 <= len(p["input"]) <= 6 and p["input"].islower()
        assert p["answer"] == syn.apply_rule("sort, then shift 3", p["input"])
        assert task.score(p, p["answer"]).reward == 1.0
    # the same records load through the task's schema
    path = tmp_path / "rule.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in a))
    assert load_problems(path, task, fields={"id": "id"}) == a


def test_skills():
    rng = random.Random(0)
    for skill in syn.SKILLS:
        task = get_task("skill", skill=skill)
        problems = task.make_problems(10, seed=1)
        assert problems == task.make_problems(10, seed=1)
        for p in problems:
            question = task.format_problem(p)
            assert question.startswith(f"{skill}: ")
            arg = question.split(": ", 1)[1]
            want = {"copy": arg, "count": str(len(arg)), "last": arg[-1:],
                    "add": str(sum(map(int, arg.split("+")))) if skill == "add" else None}[skill]
            assert p["answer"] == want
            assert task.score(p, want).reward == 1.0
            assert task.score(p, want + "x").feedback == f"want: {want}"
    assert syn.skill_example("add", rng)[0].startswith("add: ")
    with pytest.raises(ValueError, match="skill must be one of"):
        get_task("skill", skill="juggle")


def test_held_out_rules_are_not_training_rules():
    held = {syn.rule_function_key(r) for r in syn.HELD_OUT_RULES}
    assert len(syn.TRAIN_RULES) == len(set(syn.TRAIN_RULES)) > 50
    for rule in syn.TRAIN_RULES:
        assert syn.rule_function_key(rule) not in held, rule
    # the commuted form of a held-out composition is the same function, so it is out too
    assert "shift 1, then reverse" not in syn.TRAIN_RULES and "upper, then swap pairs" not in syn.TRAIN_RULES
    assert "shift 4" not in syn.TRAIN_RULES
    for rule in syn.IN_FAMILY_RL_RULES:
        assert rule in syn.TRAIN_RULES


def _maker():
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "tools" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_data_never_uses_a_held_out_rule(monkeypatch):
    from fst_jax.models.char_tokenizer import make_char_tokenizer

    maker = _maker()
    held = {syn.rule_function_key(r) for r in syn.HELD_OUT_RULES}
    used = []
    real = syn.apply_rule
    monkeypatch.setattr(syn, "apply_rule", lambda rule, text: used.append(rule) or real(rule, text))
    renderer = maker.Renderer(make_char_tokenizer())
    rng = random.Random(0)
    texts = []
    for kind in ("rule", "generic", "skill", "reflection"):
        for _ in range(150):
            prompt, target = maker.make_example(rng, kind, renderer)
            texts.append(renderer.tok.decode(prompt + target))
    monkeypatch.undo()
    assert used and not [r for r in set(used) if syn.rule_function_key(r) in held]
    for rule in syn.HELD_OUT_RULES:
        assert not any(rule in t for t in texts)


def test_reflection_examples_match_the_runtime_prompt():
    from fst_jax.models.char_tokenizer import make_char_tokenizer
    from fst_jax.models.hf import render_chat

    maker = _maker()
    tok = make_char_tokenizer()
    renderer = maker.Renderer(tok)
    instruction, records = maker.reflection_case(random.Random(1), "reverse")
    assert [list(r) for r in records] == [["Inputs", "Generated Outputs", "Feedback"]] * len(records)
    for r in records:
        want = syn.apply_rule("reverse", r["Inputs"])
        assert r["Feedback"] == ("correct" if r["Generated Outputs"] == want else f"want: {want}")
    prompt = Proposer(template=syn.TINY_REFLECTION_TEMPLATE).render(instruction, records)
    assert prompt.startswith("Fix the instruction.\nInstruction: ") and "## Feedback\n" in prompt
    messages = [{"role": "user", "content": prompt}]
    ids, target = renderer.example(messages, "```\nreverse\n```")
    assert ids == render_chat(tok, messages, enable_thinking=False)
    assert extract_fenced(tok.decode(target, skip_special_tokens=True)) == "reverse"
    assert target[-1] == tok.eos_token_id


def test_batches_are_deterministic_and_mask_only_the_answer():
    from fst_jax.models.char_tokenizer import make_char_tokenizer

    maker = _maker()
    renderer = maker.Renderer(make_char_tokenizer())
    (ids, mask, w), long_ = maker.make_batch(0, 5, renderer)
    (ids2, _, _), _ = maker.make_batch(0, 5, renderer)
    assert (ids == ids2).all() and ids.shape == (maker.PHASE_B["short"], maker.SHORT_T)
    assert long_[0].shape == (maker.PHASE_B["long"], maker.LONG_T)
    (short_only,) = maker.make_batch(0, 5, renderer, phase_b=False)
    assert short_only[0].shape == (maker.PHASE_A["short"], maker.SHORT_T)
    tok = renderer.tok
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        targets = [int(ids[row, t + 1]) for t in range(n - 1) if w[row, t]]
        assert targets[-1] == tok.eos_token_id
        assert "<|im_start|>" not in tok.decode(targets[:-1])
