"""Prompt formats, by name."""

from __future__ import annotations

from ..errors import FormatError
from ..llm.base import LLM, model_family
from .base import Action, Format, Step
from .fenced import FencedFormat
from .react import ReactFormat
from .tools import ToolsFormat

FORMATS: dict[str, type[Format]] = {"react": ReactFormat, "fenced": FencedFormat, "tools": ToolsFormat}


def get_format(name: str | None, llm: LLM | type[LLM], model: str | None = None) -> Format:
    """The named format, or the default for this backend and model family (of ``model``, a name
    the request asks for, else the backend's own): Qwen models answer in ReAct (what they were
    trained on) where a raw prompt is possible; other chat servers get tool calls when they have
    them, else fenced blocks. Checked against the backend's class attributes, so a backend class
    can be checked before its model loads."""
    if not name:
        family = model_family(model) if model else llm.model_family
        if family == "qwen" and llm.supports_prompt:
            name = "react"
        elif llm.supports_tools:
            name = "tools"
        else:
            name = "fenced" if llm.supports_chat else "react"
    try:
        fmt = FORMATS[name]()
    except KeyError:
        raise FormatError(f"unknown format {name!r}: choose one of {', '.join(FORMATS)}") from None
    fmt.check(llm)
    return fmt


__all__ = ["FORMATS", "Action", "Format", "Step", "get_format"]
