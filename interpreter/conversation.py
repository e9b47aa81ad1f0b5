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

from sandbox.models import Execution

from .llm.base import Message, ToolCall


@dataclass
class Cell:
    code: str
    execution: Execution


@dataclass
class Conversation:
    format: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    messages: list[Message] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # workspace names uploaded so far
    timeline: list[tuple[str, str | int]] = field(default_factory=list)  # (question|cell|answer, text or cell index)
    session_id: str | None = None  # the sandbox session; not saved

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> tuple[Conversation, dict[str, bytes]]:
        conv = cls(format=d["format"], id=d["id"], files=list(d.get("files", [])))
        conv.messages = [_message_from(m) for m in d.get("messages", [])]
        conv.cells = [Cell(c["code"], Execution.from_dict(c["execution"])) for c in d.get("cells", [])]
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
