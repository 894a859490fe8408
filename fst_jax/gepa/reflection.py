"""Reflection LMs: anything with `complete(prompts: list[str]) -> list[str]`, one reply per prompt, in order.

- `openai`: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, a hosted model) through the `openai`
  SDK (an optional extra). The API key is read from the environment variable *named* by `api_key_env` at
  request time; it is never stored on the object, logged, put in exception messages, `repr` or `to_dict`.
- `local`: a thin adapter around a batched `generate_text(prompts, *, temperature, max_new_tokens)` returning
  `(text, finished)` pairs, so our jitted sampler (and the frozen base model) can reflect with no extra service.
- `callable`: wraps a plain `fn(prompts) -> list[str]` (scripted reflection in tests, custom backends).

A reply that stopped at the token limit is returned as a `Completion` with `finished=False`; the proposer
rejects it as truncated instead of adopting half a prompt.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    """Chat-completions client on the `openai` SDK (`pip install 'fst_jax[openai]'`): one request per prompt,
    at most `max_concurrency` in flight.

    Transport, timeouts, retries and back-off are the SDK's: HTTP 408/409/429/5xx, timeouts and connection
    errors are retried up to `retries` times with exponential back-off (0.5 s doubling, capped at 8 s, with
    jitter), or after the server's Retry-After when it gives one (up to a minute). A 200 whose body is not a
    chat completion (malformed JSON, no message) is retried the same way here. Other errors (400, 401, 403,
    404) fail at once. A failure after the retries raises `ReflectionLMError` for the whole batch, naming the
    URL, the model and the HTTP status or network error.

    The key is read from the environment variable named by `api_key_env` when a batch starts; it lives only
    in that call's SDK client, never on this object, and is scrubbed from error text (a server may echo it).
    `api_key_env` None or "" means an endpoint without authentication (no Authorization header is sent).

    Args:
      base_url: the API root, e.g. "http://127.0.0.1:8000/v1" (requests go to {base_url}/chat/completions).
      model: model name sent in each request.
      timeout_s: per-request timeout.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    retries: int = 4
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
        client = self._client(key, self.retries, self.timeout_s)
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts)))
        try:
            return list(pool.map(lambda p: self._complete_one(client, p, key, self.max_tokens), prompts))
        finally:
            # On a failure, requests not yet started are dropped rather than sent for a batch already lost.
            pool.shutdown(wait=True, cancel_futures=True)
            client.close()

    def preflight(self) -> None:
        """One tiny request (max_tokens=1, one retry) so that a wrong URL, a refused connection, a missing or
        rejected key or an unknown model fail before anything heavy starts; raises `ReflectionLMError`."""
        key = self._key()
        client = self._client(key, min(self.retries, 1), min(self.timeout_s, 30.0))
        try:
            self._complete_one(client, "Reply with OK.", key, 1, check_reply=False)
        finally:
            client.close()

    def _key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ReflectionLMError(
                f"environment variable {self.api_key_env} is not set; export the API key there, or set "
                "api_key_env to \"\" (config.gepa.reflection.api_key_env=\"\") for an endpoint without authentication"
            )
        return key

    def _client(self, key: str | None, retries: int, timeout_s: float):
        try:
            import openai
        except ImportError as e:
            raise ReflectionLMError("the hosted reflection LM needs the openai package: pip install "
                                    "'fst_jax[openai]' (or set config.gepa.reflection.kind=local)") from e
        # The SDK insists on credentials; a keyless endpoint gets a placeholder whose header is then omitted.
        return openai.OpenAI(base_url=self.base_url, api_key=key or "unused", max_retries=retries,
                             timeout=timeout_s)

    def _complete_one(self, client: Any, prompt: str, key: str | None, max_tokens: int,
                      check_reply: bool = True) -> Completion:
        import openai

        extra = {} if key else {"extra_headers": {"Authorization": openai.Omit()}}
        where = f"reflection request to {self.base_url.rstrip('/')}/chat/completions (model {self.model!r})"
        for attempt in range(client.max_retries + 1):
            try:
                reply = client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}],
                    temperature=self.temperature, max_tokens=max_tokens, **extra)
                problem = None
                if check_reply:
                    parsed = _parse_reply(reply)
                    if parsed is not None:
                        return parsed
                    problem = "malformed reply: no message content in the chat completion"
                else:
                    return Completion("")
            except openai.APIStatusError as e:
                body = _scrub(e.response.text[:300], key)
                retried = e.status_code in (408, 409, 429) or e.status_code >= 500
                tries = f" after {client.max_retries + 1} attempts" if retried else ""
                raise ReflectionLMError(f"{where} failed{tries}: HTTP {e.status_code}: {body}") from None
            except openai.APITimeoutError:
                raise ReflectionLMError(f"{where} failed after {client.max_retries + 1} attempts: the request "
                                        f"timed out (timeout {client.timeout}s)") from None
            except openai.APIConnectionError as e:
                cause = _scrub(str(e.__cause__ or e), key)
                raise ReflectionLMError(f"{where} failed after {client.max_retries + 1} attempts: cannot connect "
                                        f"({cause})") from None
            except (ValueError, openai.APIResponseValidationError) as e:  # malformed JSON in a 200 reply
                problem = f"malformed JSON in the response ({type(e).__name__})"
            if attempt == client.max_retries:
                raise ReflectionLMError(f"{where} failed after {attempt + 1} attempts: {problem}")
            delay = min(8.0, 0.5 * 2**attempt)  # the SDK's schedule, for replies it cannot judge
            logger.warning("reflection reply unusable (%s); retry %d/%d in %.2fs", problem, attempt + 1,
                           client.max_retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")


def _parse_reply(reply: Any) -> Completion | None:
    """The first choice's message content, or None if the reply is not a usable chat completion."""
    try:
        choice = reply.choices[0]
        content = choice.message.content
    except (AttributeError, IndexError, TypeError):
        return None
    if not isinstance(content, str):
        return None
    return Completion(content, finished=choice.finish_reason != "length")


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


def reflection_lm_from_config(r: Any, generate_text: GenerateText | None = None) -> ReflectionLM:
    """The reflection LM of a run config (`config.gepa.reflection`).

    `openai`: the endpoint's fields; `local`: `generate_text` (the caller's sampler) with the config's
    temperature and token limit; any other registered kind: its factory called with `r.options`.
    """
    if r.kind == "openai":
        if not r.model:
            raise ValueError("config.gepa.reflection.model is empty: set it to the model name the endpoint serves")
        return OpenAIReflectionLM(base_url=r.base_url, model=r.model, api_key_env=r.api_key_env or None,
                                  timeout_s=r.timeout_s, retries=r.max_retries, max_concurrency=r.max_concurrency,
                                  temperature=r.temperature, max_tokens=r.max_new_tokens)
    if r.kind == "local":
        if generate_text is None:
            raise ValueError("a local reflection LM needs generate_text (the sampler that runs the model)")
        return LocalReflectionLM(generate_text, temperature=r.temperature, max_new_tokens=r.max_new_tokens)
    if r.kind not in _REGISTRY or r.kind == "callable":
        raise ValueError(f"config.gepa.reflection.kind must be 'local', 'openai' or a kind registered with "
                         f"register_reflection_lm, got {r.kind!r}")
    options = r.get("options") if hasattr(r, "get") else None
    return make_reflection_lm(r.kind, **(options.to_dict() if hasattr(options, "to_dict") else dict(options or {})))
