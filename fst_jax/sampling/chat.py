"""Text in, text out: chat messages rendered with the tokenizer's chat template, sampled, decoded.

The GEPA reflection LM (local) and the task rollouts use this layer; everything under it works on token ids
(`fst_jax.sampling`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

from fst_jax.runtime import parallel
from fst_jax.models.hf import load_pretrained, load_tokenizer, render_chat
from fst_jax.sampling.sampler import Sampler

__all__ = ["ChatCompletion", "ChatSampler", "default_stop_token_ids"]

# Turn and document ends in Qwen3's vocabulary (and in fst_jax's char tokenizer).
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
_THINKING = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)

Messages = Sequence[Mapping[str, str]]


@dataclasses.dataclass(frozen=True)
class ChatCompletion:
    """One sampled assistant turn.

    text: the decoded completion without its stop token (and without a leading `<think>…</think>` block when
    the ChatSampler strips thinking); token_ids / logprobs: every sampled token, the stop token included;
    finished: a stop token ended it (False: cut at max_new_tokens).
    """

    text: str
    token_ids: list[int]
    logprobs: np.ndarray
    finished: bool
    prompt_ids: list[int]


def default_stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS plus Qwen3's turn/document ends, where the vocabulary has them."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _STOP_TOKENS if t in vocab]
    return tuple(dict.fromkeys(ids))


class ChatSampler:
    """A `Sampler` plus the tokenizer that renders chats for it and decodes what it samples.

    enable_thinking: passed to the chat template (Qwen3's; None = the template's default). strip_thinking:
    drop a leading `<think>…</think>` block from the returned text. stop_token_ids: default
    `default_stop_token_ids(tokenizer)`.
    """

    def __init__(self, sampler: Sampler, tokenizer, *, enable_thinking: bool | None = None,
                 strip_thinking: bool = True, stop_token_ids: Sequence[int] | None = None):
        self.sampler, self.tokenizer = sampler, tokenizer
        self.enable_thinking, self.strip_thinking = enable_thinking, strip_thinking
        self.stop_token_ids = tuple(default_stop_token_ids(tokenizer) if stop_token_ids is None
                                    else stop_token_ids)
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, mesh: Mesh | None = None,
                        rules: parallel.Rules = parallel.SAMPLE_RULES, dtype=None, **kwargs) -> "ChatSampler":
        """Model and tokenizer from one local HF checkpoint directory."""
        model = load_pretrained(path, dtype=dtype, mesh=mesh, rules=rules)
        return cls(Sampler(model, mesh=mesh, rules=rules), load_tokenizer(path), **kwargs)

    def render(self, messages: Messages) -> list[int]:
        """Prompt ids: the messages under the chat template, ending with the assistant turn's opening."""
        return render_chat(self.tokenizer, messages, enable_thinking=self.enable_thinking)

    def generate_chats(self, conversations: Sequence[Messages], *, max_new_tokens: int, temperature: float = 0.0,
                       top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                       num_samples: int = 1) -> list[ChatCompletion]:
        """Sample assistant turns for each conversation; prompt-major when num_samples > 1."""
        prompts = [self.render(messages) for messages in conversations]
        out = self.sampler.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, seed=seed, stop_token_ids=self.stop_token_ids,
                                    num_samples=num_samples, pad_id=self.pad_id)
        return [ChatCompletion(text=self._decode(tokens, finished), token_ids=tokens, logprobs=logprobs,
                               finished=finished, prompt_ids=prompts[r // num_samples])
                for r, (tokens, logprobs, finished) in enumerate(zip(out.tokens, out.logprobs, out.finished))]

    def generate_text(self, prompts: Sequence[str], *, temperature: float, max_new_tokens: int,
                      **sampling_kwargs) -> list[tuple[str, bool]]:
        """Each prompt as one user message → (completion text, finished). The reflection-LM entry point."""
        conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
        completions = self.generate_chats(conversations, temperature=temperature, max_new_tokens=max_new_tokens,
                                          **sampling_kwargs)
        return [(c.text, c.finished) for c in completions]

    def _decode(self, tokens: list[int], finished: bool) -> str:
        body = tokens[:-1] if finished else tokens
        text = self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if self.strip_thinking:
            text = _THINKING.sub("", text, count=1)
        return text
