"""A conversation: its messages (the format's state), the code cells it ran with their
executions, and the files it uploaded. Saved and reloaded as JSON; exported as a notebook."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from sandbox.models import Execution, clip

from .llm.base import Message, ToolCall


# what a conversation keeps of its cells' outputs (images are saved in the workspace as well):
# past it, the oldest cells keep their plain text only (``slim``), so a long session cannot grow
# the server's memory without bound
KEPT_OUTPUT_BYTES = 32 << 20
SLIM_TEXT_CHARS = 2000
# an output's metadata key in a record: the image MIME types left out of it (its text stands in)
IMAGE_LEFT_OUT = "jupybox/image-left-out"


@dataclass
class Cell:
    code: str
    execution: Execution

    def output_bytes(self) -> int:
        """Roughly what its outputs hold in memory: text and MIME bundles."""
        total = 0
        for out in self.execution.outputs:
            total += len(out.text or "") + sum(len(t) for t in out.traceback or [])
            total += sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for v in (out.data or {}).values())
        return total

    def slim(self) -> None:
        """Keep only each output's plain text, cut to ``SLIM_TEXT_CHARS``, with a note where more
        was there: the rich representations (images, HTML) are dropped."""
        for out in self.execution.outputs:
            if out.data:
                plain = out.data.get("text/plain")
                dropped = [m for m in out.data if m != "text/plain"]
                out.data = {"text/plain": clip(str(plain), SLIM_TEXT_CHARS)} if plain is not None else {}
                if dropped:
                    out.data["text/plain"] = out.data.get("text/plain", "") + f"[{', '.join(dropped)} not kept]"
            if out.text:
                out.text = clip(out.text, SLIM_TEXT_CHARS)
            if out.traceback:
                out.traceback = clip("\n".join(out.traceback), SLIM_TEXT_CHARS).split("\n")


@dataclass
class Conversation:
    format: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    messages: list[Message] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # workspace names uploaded so far
    timeline: list[tuple[str, str | int]] = field(default_factory=list)  # (question|cell|answer, text or cell index)
    session_id: str | None = None  # the sandbox session; not saved
    _kept: int = field(default=0, init=False, repr=False, compare=False)  # output bytes of the cells not slimmed
    _slimmed: int = field(default=0, init=False, repr=False, compare=False)  # cells[:_slimmed] are slimmed

    def add_cell(self, cell: Cell) -> int:
        """Append a cell (its index); past ``KEPT_OUTPUT_BYTES`` of outputs, the oldest cells are
        slimmed to their plain text (never the new one, which its callers are still given whole)."""
        self.cells.append(cell)
        self._kept += cell.output_bytes()
        while self._kept > KEPT_OUTPUT_BYTES and self._slimmed < len(self.cells) - 1:
            old = self.cells[self._slimmed]
            before = old.output_bytes()
            old.slim()
            self._kept -= before
            self._slimmed += 1
        return len(self.cells) - 1

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self, file_bytes: dict[str, bytes] | None = None) -> dict[str, Any]:
        return {
            "version": 1, "id": self.id, "format": self.format,
            "messages": [_message_dict(m) for m in self.messages],
            "cells": [{"code": c.code, "execution": c.execution.to_dict()} for c in self.cells],
            "files": self.files,
            "timeline": [list(t) for t in self.timeline],
            "file_data": {k: base64.b64encode(v).decode() for k, v in (file_bytes or {}).items()},
        }

    def to_record(self) -> dict[str, Any]:
        """``to_dict`` as the session's record keeps it, written after each turn: images are
        left out of the outputs (each was saved in the workspace, and the execution names its
        file), so the record stays small however many charts the session drew. Such an output is
        marked (``IMAGE_LEFT_OUT`` in its metadata), so that whoever shows it again knows its text
        stands in for an image."""
        d = self.to_dict()
        for cell in d["cells"]:
            for out in cell["execution"]["outputs"]:
                data = out.get("data") or {}
                images = [m for m in data if m.startswith("image/")]
                for mime in images:
                    del data[mime]
                if images:
                    out["metadata"] = {**(out.get("metadata") or {}), IMAGE_LEFT_OUT: images}
                if images and "text/plain" not in data:
                    data["text/plain"] = "[an image, saved in the workspace]"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> tuple[Conversation, dict[str, bytes]]:
        conv = cls(format=d["format"], id=d["id"], files=list(d.get("files", [])))
        conv.messages = [_message_from(m) for m in d.get("messages", [])]
        for c in d.get("cells", []):
            conv.add_cell(Cell(c["code"], Execution.from_dict(c["execution"])))
        conv.timeline = [(k, v) for k, v in d.get("timeline", [])]
        data = {k: base64.b64decode(v) for k, v in d.get("file_data", {}).items()}
        return conv, data

    def save(self, path: Path, file_bytes: dict[str, bytes] | None = None) -> None:
        path.write_text(json.dumps(self.to_dict(file_bytes), ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> tuple[Conversation, dict[str, bytes]]:
        return cls.from_dict(json.loads(path.read_text()))

    # -- notebook ----------------------------------------------------------------------------
    def to_notebook(self) -> nbformat.NotebookNode:
        """Questions and answers as markdown, code cells with their outputs (images included), in
        the order they happened."""
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        for kind, value in self.timeline:
            if kind == "question":
                nb.cells.append(nbformat.v4.new_markdown_cell(f"**Question:** {value}"))
            elif kind == "answer":
                nb.cells.append(nbformat.v4.new_markdown_cell(str(value)))
            elif kind == "cell":
                nb.cells.append(_code_cell(self.cells[int(value)]))
        return nb


def _code_cell(cell: Cell) -> nbformat.NotebookNode:
    outputs = []
    for o in cell.execution.outputs:
        if o.kind == "stream":
            outputs.append(nbformat.v4.new_output("stream", name=o.name, text=o.text))
        elif o.kind == "result":
            outputs.append(nbformat.v4.new_output("execute_result", data=o.data, metadata=o.metadata or {},
                                                  execution_count=cell.execution.execution_count))
        elif o.kind == "display":
            outputs.append(nbformat.v4.new_output("display_data", data=o.data, metadata=o.metadata or {}))
        elif o.kind == "error":
            outputs.append(nbformat.v4.new_output("error", ename=o.ename, evalue=o.evalue, traceback=o.traceback or []))
    return nbformat.v4.new_code_cell(cell.code, outputs=outputs, execution_count=cell.execution.execution_count)


def _message_dict(m: Message) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls]
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    return d


def _message_from(d: dict[str, Any]) -> Message:
    calls = [ToolCall(**c) for c in d.get("tool_calls") or []] or None
    return Message(d["role"], d.get("content") or "", tool_calls=calls, tool_call_id=d.get("tool_call_id"))
