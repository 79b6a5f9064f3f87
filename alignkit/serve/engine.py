"""Chat generation for the server: one request at a time, streamed piece by piece.

Streamed and non-streamed requests share one code path (a non-streamed reply is the joined
stream), so both give the same text for the same request. Generation runs in a worker thread
feeding transformers' ``TextIteratorStreamer``; the request thread reads it, cuts the text at a
stop sequence, and can cancel the worker (stop sequence seen, client gone) through a stopping
criterion checked after every token.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from alignkit.rollout.generate import stop_token_ids
from alignkit.serve.protocol import ChatRequest, RequestError, StopMatcher


class Finished(NamedTuple):
    text: str
    finish_reason: str  # "stop": end-of-turn or a stop sequence; "length": the token limit
    prompt_tokens: int
    completion_tokens: int


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        # one flag per sequence in the batch, (B,)
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class ChatEngine:
    """A loaded model and tokenizer behind a lock: generate() is not safe to run concurrently
    on one model, and a small local server gains nothing from interleaving requests."""

    def __init__(self, model: Any, tokenizer: Any, name: str, max_new_tokens: int = 512):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.stops = stop_token_ids(tokenizer, model)
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        self.context = getattr(model.config, "max_position_embeddings", None)

    def _render(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        # A base model without a template: a plain transcript it can continue
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:"

    def _encode(self, req: ChatRequest) -> tuple[torch.Tensor, int]:
        """Prompt ids (1, T) and the number of new tokens allowed."""
        text = self._render(req.messages)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        # The request may ask for fewer tokens than the server's limit, never more
        limit = min(req.max_tokens or self.max_new_tokens, self.max_new_tokens)
        if self.context is not None and ids.shape[1] >= self.context:
            raise RequestError(
                f"the prompt has {ids.shape[1]} tokens; the model's context is {self.context}",
                param="messages",
            )
        if self.context is not None:
            limit = min(limit, self.context - ids.shape[1])
        return ids.to(self.device), limit

    def _generate_kwargs(self, req: ChatRequest, ids: torch.Tensor, limit: int) -> dict[str, Any]:
        # temperature 0 or top_p 0 leave only the most likely token: greedy decoding
        sample = req.temperature > 0 and req.top_p > 0
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": limit,
            "do_sample": sample,
            "temperature": req.temperature if sample else None,
            "top_p": req.top_p if sample else None,
            "top_k": None,  # OpenAI semantics: no top-k cut unless asked, whatever the config says
            "eos_token_id": self.stops,
            "pad_token_id": self.tokenizer.pad_token_id,
        }

    def complete(self, req: ChatRequest) -> Finished:
        pieces: list[str] = []
        return self.stream(req, pieces.append)

    def stream(self, req: ChatRequest, emit: Callable[[str], None]) -> Finished:
        """Generate, calling ``emit`` with each new piece of text; an exception from ``emit``
        (the client went away) cancels generation and propagates."""
        with self.lock:
            ids, limit = self._encode(req)
            if req.seed is not None:
                torch.manual_seed(req.seed)
            streamer = TextIteratorStreamer(
                self.tokenizer, skip_prompt=True, skip_special_tokens=True
            )
            cancel = threading.Event()
            kwargs = self._generate_kwargs(req, ids, limit)
            kwargs["streamer"] = streamer
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
            result: dict[str, Any] = {}
            worker = threading.Thread(
                target=self._run, args=(kwargs, streamer, result), daemon=True
            )
            worker.start()
            matcher = StopMatcher(req.stop)
            text: list[str] = []
            try:
                for piece in streamer:
                    safe = matcher.feed(piece)
                    if matcher.stopped:
                        cancel.set()  # the stop sequence is out: no need for more tokens
                    if safe:
                        text.append(safe)
                        emit(safe)
                tail = matcher.flush()
                if tail:
                    text.append(tail)
                    emit(tail)
            except BaseException:
                cancel.set()
                raise
            finally:
                worker.join()
            if "error" in result:
                raise result["error"]
            return self._finished(result["output"], ids.shape[1], limit, "".join(text), matcher)

    @torch.no_grad()
    def _run(self, kwargs: dict[str, Any], streamer: TextIteratorStreamer, result: dict) -> None:
        try:
            result["output"] = self.model.generate(**kwargs)
        except BaseException as exc:  # handed to the request thread, which reports it
            result["error"] = exc
            streamer.end()  # unblock the reader, which would otherwise wait forever

    def _finished(
        self, output: torch.Tensor, prompt_len: int, limit: int, text: str, matcher: StopMatcher
    ) -> Finished:
        new = output[0, prompt_len:].tolist()  # (new tokens,) of the single sequence
        hit = next((j for j, t in enumerate(new) if t in self.stops), None)
        count = len(new) if hit is None else hit + 1  # the end-of-turn token is generated too
        ended = hit is not None or matcher.stopped
        reason = "length" if not ended and count >= limit else "stop"
        return Finished(text, reason, prompt_len, count)
