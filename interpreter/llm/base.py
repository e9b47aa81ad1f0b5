"""The one protocol every model backend implements: stream text for a prompt or a message list.

A backend says what it can do with class attributes (``supports_prompt`` for raw-text completion,
``supports_chat``, ``supports_tools``, ``supports_images``); formats pick what they need and refuse
clearly otherwise. Backends register in ``interpreter.llm.BACKENDS``.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # as the model wrote it: JSON text, maybe malformed


@dataclass
class Message:
    """A chat message. ``content`` is text, or OpenAI content parts (text and ``image_url``)."""

    role: str  # system | user | assistant | tool
    content: str | list[dict[str, Any]] = ""
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


@dataclass
class GenerationOptions:
    """How to sample: the one definition, which the interpreter's settings, the benchmark's and the
    command line's defaults extend. ``model`` names another model on a server that serves several
    (an OpenAI-compatible one); None is the backend's own."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024  # new tokens per generation
    seed: int | None = None
    model: str | None = None

    def sampling(self) -> dict[str, Any]:
        """These options alone, from an instance of a subclass too."""
        return {f.name: getattr(self, f.name) for f in fields(GenerationOptions)}


@dataclass
class GenerationRequest(GenerationOptions):
    """Either ``prompt`` (raw text, continued as is) or ``messages`` (chat), with the options."""

    prompt: str | None = None
    messages: list[Message] | None = None
    stop: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # OpenAI function-tool schemas

    @classmethod
    def of(cls, options: GenerationOptions, **what: Any) -> GenerationRequest:
        return cls(**options.sampling(), **what)


# Whose generation this is (a user, or one conversation where no user is known): set by the
# conversation service for the turn it runs, read by a backend that serves several generations at
# once, so that one owner's many requests cannot keep everyone else waiting.
GENERATION_OWNER: contextvars.ContextVar[str | None] = contextvars.ContextVar("jupybox_generation_owner", default=None)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class StreamStats:
    """A local model's generations now: ``slots`` decode together, ``active`` hold one, ``queued``
    wait for one; ``tokens`` generated since loading, ``tokens_per_s`` lately."""

    slots: int
    active: int
    queued: int
    tokens: int
    tokens_per_s: float


@dataclass
class Chunk:
    """One streamed piece: a text delta, tool-call fragments, and at the end the finish reason
    and usage when the backend knows them."""

    text: str = ""
    tool_calls: list[ToolCall] | None = None  # complete calls, delivered once assembled
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class Completion:
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)


class LLM(abc.ABC):
    name: ClassVar[str]
    supports_prompt: ClassVar[bool] = False
    supports_chat: ClassVar[bool] = True
    supports_tools: ClassVar[bool] = False
    supports_images: bool = False  # per model, so an instance attribute
    model_family: str = ""  # e.g. "qwen" — formats pick a default from it
    slow_to_load: ClassVar[bool] = False  # ``load`` takes minutes: a server loads it in the background

    async def load(self) -> None:
        """Make the model ready (weights, tokenizer); idempotent. The conversation service calls it
        once before the first turn, and the interpreter before each, since a local model knows its
        ``context_tokens`` only once loaded. A remote model has nothing to load: the default."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest, cancel: asyncio.Event | None = None) -> AsyncIterator[Chunk]:
        """Yield chunks as the model produces them. Generation stops at any of ``request.stop``
        (the stop word is not included), at ``max_tokens``, or when ``cancel`` is set (then
        ``ModelCancelled`` is raised). Raises ``ModelError`` subclasses for backend failures."""

    @property
    def context_tokens(self) -> int | None:
        """The most tokens a prompt and its reply may hold together (None: not known here, as for a
        remote server). Known once a local model is loaded."""
        return None

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in this model's tokenizer (an estimate only where none is known)."""

    async def complete(self, request: GenerationRequest, cancel: asyncio.Event | None = None) -> Completion:
        """The whole completion, for callers that do not stream."""
        out = Completion()
        async for chunk in self.stream(request, cancel):
            out.text += chunk.text
            out.tool_calls.extend(chunk.tool_calls or [])
            out.finish_reason = chunk.finish_reason or out.finish_reason
            if chunk.usage:
                out.usage = chunk.usage
        return out

    def streams(self) -> StreamStats | None:
        """How many generations run and wait now, for a model that schedules its own (the local
        fast path); None for the others (a remote server reports its own)."""
        return None

    async def close(self) -> None:
        """Release connections or GPU memory."""


def model_family(name: str | None) -> str:
    """The family a model name or ``model_type`` says, for the formats' defaults: ``qwen`` (trained
    on ReAct) or ``""``."""
    return "qwen" if "qwen" in (name or "").lower() else ""


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop word, and whether one was found."""
    idx = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(idx)], True) if idx else (text, False)


def held_back(text: str, stop: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop word: a streamer must
    hold them back until the next delta decides."""
    keep = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


class StopCutter:
    """Generated text as it streams, cut at the first stop word. ``add(piece)`` returns the new
    text that is safe to show: never past a stop word, and never a tail that the next piece could
    complete into one (``held_back``). ``rest()`` is what is left to show once the text has ended.
    The one rule every backend streams by."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = stop
        self.text = ""
        self.sent = 0
        self.stopped = False

    @property
    def shown(self) -> str:
        """The text up to the stop word (all of it without one)."""
        return cut_at_stop(self.text, self.stop)[0]

    def add(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut, self.stopped = cut_at_stop(self.text, self.stop)
        end = len(cut) if self.stopped else len(cut) - held_back(cut, self.stop)
        if end <= self.sent:
            return ""
        out, self.sent = cut[self.sent:end], end
        return out

    def rest(self) -> str:
        out = self.shown[self.sent:]
        self.sent += len(out)
        return out
