"""Reflection LMs: anything with `complete(prompts: list[str]) -> list[str]`, one reply per prompt, in order.

- `openai`: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, a hosted model), standard library
  only. The API key is read from the environment variable *named* by `api_key_env` at request time; it is never
  stored on the object, logged, put in exception messages, `repr` or `to_dict`.
- `local`: a thin adapter around a batched `generate_text(prompts, *, temperature, max_new_tokens)` returning
  `(text, finished)` pairs, so our jitted sampler (and the frozen base model) can reflect with no extra service.
- `callable`: wraps a plain `fn(prompts) -> list[str]` (scripted reflection in tests, custom backends).

A reply that stopped at the token limit is returned as a `Completion` with `finished=False`; the proposer
rejects it as truncated instead of adopting half a prompt.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Any, Protocol

logger = logging.getLogger("fst_jax.gepa.reflection")


class Completion(str):
    """A reply text that also says whether generation finished (False: cut off at the token limit)."""

    finished: bool

    def __new__(cls, text: str, finished: bool = True) -> Completion:
        obj = super().__new__(cls, text)
        obj.finished = bool(finished)
        return obj


class ReflectionLM(Protocol):
    """Batched text completion used for reflection."""

    def complete(self, prompts: list[str]) -> list[str]: ...


class ReflectionLMError(RuntimeError):
    """A reflection request failed for good (after any retries). Never contains the API key."""


# ---- OpenAI-compatible endpoint ---------------------------------------------------------------------------


@dataclass
class OpenAIReflectionLM:
    """Chat-completions client: one request per prompt, at most `max_concurrency` in flight.

    Retries (up to `retries` times, with exponential backoff from `backoff_s`, capped at `max_backoff_s`, or the
    server's Retry-After when given) on HTTP 429, 5xx, timeouts, connection errors and malformed response JSON.
    Other HTTP errors (400, 401, 404, ...) fail at once. A failure after the retries raises
    `ReflectionLMError` for the whole batch.

    Args:
      base_url: the API root, e.g. "http://127.0.0.1:8000/v1" (requests go to {base_url}/chat/completions).
      model: model name sent in each request.
      api_key_env: NAME of the environment variable holding the key; None for endpoints without auth.
      timeout_s: per-request socket timeout.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_concurrency: int = 8
    temperature: float = 1.0
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.max_concurrency < 1 or self.retries < 0 or self.timeout_s <= 0:
            raise ValueError("need max_concurrency >= 1, retries >= 0 and timeout_s > 0")

    def to_dict(self) -> dict[str, Any]:
        """The configuration (the key's variable name, never its value)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def complete(self, prompts: list[str]) -> list[str]:
        """One reply per prompt, in order; `Completion.finished` is False when finish_reason was "length"."""
        if not prompts:
            return []
        key = self._key()
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts)))
        try:
            return list(pool.map(lambda p: self._complete_one(p, key), prompts))
        finally:
            # On a failure, requests not yet started are dropped rather than sent for a batch already lost.
            pool.shutdown(wait=True, cancel_futures=True)

    def _key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ReflectionLMError(
                f"environment variable {self.api_key_env} is not set; export the API key there, or pass "
                "api_key_env=None for an endpoint without authentication"
            )
        return key

    def _complete_one(self, prompt: str, key: str | None) -> Completion:
        url = self.base_url.rstrip("/") + "/chat/completions"
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                parsed = _parse_reply(raw)
                if parsed is not None:
                    return parsed
                problem, retryable = "malformed JSON in the response", True
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read()[:300].decode("utf-8", "replace")
                except (OSError, HTTPException):
                    detail = "(no body)"
                problem = f"HTTP {e.code}: {detail}"
                retryable = e.code == 429 or e.code >= 500
                retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            except (TimeoutError, urllib.error.URLError, ConnectionError, HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                problem, retryable = f"{type(e).__name__}: {reason}", True
            problem = _scrub(problem, key)
            if not retryable or attempt == self.retries:
                tries = f" after {attempt + 1} attempts" if retryable else ""
                raise ReflectionLMError(
                    f"reflection request to {_scrub(url, key)} (model {self.model!r}) failed{tries}: {problem}"
                ) from None  # the original exception is not chained: nothing from the request can leak
            delay = retry_after if retry_after is not None else min(self.max_backoff_s, self.backoff_s * 2**attempt)
            logger.warning(
                "reflection request failed (%s); retry %d/%d in %.2fs", problem, attempt + 1, self.retries, delay
            )
            time.sleep(delay)
        raise AssertionError("unreachable")


def _parse_reply(raw: bytes) -> Completion | None:
    """The first choice's message content, or None if the JSON is malformed or not a chat completion."""
    try:
        choice = json.loads(raw)["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, str):
        return None
    return Completion(content, finished=choice.get("finish_reason") != "length")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _scrub(text: str, key: str | None) -> str:
    # A misbehaving server may echo the Authorization header back in an error body.
    return text.replace(key, "***") if key else text


# ---- local model through our sampler ----------------------------------------------------------------------


class GenerateText(Protocol):
    def __call__(
        self, prompts: list[str], *, temperature: float, max_new_tokens: int
    ) -> Sequence[tuple[str, bool]]: ...


@dataclass
class LocalReflectionLM:
    """Reflection with a local model: `generate_text` is a batched sampler call returning (text, finished).

    `format_prompt` (e.g. a tokenizer's chat template) is applied to each prompt before generation.
    """

    generate_text: GenerateText
    temperature: float = 1.0
    max_new_tokens: int = 2048
    format_prompt: Callable[[str], str] | None = None

    def complete(self, prompts: list[str]) -> list[str]:
        """One `Completion` per prompt; unfinished generations are marked so the proposer rejects them."""
        if not prompts:
            return []
        formatted = [self.format_prompt(p) for p in prompts] if self.format_prompt else list(prompts)
        outputs = list(self.generate_text(formatted, temperature=self.temperature, max_new_tokens=self.max_new_tokens))
        if len(outputs) != len(prompts):
            raise ReflectionLMError(f"generate_text returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [Completion(text, finished=bool(finished)) for text, finished in outputs]


@dataclass
class CallableReflectionLM:
    """Wraps `fn(prompts) -> list[str]`."""

    fn: Callable[[list[str]], Sequence[str]] = field(repr=False)

    def complete(self, prompts: list[str]) -> list[str]:
        if not prompts:
            return []
        outputs = list(self.fn(list(prompts)))
        if len(outputs) != len(prompts):
            raise ReflectionLMError(f"reflection function returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs


# ---- registry ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., ReflectionLM]] = {
    "openai": OpenAIReflectionLM,
    "local": LocalReflectionLM,
    "callable": CallableReflectionLM,
}


def register_reflection_lm(kind: str, factory: Callable[..., ReflectionLM]) -> None:
    """Make `make_reflection_lm(kind, **kwargs)` call `factory(**kwargs)`."""
    _REGISTRY[kind] = factory


def make_reflection_lm(kind: str, **kwargs: Any) -> ReflectionLM:
    """Build a reflection LM by kind ("openai", "local", "callable", or a registered name)."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown reflection LM kind {kind!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind](**kwargs)
