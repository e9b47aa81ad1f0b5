"""An OpenAI-compatible chat endpoint whose assistant is the interpreter: any OpenAI client or chat
front-end can use jupybox.

``POST /v1/chat/completions`` takes the last user message as the question. Earlier messages are
passed along as context when the conversation is new to jupybox. Without ``user`` each request
runs in a fresh sandbox session, closed afterwards; with ``user`` the session (variables, files)
and the conversation are kept for that user's next requests.

The assistant's content is the turn written as Markdown, streamed as it happens: the model's prose
token by token, each code cell as a fenced ``python`` block, its output as a plain fenced block,
then the answer. ``stream`` true and false are both supported; usage counts are the model's tokens
for the turn (however it ended), and ``finish_reason`` is ``length`` when the answer was cut at the
model's token limit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from interpreter import Event, InterpreterSettings
from interpreter.formats.base import Format, ProseStream

from .api import SSE_HEADERS, Edge, services_of, sse
from .ownership import caller_of, owned_key

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
    # Clients send many options; the sampling ones below apply to the interpreter's model (each
    # generation, within the server's own maximum of new tokens), the others are accepted and ignored.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="keeps one sandbox session and conversation per user")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1, description="new tokens per generation, at most the server's")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")

    def settings(self, server: InterpreterSettings) -> InterpreterSettings:
        """The server's settings with the sampling this request asks for."""
        asked = self.max_completion_tokens or self.max_tokens
        return replace(server, temperature=server.temperature if self.temperature is None else self.temperature,
                       top_p=self.top_p or server.top_p, seed=server.seed if self.seed is None else self.seed,
                       max_tokens=min(asked, server.max_tokens) if asked else server.max_tokens)


class MarkdownTranscript:
    """Turns interpreter events into assistant content, piece by piece: the model's prose as it
    writes it (through its format's display, so no labels and no code twice), each code cell as a
    fenced ``python`` block, its outputs in a plain fenced block, the cell's notes, the answer."""

    def __init__(self, fmt: Format) -> None:
        self.prose = ProseStream(fmt)
        self.fence_open = False
        self.tail = ""  # the last characters written, to space blocks

    def _emit(self, text: str) -> str:
        self.tail = (self.tail + text)[-2:]
        return text

    def _block(self, text: str) -> str:
        """``text`` as a new block: after a blank line when something came before."""
        if not text:
            return ""
        gap = "" if not self.tail or self.tail == "\n\n" else "\n" if self.tail.endswith("\n") else "\n\n"
        return self._emit(gap + text)

    def _close_fence(self) -> str:
        if not self.fence_open:
            return ""
        self.fence_open = False
        return self._emit(("" if self.tail.endswith("\n") else "\n") + "```\n\n")

    def _end_prose(self) -> str:
        return self._emit(self.prose.end_step())

    def __call__(self, event: Event) -> str:
        if event.type == "text_delta":
            piece = self.prose.feed(event.text or "")
            first = piece and self.prose.shown == piece  # the step's prose begins: a block of its own
            return self._block(piece) if first else self._emit(piece)
        if event.type == "code":
            return self._end_prose() + self._block(f"```python\n{(event.code or '').rstrip()}\n```\n\n")
        if event.type == "output" and event.output is not None:
            text = event.output.plain_text()
            if not text:
                return ""
            opening = "" if self.fence_open else "```\n"
            self.fence_open = True
            return self._emit(opening + text.replace("```", "``\u200b`"))
        if event.type == "execution" and event.execution is not None:
            notes = "".join(f"[{note}]\n" for note in event.execution.notes())
            return self._close_fence() + self._block(notes)
        if event.type == "answer":
            out = self._close_fence() + self._end_prose()
            answer = (event.text or "").strip()
            if answer and answer not in self.prose.last_step:  # a format whose prose does not show it
                out += self._block(answer)
            if event.finish_reason == "length":
                out += self._block("[the answer was cut at the model's token limit]")
            return out
        if event.type in ("error", "notice"):
            label = "stopped" if event.type == "error" else "note"
            return self._close_fence() + self._end_prose() + self._block(f"[{label}: {event.text}]")
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


@router.get("/models", summary="The model this endpoint serves")
async def list_models() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": SERVED_MODEL, "object": "model", "created": 0, "owned_by": "jupybox"}]}


@router.post("/chat/completions", summary="A chat completion whose assistant runs code in a sandbox",
             responses={200: {"content": {"application/json": {}, "text/event-stream": {}}}})
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    service = services_of(request).service
    service.require_model()  # ModelUnavailable (503) before a conversation is made
    _question(body.messages, True)  # 400 before a conversation is made
    caller = caller_of(request)
    # keyed by the caller and the `user` field: two users naming the same `user` share nothing
    key = f"openai:{owned_key(caller, body.user)}" if body.user else f"openai-once:{uuid.uuid4().hex}"
    chat = service.open(key, "openai", caller=caller)
    fresh = not chat.conversation.messages
    try:
        turn = await service.turn(key, "openai", _question(body.messages, fresh), body.settings(service.settings),
                                  close_after=not body.user)
    except BaseException:
        if not body.user:
            await service.close(key)
        raise
    model = body.model or SERVED_MODEL
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    transcript = MarkdownTranscript(turn.format)

    def usage() -> dict[str, int]:
        u = turn.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens}

    if not body.stream:
        content = "".join([transcript(event) async for event in turn.events()])
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": turn.finish_reason or "stop"}],
            "usage": usage(),
        })

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    async def stream() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        async with aclosing(turn.events()) as events:  # a client that leaves stops the turn
            async for event in events:
                if piece := transcript(event):
                    yield chunk({"content": piece})
        yield chunk({}, turn.finish_reason or "stop")
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage()})
        yield sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
