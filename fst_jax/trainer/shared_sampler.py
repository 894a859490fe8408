"""One sampler for a run: a single copy of sampling weights on the devices, serving both the policy (rollouts,
GEPA, evaluations) and the frozen base (local reflection), and every call made at a shape the plan compiled.

A run used to hold two `Sampler`s, each with a full replicated copy of the weights. Here one `Sampler` holds
whichever weights the last call needed; a `SamplerView` names the weights it samples from and swaps them in
(one relayout) only when they differ from those loaded. Each call is also fitted to the planned calls of
`fst_jax.trainer.shapes.sampler_calls`: the prompts are checked against their length limit, a request bigger than the
largest planned call of its kind is split, and a smaller one is padded (by repeating its last prompt; the extra
completions are dropped) to the row bucket of the planned call, so the run compiles no program the dry run
did not.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fst_jax.gepa.reflection import ReflectionLMError
from fst_jax.sampling import SampleOutput, Sampler, row_bucket

__all__ = ["SharedSampler", "SamplerView", "PromptTooLongForReflection"]


class PromptTooLongForReflection(ReflectionLMError, ValueError):
    """A local reflection prompt longer than `gepa.reflection.max_prompt_tokens`."""


class SharedSampler:
    """A `Sampler` whose weights are swapped between parameter sets on demand.

    `calls`: the run's planned sampler calls (`run_shapes.sampler_calls(config)`); `prompt_limits`: the longest
    prompt for each weights kind ("policy", "base") and the config field that sets it, {kind: (tokens, field)};
    `loaded`: the params the sampler was built with.
    """

    def __init__(self, sampler: Sampler, calls: Mapping[str, object], prompt_limits: Mapping[str, tuple[int, str]],
                 *, loaded=None):
        self.sampler, self.calls, self.prompt_limits = sampler, dict(calls), dict(prompt_limits)
        self._loaded = loaded  # the params object whose sampling copy the sampler holds

    def load(self, params) -> None:
        """Make the sampler hold `params` (no work when they are already loaded)."""
        if params is not self._loaded:
            self.sampler.set_params(params)
            self._loaded = params

    def release(self) -> None:
        """Drop the sampling copy of the weights (the next call lays its weights out again)."""
        self.sampler.weights, self._loaded = None, None

    def view(self, weights: str, params=None) -> "SamplerView":
        return SamplerView(self, weights, params)


class SamplerView:
    """What the run samples through: `set_params` and `generate` as a `Sampler`'s, on the shared one."""

    def __init__(self, shared: SharedSampler, weights: str, params=None):
        self.shared, self.weights, self.params = shared, weights, params

    @property
    def config(self):
        return self.shared.sampler.config

    def set_params(self, params) -> None:
        """Sample from `params` from now on (they are laid out for sampling at the next call, if needed)."""
        self.params = params

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, num_samples: int = 1,
                 call_kind: str = "", **kwargs) -> SampleOutput:
        """`Sampler.generate` on this view's weights, split and padded to the planned calls (see module doc).
        `call_kind`: use only the planned calls of that kind (`run_shapes.SamplerCall.kind`)."""
        limit, field = self.shared.prompt_limits[self.weights]
        longest = max((len(p) for p in prompts), default=0)
        if longest > limit:
            # reflection (base weights): GEPA rejects that iteration's proposals, logs why, and goes on
            error = PromptTooLongForReflection if self.weights == "base" else ValueError
            raise error(f"a prompt of {longest} tokens exceeds {field}={limit}, the longest prompt this run "
                             f"is planned for; raise {field} (and check the plan: launch/train.py --dry_run)")
        self.shared.load(self.params)
        sampler = self.shared.sampler
        planned = sorted((c for c in self.shared.calls.values() if c.weights == self.weights and c.kind == call_kind
                          and c.num_samples == num_samples and c.max_new_tokens == max_new_tokens),
                         key=lambda c: c.prompts)
        if not planned:  # not a planned call (e.g. a test's own request): as asked
            return sampler.generate(prompts, max_new_tokens=max_new_tokens, num_samples=num_samples, **kwargs)
        outputs, release = [], False
        for chunk, start in enumerate(range(0, len(prompts), planned[-1].prompts)):
            piece = list(prompts[start:start + planned[-1].prompts])
            call = next(c for c in planned if c.prompts >= len(piece))
            rows = _padded_count(len(piece), call, sampler.mesh)
            if chunk:  # a sample's noise follows its index in the call: later calls need their own seed
                kwargs["seed"] = int(np.random.SeedSequence([kwargs.get("seed", 0), chunk]).generate_state(1)[0])
            out = sampler.generate(piece + [piece[-1]] * (rows - len(piece)), max_new_tokens=max_new_tokens,
                                   num_samples=num_samples, exact_rows=call.exact_rows, **kwargs)
            keep = len(piece) * num_samples
            outputs.append(SampleOutput(tokens=out.tokens[:keep], logprobs=out.logprobs[:keep],
                                        finished=out.finished[:keep]))
            release |= call.release_after
        if release:
            self.shared.release()
        if len(outputs) == 1:
            return outputs[0]
        return SampleOutput(tokens=[t for o in outputs for t in o.tokens],
                            logprobs=[lp for o in outputs for lp in o.logprobs],
                            finished=[f for o in outputs for f in o.finished])


def _padded_count(n: int, call, mesh) -> int:
    """The fewest prompts ≥ n that the sampler runs in the same rows as the planned `call`."""
    target = call.rows(mesh)
    bucket = lambda m: row_bucket(m, mesh, exact=call.exact_rows)  # noqa: E731
    return next(m for m in range(n, call.prompts + 1) if bucket(m) == target) if n <= call.prompts else n
