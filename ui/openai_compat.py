"""An OpenAI-compatible chat endpoint whose assistant is the interpreter: any OpenAI client or chat
front-end can use jupybox.

``POST /v1/chat/completions`` takes the last user message as the question. Earlier messages are
passed along as context when the conversation is new to jupybox. Without ``user`` each request
runs in a fresh sandbox session, closed afterwards; with ``user`` the session (variables, files)
and the conversation are kept for that user's next requests.

The assistant's content is the turn written as Markdown: each code cell as a fenced ``python``
block, its output as a plain fenced block (streamed as it arrives), then the answer. ``stream``
true and false are both supported; usage counts are the model's tokens for the turn.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from interpreter import Event
from sandbox import SessionClosed

from .api import SSE_HEADERS, ChatTurn, Edge, metrics_of, services_of, sse
from .metrics import Metrics
from .services import Services

router = APIRouter(prefix="/v1")
SERVED_MODEL = "jupybox"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls ... are accepted and ignored

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(Edge):
    # Clients send many sampling options; they are accepted, and the server's settings apply.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="keeps one sandbox session and conversation per user")


class MarkdownTranscript:
    """Turns interpreter events into assistant content, piece by piece."""

    def __init__(self) -> None:
        self.fence_open = False
        self.at_line_start = True
        self.written = False

    def _emit(self, text: str) -> str:
        if text:
            self.at_line_start = text.endswith("\n")
            self.written = True
        return text

    def _close_fence(self) -> str:
        if not self.fence_open:
            return ""
        self.fence_open = False
        return ("" if self.at_line_start else "\n") + "```\n\n"

    def __call__(self, event: Event) -> str:
        if event.type == "code":
            gap = "" if not self.written else ("" if self.at_line_start else "\n")
            return self._emit(self._close_fence() + gap + f"```python\n{(event.code or '').rstrip()}\n```\n\n")
        if event.type == "output" and event.output is not None:
            text = event.output.plain_text()
            if not text:
                return ""
            opening = "" if self.fence_open else "```\n"
            self.fence_open = True
            return self._emit(opening + text.replace("```", "``\u200b`"))
        if event.type == "execution" and event.execution is not None:
            ex = event.execution
            notes = [f"[image: {img.path}]\n" for img in ex.images]
            if ex.reason:
                notes.append(f"[{ex.status.value}: {ex.reason}]\n")
            if ex.truncated:
                notes.append(f"[{ex.truncated:,} bytes of output were truncated]\n")
            return self._emit(self._close_fence() + "".join(notes) + ("\n" if notes else ""))
        if event.type == "answer":
            return self._emit(self._close_fence() + (event.text or ""))
        if event.type == "error":
            return self._emit(self._close_fence() + f"[stopped: {event.text}]")
        return ""


def _question(messages: list[ChatMessage], fresh: bool) -> str:
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None or not messages[last].text().strip():
        raise HTTPException(400, "messages must include a user message with text")
    question = messages[last].text()
    if not fresh:  # the kept conversation already holds the earlier turns
        return question
    context = [f"{m.role.capitalize()}: {m.text()}" for m in messages[:last] if m.text().strip()]
    if not context:
        return question
    return "Earlier in this conversation:\n" + "\n\n".join(context) + f"\n\nThe question now:\n{question}"


async def _session_for(services: Services, metrics: Metrics, user: str | None) -> tuple[str, bool]:
    """(session id, whether it is new) — the user's kept session, or a fresh one."""
    if user and user in services.user_sessions:
        sid = services.user_sessions[user]
        try:
            services.session(sid)
            return sid, sid not in services.conversations
        except SessionClosed:  # reaped: start again
            services.user_sessions.pop(user, None)
    session = await services.create_session()
    metrics.sessions_created.inc()
    if user:
        services.user_sessions[user] = session.id
    return session.id, True


async def _close_after(services: Services, turn: ChatTurn, session_id: str) -> None:
    try:
        await turn.task
    finally:
        try:
            await services.close_session(session_id)
        except Exception:  # noqa: BLE001 - already closed (reaped, or the server is stopping)
            pass


@router.get("/models", summary="The model this endpoint serves")
async def list_models() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": SERVED_MODEL, "object": "model", "created": 0, "owned_by": "jupybox"}]}


@router.post("/chat/completions", summary="A chat completion whose assistant runs code in a sandbox",
             responses={200: {"content": {"application/json": {}, "text/event-stream": {}}}})
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    services, metrics = services_of(request), metrics_of(request)
    services.interpreter()  # ModelUnavailable (503) before a session is made
    _question(body.messages, True)  # 400 before a session is made
    session_id, fresh = await _session_for(services, metrics, body.user)
    try:
        turn = ChatTurn(services, metrics, session_id, _question(body.messages, fresh), "openai")
    except BaseException:
        if not body.user:
            await services.close_session(session_id)
        raise
    if not body.user:
        services.spawn(_close_after(services, turn, session_id))
    model = body.model or SERVED_MODEL
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    transcript = MarkdownTranscript()
    usage: dict[str, int] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def note_usage(event: Event) -> None:
        if event.type == "usage" and event.data:
            usage["prompt_tokens"] += int(event.data.get("prompt_tokens") or 0)
            usage["completion_tokens"] += int(event.data.get("completion_tokens") or 0)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]

    if not body.stream:
        content = ""
        async for event in turn.events():
            note_usage(event)
            content += transcript(event)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": usage,
        })

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    async def stream() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        async for event in turn.events():
            note_usage(event)
            if piece := transcript(event):
                yield chunk({"content": piece})
        yield chunk({}, "stop")
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage})
        yield sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
