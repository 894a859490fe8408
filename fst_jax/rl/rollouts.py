"""Rollouts on the host: prompts rendered per (problem, prompt of the population), completions scored, and
prompt + response token ids packed into the fixed-shape [B, T] arrays the RL update takes.

Every per-token array is aligned with `input_ids`: position t describes token t. A row is

    input_ids      p p p p r r r r 0 0        (prompt, response, right padding)
    attention_mask 1 1 1 1 1 1 1 1 0 0
    loss_mask      0 0 0 0 1 1 1 1 0 0        (response tokens only: the prompt is context)
    old_logprobs   0 0 0 0 a b c d 0 0        (behaviour-policy log π_old of each response token)

and `advantages[b]` is the row's advantage. The update predicts token t from the hidden state at t − 1, so
position 0 can never carry loss (its mask is ignored).

Shapes are bucketed so that the jitted update compiles for few distinct shapes: T is rounded up by
`length_bucket` (≤ 12.5% padding on long sequences), and B to `row_multiple` with all-padding rows. Rows that
should not count (zero-variance groups) are removed and replaced by padding rows at the end, so that the batch
shape does not depend on how many groups were dropped.

The update does not compute this batch as it is: `micro_batches` sorts the rows that carry loss by length and
cuts each micro-batch to the smallest of a few planned lengths (`length_buckets`) that holds its longest row.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Rollouts", "build_rollouts", "length_bucket", "length_buckets", "micro_batches", "pad_rows",
           "padding_ratio", "question_field", "render_prompts", "row_lengths", "score_completions"]


def question_field(problem: Mapping[str, Any]) -> str:
    """The user turn of a problem: its canonical "question" field (fst_jax.tasks' problem schema)."""
    try:
        return problem["question"]
    except (KeyError, TypeError):
        keys = sorted(problem) if isinstance(problem, Mapping) else type(problem).__name__
        raise ValueError(f"a problem has no 'question' field (keys: {keys}); pass user_message=... (e.g. a "
                         "task's format_problem) to say what the user turn is") from None


def render_prompts(tokenizer, population: Sequence[str], batch: Sequence[Mapping[str, Any]], *,
                   user_message: Callable[[Mapping[str, Any]], str] = question_field,
                   enable_thinking: bool | None = None) -> list[list[int]]:
    """Token ids of the chat [system = prompt, user = user_message(problem)] under the tokenizer's template,
    with the assistant turn opened; problem-major, then population order (entry i·K + k)."""
    from fst_jax.models.hf import render_chat

    prompt_ids = []
    for problem in batch:
        text = user_message(problem)
        for system in population:
            prompt_ids.append(render_chat(tokenizer, [{"role": "system", "content": system},
                                                      {"role": "user", "content": text}],
                                          enable_thinking=enable_thinking))
    return prompt_ids


def score_completions(tokenizer, batch: Sequence[Mapping[str, Any]], completions: Sequence[Sequence[int]],
                      reward_fn: Callable[[Mapping[str, Any], str], Any], *, per_prompt: int) -> np.ndarray:
    """Rewards [P, G] of completions laid out problem-major (row i·G + j is problem i's rollout j, drawn with
    prompt j // per_prompt), each decoded without special tokens and scored by `reward_fn(problem, text)`:
    a float or anything with a float `.reward` (a task's `Score`). A non-number or NaN/inf reward is a
    ValueError naming the problem."""
    group = len(completions) // len(batch)
    rewards_pg = np.zeros((len(batch), group), np.float64)
    for i, problem in enumerate(batch):
        for j in range(group):
            text = tokenizer.decode(completions[i * group + j], skip_special_tokens=True)
            reward = reward_fn(problem, text)
            reward = getattr(reward, "reward", reward)
            try:
                reward = float(reward)
            except (TypeError, ValueError):
                raise ValueError(f"reward_fn returned {reward!r} for problem {i} (rollout {j}); "
                                 "it must return a float") from None
            if not math.isfinite(reward):
                raise ValueError(f"reward_fn returned {reward} for problem {i} (rollout {j}, prompt "
                                 f"{j // per_prompt} of the population); rewards must be finite numbers")
            rewards_pg[i, j] = reward
    return rewards_pg


@flax.struct.dataclass
class Rollouts:
    """A batch of B sampled responses in context, [B, T] per token (see the module docstring)."""

    input_ids: jax.Array | np.ndarray       # [B, T] int32
    attention_mask: jax.Array | np.ndarray  # [B, T] int32, 1 on real tokens
    loss_mask: jax.Array | np.ndarray       # [B, T] float32, 1 on response tokens
    old_logprobs: jax.Array | np.ndarray    # [B, T] float32, behaviour log-probs on response tokens
    advantages: jax.Array | np.ndarray      # [B] float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def check(self) -> None:
        """Shapes agree: [B, T] everywhere and [B] advantages."""
        chex.assert_rank([self.input_ids, self.advantages], [2, 1])
        chex.assert_equal_shape([self.input_ids, self.attention_mask, self.loss_mask, self.old_logprobs])
        chex.assert_shape(self.advantages, self.input_ids.shape[:1])


def length_bucket(n: int, min_length: int = 16) -> int:
    """n rounded up to a multiple of max(min_length, 2^(⌈log2 n⌉ − 4)): 8 buckets per octave above
    16·min_length tokens (≤ 12.5% padding), multiples of `min_length` below."""
    if n <= min_length:
        return min_length
    step = max(min_length, 1 << max((n - 1).bit_length() - 4, 0))
    return -(-n // step) * step


def pad_rows(rollouts: Rollouts, num_rows: int) -> Rollouts:
    """Append all-padding rows (no tokens, no loss) up to `num_rows`; they count in no sum or denominator."""
    rows = rollouts.input_ids.shape[0]
    if num_rows < rows:
        raise ValueError(f"cannot pad {rows} rows down to {num_rows}")
    if num_rows == rows:
        return rollouts
    xp = np if isinstance(rollouts.input_ids, np.ndarray) else jnp
    return jax.tree.map(lambda x: xp.pad(x, [(0, num_rows - rows)] + [(0, 0)] * (x.ndim - 1)), rollouts)


def build_rollouts(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    response_logprobs: Sequence[Sequence[float]],
    advantages: Sequence[float],
    *,
    keep: Sequence[bool] | None = None,
    pad_id: int = 0,
    row_multiple: int = 1,
    min_length: int = 16,
) -> Rollouts:
    """Pack B (prompt, response) pairs into a right-padded `Rollouts` of host (numpy) arrays.

    `response_logprobs[b]` holds one behaviour log-prob per response token. Rows with `keep[b]` False are
    left out (their places filled by padding rows at the end). The row count is len(prompt_ids) rounded up to
    `row_multiple`; the length is `length_bucket` of the longest prompt + response (dropped rows included).
    """
    num = len(prompt_ids)
    if not (len(response_ids) == len(response_logprobs) == len(advantages) == num):
        raise ValueError(f"build_rollouts: {num} prompts, {len(response_ids)} responses, "
                         f"{len(response_logprobs)} log-prob lists and {len(advantages)} advantages; "
                         "they must be equal")
    keep = [True] * num if keep is None else [bool(k) for k in keep]
    if len(keep) != num:
        raise ValueError(f"build_rollouts: keep has {len(keep)} entries for {num} rows")
    for b, (response, logprobs) in enumerate(zip(response_ids, response_logprobs)):
        if len(response) != len(logprobs):
            raise ValueError(f"row {b}: {len(response)} response tokens but {len(logprobs)} log-probs")
        if not prompt_ids[b]:
            raise ValueError(f"row {b}: empty prompt; the first response token needs context")
    kept = [b for b in range(num) if keep[b]]
    num_rows = max(1, -(-num // row_multiple)) * row_multiple
    # Over all rows, kept or not, so that the shape does not depend on which groups were dropped.
    longest = max((len(p) + len(r) for p, r in zip(prompt_ids, response_ids)), default=1)
    length = length_bucket(longest, min_length)

    input_ids = np.full((num_rows, length), pad_id, np.int32)
    attention_mask = np.zeros((num_rows, length), np.int32)
    loss_mask = np.zeros((num_rows, length), np.float32)
    old_logprobs = np.zeros((num_rows, length), np.float32)
    row_advantages = np.zeros((num_rows,), np.float32)
    for row, b in enumerate(kept):
        p, r = len(prompt_ids[b]), len(response_ids[b])
        input_ids[row, :p] = prompt_ids[b]
        input_ids[row, p:p + r] = response_ids[b]
        attention_mask[row, :p + r] = 1
        loss_mask[row, p:p + r] = 1.0
        old_logprobs[row, p:p + r] = np.asarray(response_logprobs[b], np.float32)
        row_advantages[row] = advantages[b]
    return Rollouts(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                    old_logprobs=old_logprobs, advantages=row_advantages)


def length_buckets(max_length: int, count: int, align: int = 16) -> tuple[int, ...]:
    """The update's planned sequence lengths: `count` evenly spaced lengths up to `max_length`, each rounded up
    to a multiple of `align` (duplicates dropped), e.g. (640, 1280, …, 5120) for 5120 and 8. A row of n tokens
    is computed at the smallest length ≥ n, so at most max_length / count tokens of padding per row."""
    if not (isinstance(count, int) and count >= 1):
        raise ValueError(f"length_buckets: count must be an integer ≥ 1, got {count!r}")
    if max_length < 1:
        raise ValueError(f"length_buckets: max_length must be ≥ 1, got {max_length}")
    lengths = set()
    for i in range(1, count + 1):
        even = -(-max_length * i // count)  # ⌈max_length · i / count⌉
        lengths.add(min(max_length, -(-even // align) * align))
    return tuple(sorted(lengths))


def row_lengths(rollouts: Rollouts) -> np.ndarray:
    """[B] tokens of each row up to its last real one (prompt + response; 0 for an all-padding row)."""
    mask = np.asarray(rollouts.attention_mask) > 0
    return np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)


def micro_batches(rollouts: Rollouts, rows: int, buckets: Sequence[int] | None = None, *,
                  min_length: int = 16) -> list[Rollouts]:
    """The host-side micro-batches the update computes: the rows that carry loss (a response token after
    position 0), longest first, in groups of `rows` (the last group filled with all-padding rows), each cut to
    the smallest of `buckets` that holds its longest row (None: that row's `length_bucket`).

    Sorting puts rows of similar length together, so each group pads little; rows without loss (dropped
    groups, padding rows) count in no sum or denominator, so leaving them out changes no loss or gradient.
    Raises ValueError when a row is longer than the largest bucket.
    """
    host = jax.tree.map(np.asarray, rollouts)
    lengths = row_lengths(host)
    carries_loss = (host.loss_mask[:, 1:] > 0).any(axis=1)
    order = [int(b) for b in np.argsort(-lengths, kind="stable") if carries_loss[b]]
    if buckets is not None and order and lengths[order[0]] > max(buckets):
        raise ValueError(f"a rollout of {lengths[order[0]]} tokens exceeds the update's longest planned length "
                         f"{max(buckets)}; raise config.sampling.max_prompt_tokens or config.sampling.max_new_tokens")
    groups = []
    for start in range(0, len(order), rows):
        index = order[start:start + rows]
        longest = int(lengths[index[0]])
        length = (min(b for b in buckets if b >= longest) if buckets is not None
                  else length_bucket(max(longest, 1), min_length))
        group = jax.tree.map(functools.partial(_take_rows, index=index, length=length), host)
        groups.append(pad_rows(group, rows))
    return groups


def padding_ratio(rollouts: Rollouts, groups: Sequence[Rollouts]) -> float:
    """Tokens the micro-batches `groups` compute over the prompt + response tokens of the rollouts' rows that
    carry loss (1 = no padding computed; 0 when no row carries loss and nothing is computed)."""
    host = jax.tree.map(np.asarray, rollouts)
    useful = int(row_lengths(host)[(host.loss_mask[:, 1:] > 0).any(axis=1)].sum())
    return sum(int(np.size(g.input_ids)) for g in groups) / useful if useful else 0.0


def _take_rows(x: np.ndarray, *, index: list[int], length: int) -> np.ndarray:
    """Rows `index` of a [B] or [B, T] array, cut or padded to `length` tokens."""
    return x[index] if x.ndim == 1 else _fit(x[index], length)


def _fit(x: np.ndarray, length: int) -> np.ndarray:
    """[b, T] → [b, length]: cut (only padding lies beyond a row's length) or right-pad with zeros."""
    if x.shape[1] >= length:
        return x[:, :length]
    return np.pad(x, [(0, 0), (0, length - x.shape[1])])
