"""The server's ASGI middleware: authentication, the Host check, the Content-Security-Policy and
request body limits. Pure ASGI, so streams and disconnects pass through untouched.

Authentication (when ``ServeSettings.api_token`` is set): every path but ``/healthz`` needs the
token, given as one of

- ``Authorization: Bearer <token>`` — API clients; the OpenAI client's ``api_key`` is sent this way;
- ``Authorization: token <token>`` — the same, as Jupyter clients send it (the kernels API);
- the ``jupybox_token`` cookie — set by the server (HttpOnly, SameSite=Strict), so the browser UI's
  own requests carry it;
- ``GET /?token=<token>`` — open the UI once this way: the answer sets the cookie and redirects
  (303) to the same URL without the token, so it stays out of the browser's history. Nowhere else
  is a token in the query string accepted.

Tokens are compared in constant time. Without a token, only requests addressed to 127.0.0.1,
localhost, [::1] or the configured host are served (any other ``Host`` is a 400): a web page
cannot reach the server by pointing a name of its own at 127.0.0.1 (DNS rebinding). CORS is off
unless ``ServeSettings.cors_origins`` lists origins.

Every response but the API docs pages carries a Content-Security-Policy that lets the page load
and connect to this server only: kernel output or a model's answer shown in the UI (an image
from another host, say) cannot make the browser send workspace data elsewhere.

Request bodies are bounded: the upload routes by the server's upload limit, everything else by
``BODY_LIMIT``; a larger body, announced by Content-Length or counted as it streams, is a 413.
"""

from __future__ import annotations

import hmac
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi.responses import JSONResponse, RedirectResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

TOKEN_COOKIE = "jupybox_token"
AUTH_SCHEMES = frozenset({"bearer", "token"})  # token: what Jupyter clients send (a gateway's, VS Code's)
OPEN_PATHS = frozenset({"/healthz"})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
BODY_LIMIT = 16 << 20  # any request body but an upload's
UPLOAD_PATHS = re.compile(r"/api/sessions/[^/]+/files|/gradio_api/upload")
DRAIN_CAP = 64 << 20  # an oversized body is read (and dropped) this far, so the client sees the 413
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


class TokenAuth:
    """Pure ASGI (streams and disconnects pass through untouched): see the module docstring."""

    def __init__(self, app: ASGIApp, token: str, metrics: Metrics) -> None:
        self.app = app
        self.token = token.encode()
        self.metrics = metrics

    def _valid(self, supplied: str) -> bool:
        return hmac.compare_digest(supplied.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/":
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            if any(k == "token" for k, _ in query):
                await self._redeem(scope, receive, send, query)
                return
        headers = Headers(scope=scope)
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        supplied = credentials.strip() if scheme.lower() in AUTH_SCHEMES else None
        if supplied is None:
            supplied = cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE) or None
        if supplied is None or not self._valid(supplied):
            message = ("this server needs an API token: send 'Authorization: Bearer <token>'" if supplied is None
                       else "the API token is wrong")
            await refuse(scope, receive, send, self.metrics, 401, message, {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)

    async def _redeem(self, scope: Scope, receive: Receive, send: Send, query: list[tuple[str, str]]) -> None:
        """``GET /?token=``: the cookie, and a redirect to the URL without the token."""
        token = next(v for k, v in reversed(query) if k == "token")
        if not self._valid(token):
            await refuse(scope, receive, send, self.metrics, 401, "the API token is wrong",
                         {"WWW-Authenticate": "Bearer"})
            return
        rest = urlencode([(k, v) for k, v in query if k != "token"])
        response = RedirectResponse(scope.get("root_path", "") + "/" + (f"?{rest}" if rest else ""), status_code=303)
        response.set_cookie(TOKEN_COOKIE, token, path="/", httponly=True, samesite="strict")
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
                     "open it by one of those names, or start it with --api-token to serve others")


class BodyLimit:
    """Refuses a request body over its limit with 413: by its Content-Length before the app runs,
    or, sent without one (chunked), as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, upload_limit: int, metrics: Metrics) -> None:
        self.app = app
        self.upload_limit = upload_limit
        self.metrics = metrics

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
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
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


class ContentSecurityPolicy:
    """Adds ``CONTENT_SECURITY_POLICY`` to every response but those of the ``exempt`` paths."""

    def __init__(self, app: ASGIApp, exempt: frozenset[str]) -> None:
        self.app = app
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                policy = (b"content-security-policy", CONTENT_SECURITY_POLICY.encode())
                message = {**message, "headers": [*message.get("headers", []), policy]}
            await send(message)

        await self.app(scope, receive, send_with_policy)
