"""``jupybox serve``: flags and environment → ``ServeSettings`` → one uvicorn server.

Every flag has an environment variable (flags win): ``JUPYBOX_HOST``, ``JUPYBOX_PORT``,
``JUPYBOX_API_TOKEN`` (or ``JUPYBOX_API_TOKEN_FILE``), ``JUPYBOX_AUDIT_LOG``, ``JUPYBOX_CORS_ORIGINS`` and
``JUPYBOX_TRUSTED_PROXIES`` (comma-separated), ``JUPYBOX_MAX_CONNECTIONS``,
``JUPYBOX_UPLOAD_LIMIT_MB``, ``JUPYBOX_MODEL``, ``OPENAI_BASE_URL`` / ``OPENAI_MODEL`` /
``OPENAI_API_KEY``, and the sandbox's ``JUPYBOX_BACKEND``, ``JUPYBOX_POOL_SIZE``,
``JUPYBOX_MEMORY_MB``, ``JUPYBOX_CPUS``, ``JUPYBOX_PIDS``, ``JUPYBOX_MAX_SESSIONS``,
``JUPYBOX_IDLE_TTL``, ``JUPYBOX_MEMORY_BUDGET_MB``.

With no flags it binds 127.0.0.1:7860 and targets Qwen-7B-Chat-Int4 through transformers; when
that model cannot load, the server starts anyway, code execution works, and the log (and
``/api/status``, and every chat request) says what to configure.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from dataclasses import replace
from urllib.parse import unquote_plus

from interpreter import ModelSettings, get_format
from sandbox import SandboxSettings
from store import StoreError

from .services import ServeSettings, Services
from .flags import add_model_flags, interpreter_settings

log = logging.getLogger("jupybox.serve")


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The serve subcommand's own flags; the caller adds the model and sandbox backend flags."""
    p.add_argument("--host", help="address to bind (default 127.0.0.1; env JUPYBOX_HOST)")
    p.add_argument("--port", type=int, help="port (default 7860; env JUPYBOX_PORT)")
    p.add_argument("--api-token", help="require this token on every request but /healthz; other local users "
                   "see it in `ps`: prefer --api-token-file or JUPYBOX_API_TOKEN")
    p.add_argument("--api-token-file", help="read the API token from this file's first line (env JUPYBOX_API_TOKEN_FILE)")
    p.add_argument("--audit-log", help="the audit log file (default JUPYBOX_HOME/audit.jsonl; env JUPYBOX_AUDIT_LOG)")
    p.add_argument("--audit-code", action="store_true", default=None,
                   help="the audit log keeps the code each execute runs (by default only its sha256 and length)")
    p.add_argument("--cors-origin", action="append", dest="cors_origins",
                   help="allow pages of this origin to call the server (repeatable; by default only the server's own)")
    p.add_argument("--trusted-proxy", action="append", dest="trusted_proxies",
                   help="believe X-Forwarded-Proto/-For from this address, a reverse proxy's (repeatable; none by default)")
    p.add_argument("--max-connections", type=int, help="open client connections at most (default 512)")
    p.add_argument("--upload-limit-mb", type=int,
                   help="largest upload request (default 100; env JUPYBOX_UPLOAD_LIMIT_MB)")
    g = p.add_argument_group("sandbox limits")
    g.add_argument("--pool-size", type=int, help="warm sessions kept ready (default 0; env JUPYBOX_POOL_SIZE)")
    g.add_argument("--max-sessions", type=int, help="open sessions at most (default 64; env JUPYBOX_MAX_SESSIONS)")
    g.add_argument("--idle-ttl", type=float,
                   help="pause sessions idle this many seconds: variables saved, container removed, files kept "
                        "(default 1800; env JUPYBOX_IDLE_TTL)")
    g.add_argument("--retain-days", type=float,
                   help="delete paused sessions, files and all, unused this many days (default 7; env JUPYBOX_RETAIN_DAYS)")
    g.add_argument("--durable", action=argparse.BooleanOptionalAction, default=None,
                   help="sessions outlive the server: kept as records, paused at shutdown and when idle, "
                        "resumed on their next use (default on; --no-durable: they end with the server and "
                        "idle ones are closed; env JUPYBOX_DURABLE=0)")
    g.add_argument("--memory-mb", type=int, help="memory per session (default 1024; env JUPYBOX_MEMORY_MB)")
    g.add_argument("--cpus", type=float, help="CPUs per session (default 1; env JUPYBOX_CPUS)")
    g.add_argument("--pids", type=int, help="processes per session (default 256; env JUPYBOX_PIDS)")
    g.add_argument("--memory-budget-mb", type=int, help="what all sessions' memory limits may add up to "
                   "(default: 90%% of this host's memory; env JUPYBOX_MEMORY_BUDGET_MB)")
    g.add_argument("--exec-timeout", type=float, help="default seconds per /execute call (default 30)")
    add_model_flags(p)


def sandbox_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The sandbox settings serve's flags set, for ``SandboxSettings.from_env``."""
    durable = args.durable
    if durable is None and not os.environ.get("JUPYBOX_DURABLE"):
        durable = True  # the server's default; other commands' sessions end with them
    return {"pool_size": args.pool_size, "max_sessions": args.max_sessions, "idle_ttl_s": args.idle_ttl,
            "default_timeout_s": args.exec_timeout, "memory_budget_mb": args.memory_budget_mb,
            "retain_days": args.retain_days, "durable": durable}


def serve_settings(args: argparse.Namespace, sandbox: SandboxSettings) -> ServeSettings:
    limits = {k: v for k, v in (("memory_mb", args.memory_mb), ("cpus", args.cpus), ("pids", args.pids)) if v}
    if limits:
        sandbox = replace(sandbox, limits=replace(sandbox.limits, **limits))
    if args.api_token:
        log.warning("the API token was given on the command line, where other users of this host can read it "
                    "(`ps`): use --api-token-file or JUPYBOX_API_TOKEN instead")
    return ServeSettings.from_env(
        host=args.host, port=args.port, api_token=args.api_token, api_token_file=args.api_token_file,
        cors_origins=args.cors_origins, trusted_proxies=args.trusted_proxies, max_connections=args.max_connections,
        upload_limit_mb=args.upload_limit_mb, audit_log=args.audit_log, audit_code=args.audit_code,
        model=ModelSettings.from_args(args),
        sandbox=sandbox, interpreter=interpreter_settings(args),
    )


def redact_token(target: str) -> str:
    """A request target with the value of every query parameter named ``token`` hidden, however
    its name is spelled (``%74oken`` is ``token`` to the server's parser, so it is here too)."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    pieces = []
    for piece in query.split("&"):
        name = piece.split("=", 1)[0]
        pieces.append(f"{name}=[redacted]" if unquote_plus(name).strip().lower() == "token" else piece)
    return f"{path}?{'&'.join(pieces)}"


class RedactToken(logging.Filter):
    """Hides the value of ``token=`` in uvicorn's access log lines: the UI's entry URL
    (``/?token=...``) carries the API token once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_token(a) if isinstance(a, str) else a for a in record.args)
        return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve(args: argparse.Namespace, sandbox: SandboxSettings) -> int:
    """Run until SIGINT or SIGTERM; on the way out every sandbox session is closed."""
    import uvicorn

    from .app import create_app
    from .connections import uvicorn_config

    settings = serve_settings(args, sandbox)
    if settings.model.format:
        get_format(settings.model.format, settings.model.backend_class())  # FormatError before anything starts
    services = Services(settings)
    try:
        users = services.users.has_users()
    except StoreError as exc:
        log.error("%s; until it is fixed every key but the API token is refused", exc)
        users = True
    if not _is_loopback(settings.host) and not settings.api_token and not users:
        log.warning("serving on %s without users or an API token: anyone who can reach it can run code here. "
                    "Add a user (`jupybox users add NAME`) or set JUPYBOX_API_TOKEN.", settings.host)
    config = uvicorn_config(create_app(services), host=settings.host, port=settings.port,
                            trusted_proxies=settings.trusted_proxies, header_timeout_s=settings.header_timeout_s,
                            max_connections=settings.max_connections,
                            log_level="debug" if getattr(args, "debug", False) else "info")
    logging.getLogger("uvicorn.access").addFilter(RedactToken())  # after Config, which sets up logging
    server = uvicorn.Server(config)
    # uvicorn handles SIGINT/SIGTERM itself (a graceful shutdown, then it re-raises the signal):
    # the CLI's handlers would cancel the shutdown half-way, and the re-raised signal must not kill us.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
        signal.signal(sig, lambda *_: None)
    print(f"jupybox: serving on http://{settings.host}:{settings.port} "
          f"(API under /api, its schema at /openapi.json, OpenAI-compatible at /v1)", file=sys.stderr, flush=True)
    await server.serve()
    return 0 if server.started else 1
