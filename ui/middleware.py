"""The server's ASGI middleware: the Host and Origin checks, security headers and request body
limits. Pure ASGI, so streams and disconnects pass through untouched. Authentication (keys, the API
token, the loopback mode of a server without either) is ``ui/auth.py``; it uses
``LoopbackHostOnly`` from here for the loopback mode.

Without keys, only requests addressed to 127.0.0.1, localhost, [::1] or the configured host are
served (any other ``Host`` is a 400): a web page cannot reach the server by pointing a name of its
own at 127.0.0.1 (DNS rebinding).

Cross-site requests are refused (``SameOrigin``), whatever the route (Gradio's included): a request
whose ``Origin`` is not the server's own, nor one ``ServeSettings.cors_origins`` lists, is a 403,
preflights included, so no other site's page (another port on localhost included) can call the
server with the browser's credentials. Without ``Origin``, a state-changing request that the
browser marks ``Sec-Fetch-Site: cross-site`` or ``same-site`` is refused too. Clients that are not
browsers send no ``Origin`` and pass. CORS answers only the listed origins.

Every response carries a Content-Security-Policy that lets the page load and connect to this server
only (kernel output or a model's answer shown in the UI, an image from another host say, cannot
make the browser send workspace data elsewhere) and ``X-Content-Type-Options: nosniff``.

Request bodies are bounded: the upload routes by the server's upload limit, everything else by
``BODY_LIMIT``; a larger body, announced by Content-Length or counted as it streams, is a 413. A
body that stops arriving for ``idle_s`` seconds is a 408.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

OPEN_PATHS = frozenset({"/healthz"})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
BODY_LIMIT = 16 << 20  # any request body but an upload's
UPLOAD_PATHS = re.compile(r"/api/sessions/[^/]+/files|/gradio_api/upload")
DRAIN_CAP = 64 << 20  # an oversized body is read (and dropped) this far, so the client sees the 413
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}
# What the UI needs and no more: its own scripts and styles (Gradio inlines both), images, media
# and fonts from this server or inlined, requests to this server only.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self' 'unsafe-inline'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    "media-src 'self' data: blob:",
    "font-src 'self' data:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'self'",
])


class InvalidText(ValueError):
    """A request's JSON holds a string that is not valid Unicode text."""


def check_text(value: Any) -> None:
    """Raise ``InvalidText`` for a string, anywhere in a JSON document, that is not valid Unicode
    text: a lone surrogate such as ``"\\ud800"`` parses from JSON but cannot be encoded, and would
    fail deep in the kernel's protocol or a model request."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidText("text holds an unpaired surrogate (such as \\ud800): send valid UTF-8") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    if path.startswith("/v1"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "code": status}}
    return {"error": message}


async def refuse(scope: Scope, receive: Receive, send: Send, metrics: Metrics, status: int, message: str,
                 headers: dict[str, str] | None = None) -> None:
    """Answer from a middleware: a JSON error, also to a websocket handshake where the server can
    send one (else close code 1008, which the server answers with a 403)."""
    metrics.failures.labels(str(status)).inc()
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    if scope["type"] == "websocket":  # the handshake is answered with the same JSON error as HTTP
        body = JSONResponse(error_body(scope["path"], status, message), status_code=status, headers=headers)
        await send({"type": "websocket.http.response.start", "status": status, "headers": body.raw_headers})
        await send({"type": "websocket.http.response.body", "body": body.body})
        return
    response = JSONResponse(error_body(scope["path"], status, message), status_code=status, headers=headers)
    await response(scope, receive, send)


def host_name(host: str) -> str:
    """The name in a Host header, without the port: ``[::1]:80`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class LoopbackHostOnly:
    """Without a token: serve only requests addressed to a loopback name or the configured host.

    A page on another site can resolve a name it controls to 127.0.0.1 (DNS rebinding) and then
    call this server as its own origin; its requests still carry that name in ``Host``."""

    def __init__(self, app: ASGIApp, host: str, metrics: Metrics) -> None:
        self.app = app
        self.allowed = LOOPBACK_NAMES | {host_name(host) if host.startswith("[") else host.lower()}
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        if host_name(host) in self.allowed:
            await self.app(scope, receive, send)
            return
        await refuse(scope, receive, send, self.metrics, 400,
                     f"this server answers requests for {', '.join(sorted(self.allowed))} only, not {host!r}: "
                     "open it by one of those names, or add a user (`jupybox users add NAME`) or start it with "
                     "--api-token to serve others")


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` in lower case, without the scheme's default port; what a browser's
    ``Origin`` header holds. Malformed input gives a string no real origin equals."""
    parts = urlsplit(url.strip().lower())
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        return "invalid:" + url
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != DEFAULT_PORTS.get(parts.scheme) else "")


def own_origin(scope: Scope) -> str:
    """The origin a page of this server has, as the request reached it (Host, and the scheme
    uvicorn saw, a trusted proxy's ``X-Forwarded-Proto`` applied)."""
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
    return origin_of(f"{scheme}://{Headers(scope=scope).get('host', '')}")


class SameOrigin:
    """Refuses cross-site requests: see the module docstring."""

    def __init__(self, app: ASGIApp, allowed: list[str], metrics: Metrics) -> None:
        self.app = app
        self.any = "*" in allowed
        self.allowed = frozenset(origin_of(o) for o in allowed if o != "*")
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS or self.any:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None:
            mine = own_origin(scope)
            if origin_of(origin) in (mine, *self.allowed) and origin.strip().lower() != "null":
                await self.app(scope, receive, send)
                return
            await refuse(scope, receive, send, self.metrics, 403,
                         f"cross-origin request from {origin[:100]!r} refused: this server answers its own pages "
                         f"({mine}) only; start it with --cors-origin ORIGIN to allow another site")
            return
        changes = scope["type"] == "websocket" or scope["method"] not in SAFE_METHODS
        if changes and headers.get("sec-fetch-site", "") in ("cross-site", "same-site"):
            await refuse(scope, receive, send, self.metrics, 403,
                         "cross-site request refused: this server answers its own pages only")
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses a request body over its limit with 413: by its Content-Length before the app runs,
    or, sent without one (chunked), as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, upload_limit: int, metrics: Metrics, idle_s: float = 30.0) -> None:
        self.app = app
        self.upload_limit = upload_limit
        self.metrics = metrics
        self.idle_s = idle_s

    def _limit(self, path: str) -> tuple[int, str]:
        if UPLOAD_PATHS.fullmatch(path):
            return self.upload_limit, "for an upload is {limit:,} bytes (--upload-limit-mb)"
        return BODY_LIMIT, "is {limit:,} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, rule = self._limit(scope["path"])
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > limit:
            if int(length) <= limit + DRAIN_CAP:
                await drain(receive, int(length))
            await refuse(scope, receive, send, self.metrics, 413,
                         f"the request body is {int(length):,} bytes; the limit {rule.format(limit=limit)}")
            return
        received, complete = 0, False

        async def counted() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what follows is the disconnect a stream listens for
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_s)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body stopped arriving for {self.idle_s:g} s") from None
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body", False):
                        await drain(receive, DRAIN_CAP)
                    # Raised where the app reads the body; its exception handlers answer with the 413.
                    raise HTTPException(413, f"the request body is over the limit, which {rule.format(limit=limit)}")
            return message

        await self.app(scope, counted, send)


async def drain(receive: Receive, cap: int = DRAIN_CAP) -> None:
    """Read what is left of a request body, up to ``cap`` bytes, and drop it."""
    received, more = 0, True
    while more and received <= cap:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        more = message.get("more_body", False)


class SecurityHeaders:
    """Adds ``CONTENT_SECURITY_POLICY`` and ``nosniff`` to every response."""

    HEADERS = [(b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
               (b"x-content-type-options", b"nosniff")]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in dict(self.HEADERS)]
                message = {**message, "headers": [*kept, *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_policy)
