"""GEPA's evaluation rollouts reused as RL rollouts (`config.cycle.reuse_gepa_rollouts`).

GEPA scores candidate prompts on the cycle's window with the current weights, keeping each rollout's tokens
and behaviour log-probs. When the population that comes out of the search contains a prompt GEPA has rolled
out on a problem, those rollouts are samples of exactly what an RL step would draw for that (problem, prompt)
pair, so they can stand in for it. The pool is keyed by the rendered prompt's token ids (system prompt and
problem together), each rollout is handed out once, and a rollout sampled more than `max_staleness` updates
before the step that would use it is left alone: CISPO's importance weight π_θ/π_old corrects the drift of a
few updates, not of many.
"""

from __future__ import annotations

from typing import Callable, Sequence

from fst_jax.sampling import SampleOutput

__all__ = ["RolloutPool"]


class RolloutPool:
    """Rollouts of one cycle's GEPA search, by rendered prompt."""

    def __init__(self, max_staleness: int):
        self.max_staleness = int(max_staleness)
        self._rows: dict[tuple, list[tuple]] = {}
        self._sampled_at = 0

    def reset(self, update_step: int) -> None:
        """Forget everything: a new search starts at the weights of `update_step` (updates done so far)."""
        self._rows, self._sampled_at = {}, int(update_step)

    def add(self, prompts: Sequence[Sequence[int]], out: SampleOutput) -> None:
        """Keep the rollouts of one sampler call (one per prompt, `num_samples` = 1)."""
        for prompt, tokens, logprobs, finished in zip(prompts, out.tokens, out.logprobs, out.finished):
            self._rows.setdefault(tuple(prompt), []).append((tokens, logprobs, finished))

    def take(self, prompts: Sequence[Sequence[int]], n: int, update_step: int) -> list[list[tuple]]:
        """Up to n stored rollouts of each prompt (prompts may repeat), each handed out once; none when they
        were sampled more than `max_staleness` updates before `update_step`."""
        if update_step - self._sampled_at > self.max_staleness:
            return [[] for _ in prompts]
        taken = []
        for prompt in prompts:
            pool = self._rows.get(tuple(prompt), [])
            taken.append(pool[:n])
            del pool[:n]
        return taken

    def generate(self, prompts: Sequence[Sequence[int]], n: int, update_step: int,
                 sample: Callable[[list, int], SampleOutput]) -> tuple[SampleOutput, int]:
        """n completions of each prompt, prompt-major as a sampler returns them: the pool's first, the rest
        from `sample(prompts, num_samples)` in one call, or, when some were reused, from
        `sample(rest, 1, rest=True)`, one row per missing completion. Returns (the completions, how many were
        reused)."""
        taken = self.take(prompts, n, update_step)
        reused = sum(map(len, taken))
        if not reused:
            return sample(list(prompts), n), 0
        need = [i for i, got in enumerate(taken) for _ in range(n - len(got))]
        out = sample([prompts[i] for i in need], 1, rest=True) if need else None
        fresh = iter(zip(out.tokens, out.logprobs, out.finished) if out else ())
        rows = [row for got in taken for row in got + [next(fresh) for _ in range(n - len(got))]]
        return SampleOutput(*map(list, zip(*rows))), reused
