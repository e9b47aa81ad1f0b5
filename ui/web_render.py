"""How one turn's interpreter events become chat messages for the browser.

A turn shows, in order: the model's prose of each step (its thoughts, without the code it wrote),
each code cell as a collapsible block titled with its status with the outputs under the code,
the cell's images as their own message right below (so a chart stays visible when the cell is
folded), and the answer. The messages are plain dicts in the Chatbot's "messages" shape.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable

from interpreter import Event
from sandbox.models import Execution, ExecutionStatus, Output

TEXT_LIMIT = 20_000  # characters of one cell's text outputs shown in the page
ACTION_RE = re.compile(r"\n?\s*Action\s*:|\n?\s*Action Input\s*:", re.S)
FENCE_RE = re.compile(r"```[ \t]*(python|py|python3)?[ \t]*\n", re.I)
STATUS_TITLES = {
    ExecutionStatus.OK: "✅ Code",
    ExecutionStatus.ERROR: "❌ Code (error)",
    ExecutionStatus.TIMEOUT: "⏱ Code (timed out)",
    ExecutionStatus.CRASHED: "💥 Code (kernel crashed)",
}


def text(value: str) -> dict[str, str]:
    """A text part; given as a typed dict so the Chatbot keeps the code's indentation as is."""
    return {"type": "text", "text": value}


def prose(raw: str) -> str:
    """What the model wrote in a step, less the code it asked to run (that shows as a cell) and
    the format's labels."""
    cut = [m.start() for m in (ACTION_RE.search(raw), FENCE_RE.search(raw)) if m]
    body = raw[: min(cut)] if cut else raw
    body = re.sub(r"(^|\n)\s*(Thought|Final Answer)\s*:\s*", r"\1", body)
    return body.strip()


def fence(code: str, lang: str = "python") -> str:
    ticks = "````" if "```" in code else "```"
    return f"{ticks}{lang}\n{code.rstrip()}\n{ticks}"


def render_output(out: Output) -> str:
    """One kernel output as markdown: streams and errors as text blocks, tables as HTML."""
    if out.kind == "stream":
        return fence(out.text or "", "text" if out.name != "stderr" else "stderr")
    if out.kind == "error":
        tb = "\n".join(out.traceback or []) or f"{out.ename}: {out.evalue}"
        return fence(tb, "pytb")
    data = out.data or {}
    if out.is_image:
        return ""  # images are their own message
    if "text/html" in data and "<table" in str(data["text/html"]):
        return re.sub(r"<style.*?</style>", "", str(data["text/html"]), flags=re.S)
    if "text/markdown" in data:
        return str(data["text/markdown"])
    if "text/latex" in data:
        return str(data["text/latex"])
    if "text/plain" in data:
        return fence(str(data["text/plain"]), "text")
    return ""


def merge_streams(outputs: list[Output]) -> list[Output]:
    """Consecutive pieces of one stream become one, so a loop's prints form one block."""
    merged: list[Output] = []
    for out in outputs:
        last = merged[-1] if merged else None
        if last and out.kind == "stream" and last.kind == "stream" and last.name == out.name:
            merged[-1] = Output("stream", name=out.name, text=(last.text or "") + (out.text or ""))
        else:
            merged.append(out)
    return merged


def cell_markdown(code: str, outputs: list[Output], execution: Execution | None) -> str:
    parts = [fence(code)]
    body = "\n\n".join(p for p in (render_output(o) for o in merge_streams(outputs)) if p)
    if len(body) > TEXT_LIMIT:
        body = body[: TEXT_LIMIT // 2] + "\n\n*[… output shortened in the page …]*\n\n" + body[-TEXT_LIMIT // 2:]
    if body:
        parts.append(body)
    if execution is not None:
        if execution.reason and execution.status is not ExecutionStatus.OK:
            parts.append(f"*{html.escape(execution.reason)}*")
        if execution.truncated:
            parts.append(f"*{execution.truncated:,} bytes of output were dropped.*")
    return "\n\n".join(parts)


class TurnView:
    """Applies one turn's events to ``history`` (a list of Chatbot message dicts) in place.

    ``image_file`` maps an image's workspace path to a file path the browser may fetch, or None
    when the image cannot be shown.
    """

    def __init__(self, history: list[dict], image_file: Callable[[str], str | None]) -> None:
        self.history = history
        self.image_file = image_file
        self._step_raw = ""
        self._step_at: int | None = None  # index of the message showing the current step's prose
        self._cell_at: int | None = None
        self._code = ""
        self._outputs: list[Output] = []

    def apply(self, event: Event) -> None:
        if event.type == "text_delta":
            self._step_raw += event.text or ""
            self._show_prose()
        elif event.type == "code":
            self._show_prose()
            self._step_raw, self._step_at = "", None
            self._code, self._outputs = event.code or "", []
            self.history.append({"role": "assistant", "content": [text(cell_markdown(self._code, [], None))],
                                 "metadata": {"title": "⏳ Running code…", "status": "pending"}})
            self._cell_at = len(self.history) - 1
        elif event.type == "output" and event.output is not None and self._cell_at is not None:
            self._outputs.append(event.output)
            self.history[self._cell_at]["content"] = [text(cell_markdown(self._code, self._outputs, None))]
        elif event.type == "execution" and event.execution is not None and self._cell_at is not None:
            ex = event.execution
            self.history[self._cell_at] = {
                "role": "assistant", "content": [text(cell_markdown(self._code, ex.outputs, ex))],
                # no "status": the cell stays open (the reader can fold it) and loses its spinner
                "metadata": {"title": STATUS_TITLES[ex.status], "duration": round(ex.duration_s, 2)},
            }
            images = [p for p in (self.image_file(i.path) for i in ex.images) if p]
            if images:
                self.history.append({"role": "assistant", "content": [{"path": p} for p in images]})
            self._cell_at = None
        elif event.type == "answer":
            self._step_raw = ""
            answer = (event.text or "").strip() or "(no answer)"
            if self._step_at is not None:
                self.history[self._step_at]["content"] = [text(answer)]
            else:
                self.history.append({"role": "assistant", "content": [text(answer)]})
        elif event.type == "error":
            self.history.append({"role": "assistant", "content": [text(f"⚠️ {event.text}")]})

    def _show_prose(self) -> None:
        shown = prose(self._step_raw)
        if not shown:
            return
        if self._step_at is None:
            self.history.append({"role": "assistant", "content": [text(shown)]})
            self._step_at = len(self.history) - 1
        else:
            self.history[self._step_at]["content"] = [text(shown)]
