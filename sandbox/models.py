"""The result model: what one execution produced, as plain JSON-serialisable dataclasses.

An ``Execution`` holds the kernel's outputs in order, each an ``Output`` carrying the MIME bundle the
kernel sent. Rendering for a model, a browser or a notebook is a function of this one object.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Any, Literal

OutputKind = Literal["stream", "result", "display", "error"]


class ExecutionStatus(str, enum.Enum):
    OK = "ok"
    ERROR = "error"  # the user's code raised
    TIMEOUT = "timeout"  # the time limit ran out; see ``Execution.state_lost``
    CRASHED = "crashed"  # the kernel died (out of memory, exit(), signal); see ``Execution.reason``


@dataclass
class Output:
    """One item a kernel produced.

    ``stream``: ``name`` is stdout or stderr, ``text`` the text. ``result`` / ``display``: ``data`` is
    the MIME bundle (text/plain, text/html, image/png as base64 ...). ``error``: ``ename``, ``evalue``
    and an ANSI-free ``traceback``.
    """

    kind: OutputKind
    name: str | None = None
    text: str | None = None
    data: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    ename: str | None = None
    evalue: str | None = None
    traceback: list[str] | None = None

    @property
    def is_image(self) -> bool:
        return any(m.startswith("image/") for m in self.data or {})

    def plain_text(self) -> str:
        """This output as plain text, the one rendering for models and terminals: a stream's text, a
        result's ``text/plain`` ending in a newline, an error's traceback; "" for images (they are
        files, named by whoever shows them) and bundles with no plain text."""
        if self.kind == "stream":
            return self.text or ""
        if self.kind == "error":
            return "\n".join(self.traceback or [f"{self.ename}: {self.evalue}"]) + "\n"
        if self.data and "text/plain" in self.data and not self.is_image:
            return str(self.data["text/plain"]).rstrip("\n") + "\n"
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Output:
        return cls(**d)


@dataclass
class ImageFile:
    """An image output saved into the workspace; ``path`` is relative to the workspace root."""

    path: str
    mime: str
    size: int


@dataclass
class Execution:
    status: ExecutionStatus
    outputs: list[Output] = field(default_factory=list)
    images: list[ImageFile] = field(default_factory=list)
    execution_count: int | None = None
    duration_s: float = 0.0
    truncated: int = 0  # output bytes dropped to stay within the budget
    state_lost: bool = False  # the kernel was restarted: variables from earlier executions are gone
    reason: str | None = None  # why the status is timeout or crashed, in words
    resumed: str | None = None  # the session was paused and resumed for this run: what came back, in words

    @property
    def ok(self) -> bool:
        return self.status is ExecutionStatus.OK

    @property
    def stdout(self) -> str:
        return "".join(o.text or "" for o in self.outputs if o.kind == "stream" and o.name == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(o.text or "" for o in self.outputs if o.kind == "stream" and o.name == "stderr")

    @property
    def error(self) -> Output | None:
        return next((o for o in self.outputs if o.kind == "error"), None)

    @property
    def results(self) -> list[Output]:
        return [o for o in self.outputs if o.kind in ("result", "display")]

    def notes(self, images: bool = True) -> list[str]:
        """What a person is told under a cell besides its outputs, one sentence each: the images it
        saved (unless the front end shows them itself), why it timed out or crashed (or did not
        run), and how much output was dropped. Every front end renders these, in its own markup."""
        notes = [f"session resumed: {self.resumed}"] if self.resumed else []
        notes += [f"image saved: {img.path}" for img in self.images] if images else []
        if self.reason:
            notes.append(f"{self.status.value}: {self.reason}" if self.status is not ExecutionStatus.OK else self.reason)
        if self.truncated:
            notes.append(f"{self.truncated:,} bytes of output were truncated")
        return notes

    def text(self, budget: int = 4000) -> str:
        """Render for a language model: streams, plain-text results, image paths and the error,
        cut to ``budget`` characters keeping the head and the tail."""
        parts = [f"[the session was paused and resumed on a fresh kernel: {self.resumed}]\n"] if self.resumed else []
        parts += [out.plain_text() for out in self.outputs]
        for img in self.images:
            parts.append(f"![{img.path.rsplit('/', 1)[-1].split('.')[0]}]({img.path})\n")
        if self.reason and (self.status in (ExecutionStatus.TIMEOUT, ExecutionStatus.CRASHED) or self.error is None):
            parts.append(self.reason + "\n")
        return clip(("".join(parts)).strip("\n"), budget)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        d["outputs"] = [o.to_dict() for o in self.outputs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Execution:
        d = dict(d)
        d["status"] = ExecutionStatus(d["status"])
        d["outputs"] = [Output.from_dict(o) for o in d.get("outputs", [])]
        d["images"] = [ImageFile(**i) for i in d.get("images", [])]
        return cls(**d)


def clip(text: str, budget: int, measure: Callable[[str], int] = len) -> str:
    """Keep the head and tail of ``text`` within ``budget`` (characters, or what ``measure``
    counts, e.g. a model's tokens), with one marker saying how many characters were cut: the one
    clipping of what a kernel printed, for every reader (a model, an MCP client, a notebook)."""
    size = measure(text)
    if size <= budget:
        return text
    share = budget / size if measure is len else budget / size * 0.9  # tokens: a margin for uneven text
    keep = max(int(len(text) * share) // 2, 1)
    while True:
        clipped = f"{text[:keep]}\n{clip_marker(len(text) - 2 * keep)}\n{text[-keep:]}"
        if measure is len or keep <= 1 or measure(clipped) <= budget:
            return clipped
        keep = int(keep * 0.8)


def clip_marker(cut: int) -> str:
    """What stands where ``cut`` characters were taken out of the middle of a text."""
    return f"[... {cut} characters truncated ...]"
