"""Bounds on client connections that uvicorn lacks, and the uvicorn configuration that uses them.

uvicorn starts no timer until a first response: a client that opens a connection and sends half a
request head is held for as long as it likes, and so are a thousand such clients. ``BoundedH11``
closes a connection whose request head has not arrived ``header_timeout_s`` after it opened (or
after the previous response; a websocket, once upgraded, is left alone), and closes new
connections on arrival while ``max_connections`` are open. Request bodies that stall are the body limit's business (``ui.middleware.BodyLimit``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class BoundedH11(H11Protocol):
    header_timeout_s: float = 10.0
    max_connections: int = 512

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection from %s: %d are open (max_connections)", self.client, self.max_connections)
            transport.close()
            return
        self._await_head()

    def _await_head(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        if self.transport.get_protocol() is not self:  # upgraded to a websocket: not ours any more
            return
        if self.cycle is None or self.cycle.response_complete:  # no request is being answered
            self.transport.close()

    def handle_websocket_upgrade(self, event: Any) -> None:
        if self._head_timer is not None:  # the head arrived; the websocket has its own pings
            self._head_timer.cancel()
            self._head_timer = None
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._head_timer is not None:
            self._head_timer.cancel()
        if not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)


def uvicorn_config(app: Any, *, host: str, port: int, trusted_proxies: list[str], header_timeout_s: float,
                   max_connections: int, log_level: str = "info") -> uvicorn.Config:
    """How ``jupybox serve`` runs its app: bounded connections, and ``X-Forwarded-*`` headers
    believed from the ``trusted_proxies`` addresses only (none by default; uvicorn's own default
    trusts 127.0.0.1, so any local process could claim HTTPS)."""
    protocol = type("JupyboxH11", (BoundedH11,), {"header_timeout_s": header_timeout_s,
                                                  "max_connections": max_connections})
    return uvicorn.Config(
        app, host=host, port=port, lifespan="on", log_level=log_level, http=protocol,
        proxy_headers=bool(trusted_proxies), forwarded_allow_ips=",".join(trusted_proxies) or "",
        limit_concurrency=max_connections + 16,  # answers 503 past this many requests in flight
        timeout_keep_alive=5, timeout_graceful_shutdown=10,
    )
