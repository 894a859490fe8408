"""Reflective proposals: records from traces -> reflection prompt -> new component text, or a rejection.

A record is {Inputs, Generated Outputs, Feedback} for one minibatch rollout. The prompt shows the current text
and the records in fenced blocks and asks for small incremental edits (the paper's reflection LM was asked for
small edits). The reply's new text is what lies between its first and last ``` fence, the reference `gepa`
package's rule, including dropping a language tag written right after the opening fence.

Unlike the reference, we never adopt a reply we cannot trust: it is rejected, with a reason that is logged and
reported in the iteration's events, when it is
  empty      - blank reply, or nothing between the fences;
  unfenced   - no ``` fence at all;
  truncated  - the LM stopped before finishing (the reflection LM marks it), or a fence was opened and never
               closed (the usual sign of a cut-off reply);
  unchanged  - the same text as the current one;
  too_long   - longer than `max_chars`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fst_jax.gepa.state import EvalResult

logger = logging.getLogger("fst_jax.gepa")

FENCE = "```"
CURRENT_TEXT = "<current_text>"
RECORDS = "<records>"

DEFAULT_TEMPLATE = f"""You are helping to improve the instructions that an assistant follows for a task.
Here are the assistant's current instructions:
```
{CURRENT_TEXT}
```

Below are a few recent task inputs, the response the assistant produced for each, and feedback on that response:
```
{RECORDS}
```

Study the examples and the feedback. Work out what the task really asks for, where the responses went wrong,
and which facts, conventions or strategies specific to this task would have helped.

Then revise the instructions with small, targeted edits rather than a rewrite: keep whatever already works,
fix what the feedback shows is going wrong, and add the task-specific knowledge the examples reveal. The
instructions must help on new inputs of the same kind, not only on these examples.

Reply with the complete revised instructions inside one ``` fenced block."""

_LANGUAGE_TAG = re.compile(r"^\S*\n")
_PLACEHOLDER = re.compile(re.escape(CURRENT_TEXT) + "|" + re.escape(RECORDS))


def validate_template(template: str) -> None:
    """Raise if the reflection template lacks a placeholder."""
    missing = [p for p in (CURRENT_TEXT, RECORDS) if p not in template]
    if missing:
        raise ValueError(
            f"reflection template is missing placeholder(s) {', '.join(missing)}; the template must contain "
            f"{CURRENT_TEXT} (replaced by the current text) and {RECORDS} (replaced by the examples)"
        )


def extract_fenced(text: str) -> str | None:
    """The text between the first and the last ``` fence, stripped; None when there is no closed fence pair.

    A non-blank word directly after the opening fence followed by a newline is a language tag and dropped.
    """
    text = text.strip()
    start = text.find(FENCE)
    end = text.rfind(FENCE)
    if start < 0 or start + len(FENCE) >= end:
        return None
    body = text[start + len(FENCE) : end]
    tag = _LANGUAGE_TAG.match(body)
    if tag:
        body = body[tag.end() :]
    return body.strip()


def render_records(records: Sequence[dict[str, Any]]) -> str:
    """Records as markdown: '# Example n', then '## field' and the value for each field."""
    parts = []
    for n, record in enumerate(records, 1):
        lines = [f"# Example {n}"]
        for key, value in record.items():
            lines.append(f"## {key}")
            lines.append(str(value).strip())
            lines.append("")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


@dataclass
class Proposer:
    """Builds reflection prompts and turns replies into new texts (or rejection reasons).

    Args:
      template: reflection prompt with the placeholders <current_text> and <records>.
      max_chars: longest accepted new text; longer replies are rejected as `too_long`.
      describe_item: renders a data item as the record's Inputs when its trace has no "inputs" entry.
    """

    template: str = DEFAULT_TEMPLATE
    max_chars: int = 20_000
    describe_item: Callable[[Any], str] = field(default=str)

    def __post_init__(self) -> None:
        validate_template(self.template)
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")

    def records(self, items: Sequence[Any], results: Sequence[EvalResult]) -> list[dict[str, str]]:
        """One {Inputs, Generated Outputs, Feedback} record per rollout."""
        out = []
        for item, res in zip(items, results, strict=True):
            trace = res.trace or {}
            inputs = trace.get("inputs")
            out.append(
                {
                    "Inputs": str(inputs) if inputs is not None else self.describe_item(item),
                    "Generated Outputs": res.output,
                    "Feedback": res.feedback,
                }
            )
        return out

    def render(self, current_text: str, records: Sequence[dict[str, Any]]) -> str:
        """The reflection prompt for one component."""
        # One pass over the template, so placeholder-like strings inside the texts are never substituted.
        values = {CURRENT_TEXT: current_text, RECORDS: render_records(records)}
        return _PLACEHOLDER.sub(lambda m: values[m.group(0)], self.template)

    def parse(self, reply: str, current_text: str) -> tuple[str | None, str | None]:
        """(new_text, None) for a usable reply, else (None, reason). Rejections are logged."""
        text, reason = self._parse(reply, current_text)
        if reason is not None:
            logger.info("reflection output rejected: %s", reason)
        return text, reason

    def _parse(self, reply: str, current_text: str) -> tuple[str | None, str | None]:
        if not isinstance(reply, str) or not reply.strip():
            return None, "empty: the reflection LM returned no text"
        if getattr(reply, "finished", True) is False:
            return None, "truncated: the reflection LM stopped at its token limit"
        if FENCE not in reply:
            return None, "unfenced: no ``` fenced block in the reflection output"
        text = extract_fenced(reply)
        if text is None:
            return None, "truncated: a ``` fence was opened but never closed"
        if not text:
            return None, "empty: the fenced block is empty"
        if text == current_text.strip():
            return None, "unchanged: the proposed text equals the current text"
        if len(text) > self.max_chars:
            return None, f"too_long: {len(text)} characters > max_chars={self.max_chars}"
        return text, None


@dataclass
class Proposal:
    """One parent's trip through an iteration; `event()` is what the metrics stream sees.

    status: "accepted" (added as `candidate`), "rejected" (see `reason`), or "skipped" (parent perfect on the
    minibatch: no reflection, no child rollouts).
    """

    iteration: int
    slot: int
    parent: int
    minibatch: list[Any]
    scores_before: list[float] | None = None
    scores_after: list[float] | None = None
    components: list[str] = field(default_factory=list)
    new_texts: dict[str, str] | None = None
    component_rejections: dict[str, str] | None = None
    status: str | None = None
    reason: str | None = None
    candidate: int | None = None
    val_score: float | None = None
    child: dict[str, str] | None = field(default=None, repr=False)
    parent_results: list[EvalResult] = field(default_factory=list, repr=False)
    prompt_slots: list[int] = field(default_factory=list, repr=False)

    def finish(self, status: str, reason: str | None = None) -> None:
        self.status, self.reason = status, reason

    def event(self) -> dict[str, Any]:
        """JSON-ready record of this proposal."""
        names = ("iteration", "slot", "parent", "minibatch", "scores_before", "scores_after", "components",
                 "new_texts", "component_rejections", "status", "reason", "candidate", "val_score")
        return {"type": "proposal", **{n: getattr(self, n) for n in names}}
