"""Server-sent events as a client reads them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


def sse_events(response: httpx.Response) -> Iterator[Any]:
    """Each ``data:`` line of a streamed response, parsed as JSON (``"[DONE]"`` as the string)."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)
