"""Proposer: fence extraction (gepa as the oracle), rejections with reasons, records and templates."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fst_jax.gepa.proposer import DEFAULT_TEMPLATE, Proposer, extract_fenced, render_records, validate_template
from fst_jax.gepa.reflection import Completion
from fst_jax.gepa.state import EvalResult

instruction_proposal = pytest.importorskip("gepa.strategies.instruction_proposal")


def gepa_extract(raw: str) -> str:
    # gepa strips the reply before extracting (StatelessReflectionLM.reflect_many).
    return instruction_proposal.InstructionProposalSignature.output_extractor(raw.strip())["new_instruction"]


def gepa_has_closed_block(raw: str) -> bool:
    """True when gepa takes its main path (a first and a distinct last fence), not its fallback."""
    s = raw.strip()
    return s.find("```") + 3 < s.rfind("```")


CORPUS = [
    "```\nBe concise.\n```",
    "Here is the new prompt:\n```\nSolve step by step.\nGive the final answer in \\boxed{}.\n```\nGood luck!",
    "```text\nUse the table.\n```",
    "```markdown\n# Role\nYou are a careful solver.\n```",
    "```Instructions:\nRead the input.\n```",  # a word right after the fence is taken as a language tag
    "```Be careful.\n```",  # not a tag (contains a space): kept
    "Intro ```\nA\n``` middle ```\nB\n``` end",  # first to last fence spans both blocks
    "```\nUse ```python``` code blocks for code.\n```",
    "   \n\n```\n  padded  \n```\n\n  ",
    "```\n\n\nleading newlines\n```",
    "``````",
    "```\n```",
    "```python\n```",
    "```` four backticks ````",
    "x```y```z",
    "```\nunicode: naïve café — ∑ ✓\n```",
    "```\r\nwindows line endings\r\n```",
]

TRUNCATED_OR_UNFENCED = [
    "```\nThe new prompt was cut off here",  # opened, never closed
    "Just some text with no fences at all.",
    "text then a lone fence ```",
    "````",
]


def test_extraction_matches_gepa_on_corpus():
    compared = 0
    for raw in CORPUS:
        if gepa_has_closed_block(raw):
            assert extract_fenced(raw) == gepa_extract(raw), raw
            compared += 1
        else:
            assert extract_fenced(raw) is None, raw
    assert compared >= 14


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["```", "`", "\n", " ", "a", "python", "Be ", "x\n", "\t", "`` "]), max_size=20))
def test_extraction_matches_gepa_on_generated_outputs(parts):
    raw = "".join(parts)
    if gepa_has_closed_block(raw):
        assert extract_fenced(raw) == gepa_extract(raw)
    else:
        assert extract_fenced(raw) is None  # gepa would salvage something here; we reject (tested below)


@pytest.mark.parametrize("raw", TRUNCATED_OR_UNFENCED)
def test_where_gepa_salvages_we_reject(raw):
    salvaged = gepa_extract(raw)
    text, reason = Proposer().parse(raw, "old prompt")
    assert text is None and reason.split(":")[0] in {"truncated", "unfenced", "empty"}
    assert salvaged is not None  # gepa would have adopted this as a prompt


@pytest.mark.parametrize(
    "reply,current,reason",
    [
        ("", "old", "empty"),
        ("   \n", "old", "empty"),
        ("no fences here", "old", "unfenced"),
        ("```\nhalf a prompt", "old", "truncated"),
        ("```\n\n```", "old", "empty"),
        ("```\nold\n```", "old", "unchanged"),
        ("```\n  old  \n```", "  old\n", "unchanged"),
        ("```\n" + "y" * 101 + "\n```", "old", "too_long"),
    ],
)
def test_rejections_carry_a_reason(reply, current, reason, caplog):
    with caplog.at_level(logging.INFO, logger="fst_jax.gepa"):
        text, why = Proposer(max_chars=100).parse(reply, current)
    assert text is None and why.startswith(reason + ":")
    assert any(why in r.getMessage() for r in caplog.records)


def test_unfinished_completion_is_rejected_even_when_fenced():
    reply = Completion("```\nA complete-looking prompt.\n```", finished=False)
    assert Proposer().parse(reply, "old") == (None, "truncated: the reflection LM stopped at its token limit")
    assert Proposer().parse(Completion(str(reply), finished=True), "old") == ("A complete-looking prompt.", None)


def test_accepts_good_reply_at_the_length_limit():
    assert Proposer(max_chars=5).parse("Sure:\n```\nabcde\n```", "old") == ("abcde", None)


def test_records_use_trace_inputs_else_item_description():
    proposer = Proposer(describe_item=lambda item: f"Q: {item['q']}")
    results = [
        EvalResult(score=0.0, output="4", feedback="wrong, expected 5", trace={"inputs": "2+3?"}),
        EvalResult(score=1.0, output="7", feedback="correct"),
    ]
    records = proposer.records([{"q": "2+3"}, {"q": "3+4"}], results)
    assert records == [
        {"Inputs": "2+3?", "Generated Outputs": "4", "Feedback": "wrong, expected 5"},
        {"Inputs": "Q: 3+4", "Generated Outputs": "7", "Feedback": "correct"},
    ]
    md = render_records(records)
    assert md.startswith("# Example 1\n## Inputs\n2+3?\n") and "# Example 2" in md and "## Feedback\ncorrect" in md


def test_default_prompt_shows_current_text_and_records_and_asks_for_small_edits():
    prompt = Proposer().render("Answer briefly.", [{"Inputs": "q1", "Generated Outputs": "o1", "Feedback": "f1"}])
    assert "```\nAnswer briefly.\n```" in prompt
    assert "## Feedback\nf1" in prompt
    assert "small, targeted edits" in prompt and "```" in prompt.splitlines()[-1]
    assert "<current_text>" not in prompt and "<records>" not in prompt


def test_placeholders_inside_texts_are_not_substituted():
    prompt = Proposer().render("keep <records> literally", [{"Inputs": "<current_text>", "Feedback": "ok"}])
    assert "keep <records> literally" in prompt and "## Inputs\n<current_text>" in prompt


def test_custom_template_is_used_and_validated():
    proposer = Proposer(template="Fix this:\n```\n<current_text>\n```\nEvidence:\n<records>\nReply in ```.")
    assert proposer.render("abc", []).startswith("Fix this:\n```\nabc\n```")
    with pytest.raises(ValueError, match="missing placeholder.*<records>"):
        Proposer(template="only <current_text>")
    validate_template(DEFAULT_TEMPLATE)


def test_default_template_is_our_own_words():
    theirs = instruction_proposal.InstructionProposalSignature.default_prompt_template
    ours_lines = {line.strip() for line in DEFAULT_TEMPLATE.splitlines() if len(line.strip()) > 30}
    theirs_lines = {line.strip() for line in theirs.splitlines() if len(line.strip()) > 30}
    assert not ours_lines & theirs_lines
