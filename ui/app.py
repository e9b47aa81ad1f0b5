"""The one ASGI app ``jupybox serve`` runs: the browser UI at ``/``, the JSON API under ``/api``,
the OpenAI-compatible endpoint under ``/v1``, ``/healthz`` and ``/metrics``.

``create_app(services)`` builds it; its lifespan starts and stops the ``Services``, so when the
server stops every sandbox session is closed and no container is left.

Authentication (when ``ServeSettings.api_token`` is set): every path but ``/healthz`` needs the
token, given as one of

- ``Authorization: Bearer <token>`` — API clients; the OpenAI client's ``api_key`` is sent this way;
- the ``jupybox_token`` cookie — set by the server (HttpOnly, SameSite=Strict) when a request
  authenticated with the query parameter below, so the browser UI's own requests carry it;
- ``?token=<token>`` — open the UI once as ``http://host:port/?token=<token>``.

Tokens are compared in constant time. CORS is off unless ``ServeSettings.cors_origins`` lists
origins.

Errors are JSON, never a stack trace: ``{"error": "<sentence>"}`` under ``/api`` and elsewhere,
``{"error": {"message": ..., "type": ...}}`` under ``/v1`` (the OpenAI shape its clients read).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from interpreter import FormatError, ModelCancelled, ModelError, ModelUnavailable
from sandbox import (
    CapacityError,
    JupyboxError,
    QuotaExceeded,
    SandboxError,
    SessionClosed,
    WorkspaceError,
    WorkspacePathError,
)

from . import api, openai_compat
from .metrics import Metrics
from .services import Services, TurnBusy

log = logging.getLogger(__name__)

TOKEN_COOKIE = "jupybox_token"
OPEN_PATHS = frozenset({"/healthz"})

# Most specific first: the first class an error is an instance of gives its status.
ERROR_STATUS: list[tuple[type[JupyboxError], int]] = [
    (WorkspacePathError, 400),
    (QuotaExceeded, 413),
    (WorkspaceError, 400),
    (SessionClosed, 404),
    (CapacityError, 429),
    (SandboxError, 503),
    (ModelUnavailable, 503),
    (ModelCancelled, 409),
    (ModelError, 502),
    (FormatError, 503),
    (TurnBusy, 409),
]

UI_MISSING_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>jupybox</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>jupybox</h1>
<p>The browser UI is not built into this installation ({reason}).</p>
<p>The server works: the JSON API is under <code>/api</code> (documented at <a href="docs">/docs</a>),
an OpenAI-compatible endpoint at <code>/v1/chat/completions</code>, health at <code>/healthz</code>.</p>
</body></html>
"""


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    if path.startswith("/v1"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "code": status}}
    return {"error": message}


def error_status(exc: JupyboxError) -> int:
    return next((status for cls, status in ERROR_STATUS if isinstance(exc, cls)), 500)


class TokenAuth:
    """Pure ASGI (streams and disconnects pass through untouched): see the module docstring."""

    def __init__(self, app: ASGIApp, token: str, metrics: Metrics) -> None:
        self.app = app
        self.token = token.encode()
        self.metrics = metrics

    def _supplied(self, scope: Scope) -> tuple[str | None, bool]:
        headers = Headers(scope=scope)
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip(), False
        cookie = cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE)
        if cookie:
            return cookie, False
        query = QueryParams(scope.get("query_string", b"")).get("token")
        return query, query is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        supplied, via_query = self._supplied(scope)
        if supplied is None or not hmac.compare_digest(supplied.encode(), self.token):
            self.metrics.failures.labels("401").inc()
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            message = ("this server needs an API token: send 'Authorization: Bearer <token>'" if supplied is None
                       else "the API token is wrong")
            response = JSONResponse(error_body(scope["path"], 401, message), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        if not via_query:
            await self.app(scope, receive, send)
            return
        cookie = f"{TOKEN_COOKIE}={supplied}; Path=/; HttpOnly; SameSite=Strict".encode()

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def error_handlers(metrics: Metrics) -> dict[Any, Any]:
    """Exception class -> handler, given to ``FastAPI(exception_handlers=...)``."""

    def reply(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.failures.labels(str(status)).inc()
        return JSONResponse(error_body(request.url.path, status, message), status_code=status, headers=headers)

    async def jupybox_error(request: Request, exc: JupyboxError) -> JSONResponse:
        status = error_status(exc)
        if status >= 500 and status != 503:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return reply(request, status, str(exc), {"Retry-After": "5"} if status in (429, 503) else None)

    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            detail = (bad_json.get("ctx") or {}).get("error", "")
            return reply(request, 400, f"the request body is not valid JSON{': ' + str(detail) if detail else ''}")
        parts = []
        for e in errors[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
        return reply(request, 422, "invalid request: " + "; ".join(parts))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return reply(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server's log (the ASGI server logs it too); never to the client.
        log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        return reply(request, 500, "internal error")

    return {JupyboxError: jupybox_error, RequestValidationError: invalid_request, HTTPException: http_error,
            Exception: internal_error}


def mount_ui(app: FastAPI, services: Services) -> None:
    """HOOK for the browser UI: ``ui/web.py`` provides ``build_ui(services) -> gradio.Blocks``
    (and optionally ``mount_options()``, keyword arguments for ``gradio.mount_gradio_app``),
    mounted at ``/``. Without it (or without gradio) ``/`` serves a page saying so. Called last,
    so the UI's catch-all mount does not shadow the API's routes."""
    try:
        import gradio

        from ui import web
    except ImportError as exc:
        reason = f"{exc.name or exc} is not installed" if exc.name != "ui.web" else "ui/web.py is missing"
        log.info("no browser UI: %s", reason)
    else:
        try:
            blocks = web.build_ui(services)
        except Exception:
            log.exception("the browser UI failed to build; serving the API only")
            reason = "it failed to build; see the server log"
        else:
            options = web.mount_options() if hasattr(web, "mount_options") else {}
            gradio.mount_gradio_app(app, blocks, path="/", **options)
            return
    mount_placeholder(app, reason)


def mount_placeholder(app: FastAPI, reason: str) -> None:
    @app.get("/", include_in_schema=False)
    async def ui_missing() -> HTMLResponse:
        return HTMLResponse(UI_MISSING_PAGE.format(reason=reason))


def create_app(services: Services, ui: bool = True) -> FastAPI:
    """The server's app on ``services``; starting the app (its lifespan) starts them. ``ui=False``
    leaves the browser UI out (``/`` then says so): API-only deployments and tests."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await services.start()
        try:
            yield
        finally:
            await services.stop()

    metrics = Metrics(services.manager)
    app = FastAPI(title="jupybox", version="0.1.0", lifespan=lifespan, exception_handlers=error_handlers(metrics),
                  description="A sandboxed code interpreter: sandbox sessions, code execution, workspace files, "
                              "chat turns through the interpreter, and an OpenAI-compatible endpoint.")
    app.state.services = services
    app.state.metrics = metrics

    @app.get("/healthz", tags=["server"], summary="Liveness; open without a token")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model_available": services.llm is not None,
                "sessions_open": len(services.manager.list())}

    @app.get("/metrics", tags=["server"], summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    app.include_router(api.router, tags=["api"])
    app.include_router(openai_compat.router, tags=["openai"])

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def no_such_route(request: Request, rest: str) -> JSONResponse:
        # Without this, the UI mounted at / would answer unknown API paths with its own 404.
        raise HTTPException(404, f"no route {request.method} {request.url.path}: see /docs")

    if services.settings.api_token:
        app.add_middleware(TokenAuth, token=services.settings.api_token, metrics=metrics)
    if services.settings.cors_origins:  # added last, so outermost: preflights need no token
        app.add_middleware(CORSMiddleware, allow_origins=services.settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    if ui:
        mount_ui(app, services)
    else:
        mount_placeholder(app, "this server was started without it")
    return app
