"""A scripted language model behind the real OpenAI-compatible HTTP protocol, on loopback.

The only fake in the test suite, and the model of the benchmarks that measure everything but a model
(``bench.eval.throughput``); both import it from here. Each request pops the next scripted reply
(``default`` once the queue is empty): a string, a function of the request body (so a reply can quote
what the sandbox really printed), a tool call, or an HTTP error. Replies stream as server-sent events
in small pieces, like vLLM; ``stop`` is honoured. Every request body is kept in ``history``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = str | Callable[[dict[str, Any]], "str | ToolCalls"]


@dataclass
class ToolCalls:
    calls: list[tuple[str, str]]  # (name, arguments text)
    text: str = ""


@dataclass
class HttpError:
    status: int
    body: str = '{"error": {"message": "scripted failure"}}'


@dataclass
class Slow:
    """Stream ``text`` slowly: ``delay`` seconds between pieces (to test cancellation)."""

    text: str
    delay: float = 0.2


@dataclass
class Truncated:
    """``text`` that ends because the model hit its token limit (``finish_reason`` length)."""

    text: str


@dataclass
class ScriptedModel:
    replies: deque = field(default_factory=deque)
    history: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    url: str = ""
    default: Any = None  # the reply when the queue is empty (e.g. a dispatcher function of the body)
    _server: ThreadingHTTPServer | None = None

    def enqueue(self, *replies: Any) -> None:
        self.replies.extend(replies)

    def last_prompt(self) -> str:
        return prompt_text(self.history[-1])

    def start(self) -> ScriptedModel:
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model.history.append(body)
                model.paths.append(self.path)
                reply = model.replies.popleft() if model.replies else model.default
                if reply is None:
                    reply = "Final Answer: (script exhausted)"
                if callable(reply):
                    reply = reply(body)
                if isinstance(reply, HttpError):
                    data = reply.body.encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self._stream(body, reply)

            def _stream(self, body: dict[str, Any], reply: Any) -> None:
                chat = self.path.endswith("/chat/completions")
                delay = reply.delay if isinstance(reply, Slow) else 0.0
                text = reply.text if isinstance(reply, (Slow, ToolCalls, Truncated)) else str(reply)
                finish = "length" if isinstance(reply, Truncated) else "stop"
                for stop in body.get("stop") or []:
                    i = text.find(stop)
                    if i >= 0:
                        text = text[:i]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for i in range(0, len(text), 7):
                        piece = text[i:i + 7]
                        self._event({"choices": [{"index": 0, "delta": {"content": piece}} if chat
                                                 else {"index": 0, "text": piece}]})
                        if delay:
                            time.sleep(delay)
                    if isinstance(reply, ToolCalls):
                        finish = "tool_calls"
                        for n, (name, args) in enumerate(reply.calls):
                            half = len(args) // 2  # arguments arrive in fragments, as from real servers
                            self._event({"choices": [{"index": 0, "delta": {"tool_calls": [
                                {"index": n, "id": f"call_{len(model.history)}_{n}", "type": "function",
                                 "function": {"name": name, "arguments": args[:half]}}]}}]})
                            self._event({"choices": [{"index": 0, "delta": {"tool_calls": [
                                {"index": n, "function": {"arguments": args[half:]}}]}}]})
                    self._event({"choices": [{"index": 0, "finish_reason": finish, "delta": {}}]})
                    self._event({"choices": [], "usage": {"prompt_tokens": len(json.dumps(body)) // 4,
                                                          "completion_tokens": max(len(text) // 4, 1)}})
                    self._raw(b"data: [DONE]\n\n")
                    self._raw(b"")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _event(self, data: dict[str, Any]) -> None:
                self._raw(f"data: {json.dumps(data)}\n\n".encode())

            def _raw(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that closes the stream early (it saw its stop word) is normal


def prompt_text(body: dict[str, Any]) -> str:
    """Everything the model was shown, as one string."""
    if "prompt" in body:
        return body["prompt"]
    parts = []
    for m in body.get("messages", []):
        c = m.get("content") or ""
        parts.append(c if isinstance(c, str) else " ".join(p.get("text", "") for p in c))
    return "\n".join(parts)


def last_observation(body: dict[str, Any]) -> str:
    """What the sandbox printed last, as the model sees it (any format)."""
    if "prompt" in body:
        return body["prompt"].rsplit("Observation:", 1)[-1].rsplit("Thought:", 1)[0].strip()
    last = body["messages"][-1]
    content = last.get("content") or ""
    text = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
    return re.sub(r"^Output( of block \d+)?:\n", "", text).strip()


def scripted_settings(model: ScriptedModel, fmt: str | None = "fenced") -> Any:
    """The ``ModelSettings`` of a server or terminal that talks to ``model``."""
    from interpreter import ModelSettings

    return ModelSettings(openai_base_url=model.url, openai_model="scripted-model", format=fmt)
