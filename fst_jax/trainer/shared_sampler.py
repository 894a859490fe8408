"""One sampler for a run: a single copy of sampling weights on the devices, serving both the policy (rollouts,
GEPA, evaluations) and the frozen base (local reflection).

A run holds one `Sampler` (the request engine, `fst_jax.sampling`) whose weights are whichever the last call
needed; a `SamplerView` names the weights it samples from and swaps them in (one relayout) only when they differ
from those loaded. Every call goes to the engine whole — it streams any number of prompts through the slots —
after its prompts are checked against the length the run was planned for.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from fst_jax.gepa.reflection import ReflectionLMError
from fst_jax.sampling import SampleOutput, Sampler

__all__ = ["SharedSampler", "SamplerView", "PromptTooLongForReflection"]


class PromptTooLongForReflection(ReflectionLMError, ValueError):
    """A local reflection prompt longer than `gepa.reflection.max_prompt_tokens`."""


class SharedSampler:
    """A `Sampler` whose weights are swapped between parameter sets on demand.

    `prompt_limits`: the longest prompt for each weights kind ("policy", "base") and the config field that sets
    it, {kind: (tokens, field)}; `loaded`: the params the sampler was built with.
    """

    def __init__(self, sampler: Sampler, prompt_limits: Mapping[str, tuple[int, str]], *, loaded=None):
        self.sampler, self.prompt_limits = sampler, dict(prompt_limits)
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
                 release: bool = False, **kwargs) -> SampleOutput:
        """`Sampler.generate` on this view's weights, all prompts in one call. `release`: drop the sampling
        copy afterwards (the rollouts: the update comes next and needs the memory)."""
        limit, field = self.shared.prompt_limits[self.weights]
        longest = max((len(p) for p in prompts), default=0)
        if longest > limit:
            # reflection (base weights): GEPA rejects that iteration's proposals, logs why, and goes on
            error = PromptTooLongForReflection if self.weights == "base" else ValueError
            raise error(f"a prompt of {longest} tokens exceeds {field}={limit}, the longest prompt this run "
                        f"is planned for; raise {field} (and check the plan: launch/train.py --dry_run)")
        self.shared.load(self.params)
        out = self.shared.sampler.generate(prompts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                                           max_prompt_tokens=limit, **kwargs)
        if release:
            self.shared.release()
        return out
