"""What the interpreter streams. The browser UI, the HTTP API (as server-sent events) and the CLI
all consume these same events."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from sandbox.models import Execution, Output

from .llm.base import Usage

EventType = Literal["text_delta", "code", "output", "execution", "answer", "error", "usage", "notice"]


@dataclass
class Event:
    """``text_delta``: model text as it streams (``text``). ``code``: a cell about to run (``code``).
    ``output``: one kernel output as it arrives. ``execution``: the finished ``Execution``.
    ``answer``: the final answer (``text``; ``finish_reason`` is ``stop``, or ``length`` when the
    model was cut at its token limit). ``error``: why the turn stopped early (``text``).
    ``usage``: tokens used this turn (``usage``), sent before the ``answer`` or ``error`` of every
    turn. ``notice``: something the person should know that is not the model's (``text``)."""

    type: EventType
    text: str | None = None
    code: str | None = None
    output: Output | None = None
    execution: Execution | None = None
    usage: Usage | None = None
    finish_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The event on the wire (the HTTP API's server-sent events, ``jupybox ask --json``): a
        usage or a finish reason travels as ``data``, as it always has."""
        d: dict[str, Any] = {"type": self.type}
        for key in ("text", "code"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.usage is not None:
            d["data"] = asdict(self.usage)
        elif self.finish_reason is not None:
            d["data"] = {"finish_reason": self.finish_reason}
        if self.output is not None:
            d["output"] = self.output.to_dict()
        if self.execution is not None:
            d["execution"] = self.execution.to_dict()
        return d
