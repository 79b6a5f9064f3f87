"""An OpenAI-compatible HTTP server for one model, on the standard library's http.server.

Routes: ``POST /v1/chat/completions`` (plain JSON or server-sent events) and ``GET /v1/models``,
each behind ``Authorization: Bearer KEY`` when the server has an API key.
Each connection gets a thread (ThreadingHTTPServer), while the engine's lock lets one generation
run at a time: enough for trying a model, judging and evaluation, with no web framework to
install. Responses use HTTP/1.0 semantics (the connection closes after each reply), so a stream
needs neither a length nor chunked encoding.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from alignkit.serve.engine import ChatEngine
from alignkit.serve.protocol import (
    RequestError,
    check_api_key,
    chunk_body,
    completion_body,
    models_body,
    new_id,
    parse_request,
    usage,
)

MAX_BODY = 16 * 1024 * 1024  # bytes; a chat request is far smaller


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True  # a client holding a connection open does not block shutdown

    def __init__(
        self, address: tuple[str, int], engine: ChatEngine | None, api_key: str | None = None
    ):
        super().__init__(address, ChatHandler)
        self.engine = engine  # may be set after binding, so a taken port fails before loading
        self.api_key = api_key or None  # None: every request is served
        self.created = int(time.time())

    @property
    def loopback_only(self) -> bool:
        """Whether only this machine can connect (the bound address is a loopback one)."""
        return ipaddress.ip_address(self.server_address[0]).is_loopback

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    server_version = "alignkit"
    _streaming = False  # set once a stream's headers are out: errors then go in the stream

    def log_message(self, format: str, *args: Any) -> None:
        # One short line per request on stderr, without the base class's reverse DNS lookup
        sys.stderr.write(f"[alignkit serve] {self.address_string()} {format % args}\n")

    def _authorized(self) -> bool:
        """With an API key set, every route (/v1/models too) needs it; answers 401 if missing."""
        if self.server.api_key is None:
            return True
        try:
            check_api_key(self.headers.get("Authorization"), self.server.api_key)
        except RequestError as exc:
            self._error(exc)
            return False
        return True

    def do_GET(self) -> None:
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self._json(200, models_body(self.server.engine.name, self.server.created))
        else:
            self._error(RequestError(f"no route GET {self.path}", status=404))

    def do_POST(self) -> None:
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(RequestError(f"no route POST {self.path}", status=404))
            return
        try:
            req = parse_request(self._body())
            if req.stream:
                self._stream(req)
            else:
                self._complete(req)
        except RequestError as exc:
            self._error(exc)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; generation was cancelled
        except Exception as exc:  # a generation failure: report it, keep serving
            self._error(RequestError(f"generation failed: {exc}", status=500))

    def _error(self, exc: RequestError) -> None:
        if self._streaming:  # the status line is gone: OpenAI-style error event, then close
            self._event(exc.body())
        else:
            self._json(exc.status, exc.body())

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError("bad Content-Length header") from None
        if length > MAX_BODY:
            raise RequestError(f"the request body is larger than {MAX_BODY} bytes", status=413)
        return self.rfile.read(length)

    def _complete(self, req: Any) -> None:
        engine = self.server.engine
        done = engine.complete(req)
        counts = usage(done.prompt_tokens, done.completion_tokens)
        body = completion_body(new_id(), engine.name, done.text, done.finish_reason, counts)
        self._json(200, body)

    def _stream(self, req: Any) -> None:
        engine, cid = self.server.engine, new_id()

        def send(body: dict[str, Any]) -> None:
            if not self._streaming:  # headers only once generation runs, so a 400 stays a 400
                self._start_stream()
                self._event(chunk_body(cid, engine.name, {"role": "assistant", "content": ""}))
            self._event(body)

        def emit(text: str) -> None:
            send(chunk_body(cid, engine.name, {"content": text}))

        done = engine.stream(req, emit)
        send(chunk_body(cid, engine.name, {}, done.finish_reason))
        if req.include_usage:
            counts = usage(done.prompt_tokens, done.completion_tokens)
            send(chunk_body(cid, engine.name, None, counts=counts))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, body: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()

    def _start_stream(self) -> None:
        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
