"""The MCP tools jupybox offers: names, argument schemas and descriptions written for a model to use
well, and the checked arguments of a call (a client is hostile like any other)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mcp_types as types

SESSION = {"type": "string", "default": "default", "pattern": "^[A-Za-z0-9_.-]{1,40}$",
           "description": "Which of your sandboxes: each name is its own kernel and workspace, kept across "
                          "calls. Leave it out to use 'default'."}
PATH = {"type": "string", "minLength": 1, "maxLength": 1024,
        "description": "A path inside the workspace, relative to it (the code sees the workspace as /mnt/data, "
                       "its working directory), e.g. 'data.csv' or 'out/chart.png'."}


def _tool(name: str, title: str, description: str, properties: dict[str, Any], required: list[str],
          read_only: bool = False, destructive: bool = False) -> types.Tool:
    return types.Tool(name=name, title=title, description=description,
                      input_schema={"type": "object", "properties": {**properties, "session": SESSION},
                                    "required": required, "additionalProperties": False},
                      annotations=types.ToolAnnotations(title=title, read_only_hint=read_only,
                                                        destructive_hint=destructive, open_world_hint=False))


TOOLS = [
    _tool("run_python", "Run Python",
          "Run Python code in a stateful Jupyter kernel inside a sandbox (no network; pandas, numpy, scipy, "
          "matplotlib, seaborn, scikit-learn, sympy, openpyxl installed). Variables, imports and files persist "
          "across calls in the same session. Returns stdout, stderr, the last expression's value (tables as "
          "text) and plots as images; a failing cell returns its traceback as an error. Long output keeps its "
          "head and tail. Plots: use matplotlib and plt.show(); they are also saved under figures/.",
          {"code": {"type": "string", "minLength": 1, "maxLength": 1_000_000, "description": "The Python code to run."},
           "timeout_s": {"type": "number", "minimum": 1, "maximum": 3600, "default": 60,
                         "description": "Seconds before the code is interrupted (variables are kept); code "
                                        "that ignores the interrupt gets a fresh kernel (variables are lost)."}},
          ["code"]),
    _tool("list_files", "List workspace files",
          "List the files in a session's workspace (uploads and what your code wrote), with their sizes.",
          {}, [], read_only=True),
    _tool("read_file", "Read a workspace file",
          "Read a file from a session's workspace: text comes back as text, other files as base64. Large files "
          "are refused with their size: process them with run_python instead.",
          {"path": PATH}, ["path"], read_only=True),
    _tool("write_file", "Write a workspace file",
          "Create or replace a file in a session's workspace, for your code to read (e.g. a CSV to analyse).",
          {"path": PATH, "content": {"type": "string", "maxLength": 12_000_000, "description": "The file's content."},
           "encoding": {"type": "string", "enum": ["text", "base64"], "default": "text",
                        "description": "'text' (written as UTF-8) or 'base64' for binary content."}},
          ["path", "content"]),
    _tool("restart_session", "Restart the kernel",
          "Give a session a fresh kernel: all variables are lost, the files stay. Use it when the kernel is "
          "stuck or its state is broken.", {}, [], destructive=True),
    _tool("close_session", "Close a session",
          "Close a session: its kernel and all its files are removed. Sessions also close when this MCP "
          "connection ends, or after being idle a while.", {}, [], destructive=True),
    _tool("ask", "Ask the data analyst",
          "Hand a whole question to jupybox's own language model, which writes and runs the code in this "
          "session's sandbox until it can answer. Returns the answer, the cells it ran with their outputs, and "
          "its plots. Use run_python instead when you want to write the code yourself.",
          {"question": {"type": "string", "minLength": 1, "maxLength": 100_000, "description": "The question."},
           "max_executions": {"type": "integer", "minimum": 1, "maximum": 20,
                              "description": "At most this many code runs for the answer (default: the server's)."}},
          ["question"]),
]
SCHEMAS = {t.name: t.input_schema for t in TOOLS}


class ToolError(Exception):
    """A tool's refusal, in words for the model (a result with ``isError``, not a protocol error)."""


@dataclass
class ToolArgs:
    """A call's arguments, checked against the tool's schema by hand (types, bounds, no extras)."""

    session: str = "default"
    code: str = ""
    timeout_s: float = 60.0
    path: str = ""
    content: str = ""
    encoding: str = "text"
    question: str = ""
    max_executions: int | None = None

    @classmethod
    def parse(cls, tool: str, arguments: dict[str, Any]) -> ToolArgs:
        schema = SCHEMAS[tool]
        props = schema["properties"]
        problems = [f"unknown argument {k!r}" for k in arguments if k not in props]
        problems += [f"{k!r} is required" for k in schema["required"] if k not in arguments]
        values: dict[str, Any] = {}
        for key, value in arguments.items():
            spec = props.get(key)
            if spec is None:
                continue
            kind = spec["type"]
            ok = (isinstance(value, str) if kind == "string" else
                  isinstance(value, int) and not isinstance(value, bool) if kind == "integer" else
                  isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                problems.append(f"{key!r} must be a {kind}")
                continue
            if kind == "string":
                if not spec.get("minLength", 0) <= len(value) <= spec.get("maxLength", 1 << 30):
                    problems.append(f"{key!r} must be {spec.get('minLength', 0)} to {spec.get('maxLength')} characters")
                if "enum" in spec and value not in spec["enum"]:
                    problems.append(f"{key!r} must be one of {', '.join(spec['enum'])}")
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    problems.append(f"{key!r} holds an unpaired surrogate: send valid UTF-8")
            elif not spec.get("minimum", float("-inf")) <= value <= spec.get("maximum", float("inf")):
                problems.append(f"{key!r} must be between {spec.get('minimum')} and {spec.get('maximum')}")
            values[key] = value
        if problems:
            raise ToolError(f"bad arguments for {tool}: " + "; ".join(problems))
        return cls(**values)
