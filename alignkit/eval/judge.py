"""LLM judges: which of two answers to a prompt is better.

A :class:`Judge` sees one prompt and two answers in a fixed order and returns a :data:`Verdict`
about the positions ("first", "second", "tie"), or None when its reply could not be parsed; an
unparseable reply is counted as such, never guessed. :class:`OpenAIJudge` asks any
OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp, ``alignkit serve``)
through the official ``openai`` client.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

from alignkit.errors import AlignkitError
from alignkit.eval.samples import Prompt, prompt_text

Verdict = Literal["first", "second", "tie"] | None

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")

SYSTEM_PROMPT = (
    "You are an impartial judge. You are shown a user's request and two answers, A and B. "
    "Decide which answer better serves the user: helpful, correct, clear and honest. "
    "Do not let the order of the answers or their length sway you. "
    'Reply with exactly one word: "A" if answer A is better, "B" if answer B is better, '
    'or "tie" if neither is better.'
)

USER_TEMPLATE = (
    "{request}\n\n[Answer A]\n{first}\n\n[Answer B]\n{second}\n\n"
    'Which answer is better? Reply with exactly "A", "B" or "tie".'
)


def judge_messages(prompt: Prompt, first: str, second: str) -> list[dict[str, str]]:
    """The chat asking the judge to compare `first` and `second` as answers to `prompt`; a
    conversation is shown whole, since what a good next turn is depends on the earlier ones."""
    if isinstance(prompt, str):
        request = f"[User request]\n{prompt}"
    else:
        request = "[Conversation; each answer is the assistant's next turn]\n" + prompt_text(prompt)
    user = USER_TEMPLATE.format(request=request, first=first, second=second)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_VERDICTS: dict[str, Verdict] = {"a": "first", "b": "second", "tie": "tie"}
# Wrapping a model may put around its one word: "**A**", "'tie'", "A.", "Answer: B", "[[A]]"
_DECORATION = re.compile(r"^[\s\"'`*_\[\](){}.:!]+|[\s\"'`*_\[\](){}.:!]+$")
_LABEL = re.compile(r"^(?:answer|verdict|final answer|better answer)\s*(?:is)?\s*[:=-]?\s*", re.I)


class Judge(Protocol):
    def compare(self, prompt: str, first: str, second: str) -> Verdict: ...


class JudgeUnavailable(AlignkitError):
    """The judge endpoint stayed unreachable or refused to work.

    ``partial`` holds the win rate (``alignkit.eval.winrate.WinRate``) of the prompts judged
    before the failure, set by ``win_rate`` as the error passes through it; None when raised by a
    judge on its own. Typed loosely so that this module, which win rates build on, does not
    import theirs.
    """

    def __init__(self, message: str, *, hint: str | None = None, partial: Any = None):
        super().__init__(message, hint=hint)
        self.partial = partial


def parse_verdict(text: str | None) -> Verdict:
    """Reply "A" -> "first", "B" -> "second", "tie" -> "tie"; anything else -> None.

    Only the first non-empty line counts, after stripping quotes, markdown emphasis, brackets,
    final punctuation and a leading "Answer:"-style label; "A is better" or "B, because..." are
    not read into a verdict, so a judge that rambles is counted unparseable, not guessed.
    """
    if not text:
        return None
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    word = _DECORATION.sub("", line)
    word = _DECORATION.sub("", _LABEL.sub("", word)).lower()
    return _VERDICTS.get(word)


def is_local(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in LOCAL_HOSTS or host.startswith("127.")


def normalise_url(url: str) -> str:
    """The client's base URL: a bare ``http://host:port`` gets the usual ``/v1`` path."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise AlignkitError(
            f"judge URL '{url}' is not an http(s) URL",
            hint="give the OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1",
        )
    return url.rstrip("/") + "/v1" if parsed.path in ("", "/") else url.rstrip("/")


def _api_key(url: str, env: str) -> str:
    key = os.environ.get(env)
    if key:
        return key
    if is_local(url):
        return "unused"  # local servers (llama.cpp, vLLM, alignkit serve) ignore the key
    raise AlignkitError(
        f"the judge at {url} needs an API key, and the environment variable {env} is not set",
        hint=f"export {env}=... (or name another variable for the key)",
    )


def _retryable() -> tuple[type[Exception], ...]:
    import openai

    # Connection refused/reset and timeouts (APITimeoutError is an APIConnectionError), server
    # errors and rate limits can pass; a wrong key, model or request will not.
    return (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)


class OpenAIJudge:
    """A judge behind any OpenAI-compatible chat-completions endpoint.

    Asked greedily (temperature 0) for one word. Connection errors, timeouts, 5xx and 429 are
    retried ``retries`` times with exponential backoff (``backoff_s``, then twice that, ...);
    after that, or at once on a refusal such as a wrong key or model name, JudgeUnavailable.
    ``last_answer`` keeps the judge's latest raw reply so unparseable ones can be reported.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        retries: int = 4,
        backoff_s: float = 1.0,
        timeout_s: float = 60.0,
        max_tokens: int = 16,
    ):
        import openai

        self.url = normalise_url(url)
        self.model = model
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        self.last_answer: str | None = None
        # The client's own retries are off: ours know about backoff and partial results
        self.client = openai.OpenAI(
            base_url=self.url,
            api_key=_api_key(self.url, api_key_env),
            max_retries=0,
            timeout=timeout_s,
        )

    def compare(self, prompt: Prompt, first: str, second: str) -> Verdict:
        self.last_answer = self._ask(judge_messages(prompt, first, second))
        return parse_verdict(self.last_answer)

    def _ask(self, messages: list[dict[str, str]]) -> str | None:
        import openai

        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                reply = self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=0.0,
                    max_tokens=self.max_tokens,
                )
            except _retryable() as exc:
                error = exc
                continue
            except openai.APIStatusError as exc:
                raise self._refused(exc) from exc
            return reply.choices[0].message.content if reply.choices else None
        raise JudgeUnavailable(
            f"the judge at {self.url} is unreachable after {self.retries + 1} attempts: "
            f"{type(error).__name__}: {error}",
            hint="start the judge server or correct the judge URL (an OpenAI-compatible base "
            "URL such as http://127.0.0.1:8000/v1), then run again; prompts judged so far are "
            "kept",
        ) from error

    def _refused(self, exc: Exception) -> JudgeUnavailable:
        status = getattr(exc, "status_code", None)
        hints = {
            401: "check the API key in the environment variable the judge reads",
            403: "check the API key's permissions for this model",
            404: f"check the judge model name '{self.model}' and the URL's path (usually /v1)",
        }
        return JudgeUnavailable(
            f"the judge at {self.url} refused the request ({status}): {exc}",
            hint=hints.get(status, "check the judge URL and model name")
            + "; prompts judged so far are kept",
        )
