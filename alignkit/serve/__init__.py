"""`alignkit serve`: a model behind an OpenAI-compatible chat-completions API."""

from __future__ import annotations

import errno
from collections.abc import Callable

from alignkit.errors import AlignkitError
from alignkit.serve.engine import ChatEngine, Finished
from alignkit.serve.protocol import ChatRequest, RequestError, StopMatcher, parse_request
from alignkit.serve.server import ChatServer

__all__ = [
    "ChatEngine",
    "ChatRequest",
    "ChatServer",
    "Finished",
    "RequestError",
    "StopMatcher",
    "exposure_warning",
    "make_server",
    "parse_request",
    "serve_forever",
]


def make_server(
    engine: ChatEngine | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
) -> ChatServer:
    """Bind the server (port 0 picks a free port); a taken port is a clear error. With
    `api_key`, every request must carry it as `Authorization: Bearer KEY`."""
    try:
        return ChatServer((host, port), engine, api_key)
    except OSError as exc:
        hint = (
            "choose another --port, or stop the process using it"
            if exc.errno == errno.EADDRINUSE
            else "check --host: it must be an address of this machine"
        )
        raise AlignkitError(f"cannot listen on {host}:{port}: {exc.strerror}", hint=hint) from None


def exposure_warning(server: ChatServer) -> str | None:
    """A warning when other machines can reach the server and no API key guards it."""
    if server.api_key or server.loopback_only:
        return None
    host, port = server.server_address[:2]
    return (
        f"warning: serving on {host}:{port} without an API key: anyone who can reach this port "
        "can use the model; set --api-key (or ALIGNKIT_API_KEY), or serve on 127.0.0.1"
    )


def serve_forever(server: ChatServer, log: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C, then close the socket so the port is free at once."""
    log(f"serving '{server.engine.name}' at {server.base_url} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopping")
    finally:
        server.server_close()
