"""Any OpenAI-compatible server (vLLM, SGLang, DashScope, Ollama, OpenAI) over HTTP, streaming.

Chat requests go to ``/v1/chat/completions``, raw prompts to ``/v1/completions``; both stream as
server-sent events. 429 and 5xx answers are retried with exponential backoff; every request has a
timeout. Stop words are sent to the server *and* enforced here, since not every server honours them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ..errors import ModelCancelled, ModelError, ModelUnavailable
from .base import LLM, Chunk, GenerationRequest, Message, StopCutter, ToolCall, Usage, model_family
from .tokens import token_counter

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}


def message_to_json(m: Message) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                           for c in m.tool_calls]
        d["content"] = m.content or None
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    return d


class OpenAILLM(LLM):
    name = "openai"
    supports_prompt = True
    supports_chat = True
    supports_tools = True

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 120.0, retries: int = 4, backoff: float = 0.5, supports_images: bool = False) -> None:
        self.base_url = (base_url or "http://127.0.0.1:8000/v1").rstrip("/")
        self.model = model or ""
        self.api_key = api_key or "EMPTY"
        self.retries = retries
        self.backoff = backoff
        self.supports_images = supports_images
        self.model_family = model_family(self.model)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0),
                                       headers={"Authorization": f"Bearer {self.api_key}"})
        self._count = token_counter(self.model)

    def count_tokens(self, text: str) -> int:
        return self._count(text)

    async def close(self) -> None:
        await self._http.aclose()

    def _body(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": req.model or self.model, "stream": True, "temperature": req.temperature,
                                "top_p": req.top_p, "max_tokens": req.max_tokens,
                                "stream_options": {"include_usage": True}}
        if req.stop:
            body["stop"] = req.stop[:4]  # OpenAI accepts at most four
        if req.seed is not None:
            body["seed"] = req.seed
        if req.prompt is not None:
            body["prompt"] = req.prompt
            return "/completions", body
        body["messages"] = [message_to_json(m) for m in req.messages or []]
        if req.tools:
            body["tools"] = req.tools
        return "/chat/completions", body

    async def _open(self, path: str, body: dict[str, Any]) -> httpx.Response:
        url = self.base_url + path
        for attempt in range(self.retries + 1):
            try:
                resp = await self._http.send(self._http.build_request("POST", url, json=body), stream=True)
            except httpx.TimeoutException:
                err = f"the model server at {self.base_url} did not answer in time"
            except httpx.TransportError as exc:
                err = f"cannot reach the model server at {self.base_url} ({exc.__class__.__name__}): is it running? Set --openai-base-url"
                if attempt == self.retries:
                    raise ModelUnavailable(err) from None
            else:
                if resp.status_code < 400:
                    return resp
                text = (await resp.aread()).decode(errors="replace")[:500]
                await resp.aclose()
                err = f"the model server answered {resp.status_code}: {text}"
                if resp.status_code not in RETRY_STATUS:
                    raise ModelError(err)
            if attempt < self.retries:
                delay = self.backoff * 2**attempt
                log.info("%s; retrying in %.1f s", err, delay)
                await asyncio.sleep(delay)
        raise ModelError(err + f" (after {self.retries + 1} attempts)")

    async def stream(self, request: GenerationRequest, cancel: asyncio.Event | None = None) -> AsyncIterator[Chunk]:
        path, body = self._body(request)
        resp = await self._open(path, body)
        text, finish, usage = StopCutter(request.stop), None, None
        calls: dict[int, dict[str, str]] = {}
        try:
            async for data in _sse(resp):
                if cancel is not None and cancel.is_set():
                    raise ModelCancelled("generation cancelled")
                if data.get("usage"):
                    u = data["usage"]
                    usage = Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))
                for choice in data.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = text.add(choice.get("text") or delta.get("content") or "")
                    if piece:
                        yield Chunk(text=piece)
                    for tc in delta.get("tool_calls") or []:
                        slot = calls.setdefault(tc.get("index", 0), {"id": "", "name": "", "arguments": ""})
                        slot["id"] = tc.get("id") or slot["id"]
                        fn = tc.get("function") or {}
                        slot["name"] += fn.get("name") or ""
                        slot["arguments"] += fn.get("arguments") or ""
                    finish = choice.get("finish_reason") or finish
                if text.stopped:
                    finish = "stop"
                    break
        finally:
            await resp.aclose()
        tool_calls = [ToolCall(c["id"] or f"call_{i}", c["name"], c["arguments"]) for i, c in sorted(calls.items())]
        yield Chunk(text=text.rest(), tool_calls=tool_calls or None, finish_reason=finish,
                    usage=usage or Usage(0, self.count_tokens(text.shown)))


async def _sse(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent-event stream, until ``[DONE]``."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            raise ModelError(f"the model server sent a malformed event: {payload[:200]}") from None
        if "error" in data:
            raise ModelError(f"the model server reported an error: {data['error']}")
        yield data


__all__ = ["OpenAILLM", "message_to_json"]
