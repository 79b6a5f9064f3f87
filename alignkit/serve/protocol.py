"""The OpenAI chat-completions wire format: request validation, responses, stream chunks.

Only what a local server for one model needs: ``n`` must be 1, tools and logprobs are not
offered. A request that cannot be served raises :class:`RequestError`, which the HTTP layer turns
into OpenAI's error object with status 400, so clients (the official ``openai`` package included)
raise their usual ``BadRequestError`` instead of failing on a closed connection.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "developer")
MAX_STOPS = 4  # OpenAI's limit on `stop` sequences


class RequestError(Exception):
    """A request the server refuses, with the fields of OpenAI's error object."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}


def check_api_key(authorization: str | None, api_key: str) -> None:
    """Accept the request only with `Authorization: Bearer <api_key>`, as OpenAI clients send it;
    anything else is OpenAI's 401 `invalid_api_key` error."""
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest: the time taken does not tell how much of a guessed key was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), api_key.encode()
    ):
        what = "a wrong API key" if authorization else "no API key"
        raise RequestError(
            f"{what} was given: send the server's key as 'Authorization: Bearer KEY' (the "
            "api_key of an OpenAI client)",
            status=401,
            code="invalid_api_key",
        )


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default; 0 means greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with token counts
    seed: int | None = None


def _content_text(content: Any, i: int) -> str:
    """Message content as text: a string, or OpenAI's list of {"type": "text", "text": ...}."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise RequestError(
                    "only text content parts are supported", param=f"messages[{i}].content"
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise RequestError("content must be a string", param=f"messages[{i}].content")


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(
                f"each message needs a role among {', '.join(ROLES)}", param=f"messages[{i}].role"
            )
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name
        out.append({"role": role, "content": _content_text(m.get("content", ""), i)})
    return out


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"'{name}' must be a number in [{low}, {high}]", param=name)
    return float(value)


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise RequestError(
            f"'stop' must be a string or a list of up to {MAX_STOPS} non-empty strings",
            param="stop",
        )
    return stops


def _int_or_none(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(f"'{name}' must be an integer >= {low}", param=name)
    return value


def parse_request(raw: bytes) -> ChatRequest:
    """Validate a /v1/chat/completions body; raises RequestError on anything unusable."""
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", param="stream")
    # max_completion_tokens is the newer name of max_tokens
    max_tokens = _int_or_none(body, "max_completion_tokens", 1) or _int_or_none(
        body, "max_tokens", 1
    )
    options = body.get("stream_options") or {}
    return ChatRequest(
        messages=_messages(body.get("messages")),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=_stops(body.get("stop")),
        stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        seed=_int_or_none(body, "seed", 0),
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(
    cid: str, model: str, text: str, finish_reason: str, counts: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": counts,
    }


def chunk_body(
    cid: str,
    model: str,
    delta: dict[str, str] | None,
    finish_reason: str | None = None,
    counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; ``delta=None`` is the usage-only chunk (no choices)."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    )
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if counts is not None:
        body["usage"] = counts
    return body


def models_body(model: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "alignkit"}],
    }


class StopMatcher:
    """Cuts streamed text at the first stop sequence, which is itself never sent.

    Text that could still turn into a stop sequence (a suffix equal to a stop's prefix) is held
    back until the next piece settles it, so a stop split across two tokens is still caught.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of ``text`` (plus held-back text) that is safe to send now."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = self._held_back()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _held_back(self) -> int:
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    longest = max(longest, k)
                    break
        return longest
