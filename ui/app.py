"""The one ASGI app ``jupybox serve`` runs: the browser UI at ``/``, the JSON API under ``/api``,
the OpenAI-compatible endpoint under ``/v1``, ``/healthz`` and ``/metrics``.

``create_app(services)`` builds it; its lifespan starts and stops the ``Services``, so when the
server stops every sandbox session is closed and no container is left.

Authentication (``ui/auth.py``), the Host check, the Content-Security-Policy and body limits are ASGI
middleware (``ui/middleware.py``).

Errors are JSON, never a stack trace: ``{"error": "<sentence>"}`` under ``/api`` and elsewhere,
``{"error": {"message": ..., "type": ...}}`` under ``/v1`` (the OpenAI shape its clients read).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from starlette.exceptions import HTTPException
from starlette.routing import Route

from interpreter import FormatError, ModelCancelled, ModelError, ModelUnavailable, TurnBusy
from sandbox import (
    CapacityError,
    JupyboxError,
    LimitsError,
    PauseFailed,
    QuotaExceeded,
    SandboxError,
    SessionClosed,
    WorkspaceError,
    WorkspacePathError,
)

from . import api, auth, kernels_api, openai_compat
from .metrics import Metrics
from .ownership import caller_of
from .mcp import JupyboxMcp, McpSessions
from .middleware import BODY_LIMIT, BodyLimit, SameOrigin, SecurityHeaders, error_body
from .services import Services
from .web_guard import GradioGate, UploadCache, UploadRefused

log = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of gives its status.
ERROR_STATUS: list[tuple[type[JupyboxError], int]] = [
    (WorkspacePathError, 400),
    (UploadRefused, 400),
    (LimitsError, 400),
    (QuotaExceeded, 413),
    (WorkspaceError, 400),
    (SessionClosed, 404),
    (CapacityError, 429),
    (PauseFailed, 409),
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
<p>The server works: the JSON API is under <code>/api</code> (its OpenAPI schema at <code>/openapi.json</code>),
an OpenAI-compatible endpoint at <code>/v1/chat/completions</code>, health at <code>/healthz</code>.</p>
</body></html>
"""


def error_status(exc: JupyboxError) -> int:
    return next((status for cls, status in ERROR_STATUS if isinstance(exc, cls)), 500)


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


def mount_ui(app: FastAPI, services: Services, cache: UploadCache) -> None:
    """The browser UI (``ui/web.py``) at ``/``; without gradio, ``/`` serves a page saying so.
    Called last, so the UI's catch-all mount does not shadow the API's routes."""
    try:
        from ui import web
    except ImportError as exc:
        reason = f"{exc.name or exc} is not installed"
        log.info("no browser UI: %s", reason)
    else:
        try:
            web.mount_ui(app, services, cache)
            return
        except Exception:
            log.exception("the browser UI failed to build; serving the API only")
            reason = "it failed to build; see the server log"
    mount_placeholder(app, reason)


def mount_placeholder(app: FastAPI, reason: str) -> None:
    @app.get("/", include_in_schema=False)
    async def ui_missing() -> HTMLResponse:
        return HTMLResponse(UI_MISSING_PAGE.format(reason=reason))


def mcp_session_manager(services: Services) -> McpSessions:
    """The MCP sessions of ``/mcp``. The SDK's own Host/Origin check is off: the server's middleware
    does it for every route; its sessions idle out with the sandbox's TTL."""
    settings = services.settings
    files_url = f"http://{settings.host}:{settings.port}/api/sessions"
    return McpSessions(
        JupyboxMcp(services.service, files_url=files_url), json_response=False, stateless=False,
        session_idle_timeout=settings.sandbox.idle_ttl_s,
        security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        max_request_body_size=BODY_LIMIT, max_sessions=settings.sandbox.max_sessions * 4)


def create_app(services: Services, ui: bool = True) -> FastAPI:
    """The server's app on ``services``; starting the app (its lifespan) starts them. ``ui=False``
    leaves the browser UI out (``/`` then says so): API-only deployments and tests."""

    mcp_sessions = mcp_session_manager(services)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await services.start()
        try:
            async with mcp_sessions.run():  # MCP sessions end (and close their sandboxes) before the service
                yield
        finally:
            await services.stop()

    metrics = Metrics(services.manager, lambda: services.service.llm)
    services.service.observers.append(metrics)  # every turn of every front end is counted
    # No /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a public CDN; the schema stays.
    app = FastAPI(title="jupybox", version="0.1.0", lifespan=lifespan, exception_handlers=error_handlers(metrics),
                  docs_url=None, redoc_url=None,
                  description="A sandboxed code interpreter: sandbox sessions, code execution, workspace files, "
                              "chat turns through the interpreter, and an OpenAI-compatible endpoint.")
    app.state.services = services
    app.state.metrics = metrics

    @app.get("/healthz", tags=["server"], summary="Liveness; open without a token")
    async def healthz() -> dict[str, Any]:
        service = services.service
        return {"status": "loading" if service.model_loading else "ok", "model_available": service.llm is not None,
                "sessions_open": len(services.manager.list())}

    @app.get("/metrics", tags=["server"], summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics(request: Request) -> Response:
        if not caller_of(request).admin:  # counts of everyone's work: for the server's admins
            raise HTTPException(403, "/metrics is for the server's admins: use the API token or an admin's key "
                                     "(`jupybox users add NAME --admin`)")
        return Response(metrics.render(), media_type=metrics.content_type)

    app.include_router(auth.router, tags=["api"])
    app.include_router(api.router, tags=["api"])
    kernels_api.install(app, services.manager, metrics, services.auditor)
    app.include_router(openai_compat.router, tags=["openai"])
    # MCP over streamable HTTP, behind the same middleware as every route (token, Host, Origin, body limits)
    app.router.routes.append(Route("/mcp", StreamableHTTPASGIApp(mcp_sessions), methods=["GET", "POST", "DELETE"]))

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def no_such_route(request: Request, rest: str) -> JSONResponse:
        # Without this, the UI mounted at / would answer unknown API paths with its own 404.
        raise HTTPException(404, f"no route {request.method} {request.url.path}: see /openapi.json")

    # Each one added wraps those before it: the last runs first.
    settings = services.settings
    cache = UploadCache(settings.sandbox.home / "ui", limit_bytes=settings.ui_cache_mb << 20) if ui else None
    if cache is not None:
        app.add_middleware(GradioGate, cache=cache, metrics=metrics)
    app.add_middleware(BodyLimit, upload_limit=settings.upload_limit_mb << 20, metrics=metrics,
                       idle_s=settings.body_idle_s)
    app.add_middleware(auth.Authenticate, token=settings.api_token, keys=services.users, auditor=services.auditor,
                       host=settings.host, metrics=metrics)
    if settings.cors_origins:  # outside the token check: preflights need no token
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(SameOrigin, allowed=settings.cors_origins, metrics=metrics)
    app.add_middleware(SecurityHeaders)
    if cache is not None:
        mount_ui(app, services, cache)
    else:
        mount_placeholder(app, "this server was started without it")
    return app
