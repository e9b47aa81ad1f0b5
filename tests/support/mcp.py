"""The official MCP SDK's client on a running server's ``/mcp``, and the text of a tool result."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.support.server import API_TOKEN as TOKEN


class HasUrl(Protocol):
    url: str


@asynccontextmanager
async def mcp_client(server: HasUrl | str, token: str | None = TOKEN) -> AsyncIterator[Client]:
    """The SDK's client on ``/mcp`` of a server (or a base URL), with the token as a header."""
    url = server if isinstance(server, str) else server.url
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60, read=300)) as http:
        async with Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
            yield client


def text(result: Any) -> str:
    """The text parts of a tool result, one per line."""
    return "\n".join(c.text for c in result.content if c.type == "text")
