"""How one turn's interpreter events become chat messages for the browser.

A turn shows, in order: the model's prose of each step (its format's ``display``: its thoughts,
without the code it wrote and without labels), each code cell as a collapsible block titled with
its status with the outputs under the code and its notes, the cell's images as their own message
right below (so a chart stays visible when the cell is folded), and the answer. The messages are
plain dicts in the Chatbot's "messages" shape. A conversation reopened from its record is shown by
the same view (``replay``), fed events made from the record's timeline.

Icons are small SVG images inlined as data URLs (the page's policy allows ``data:`` images): emoji
are empty boxes in a browser without an emoji font.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Sequence

from interpreter import Conversation, Event
from interpreter.conversation import IMAGE_LEFT_OUT
from interpreter.formats.base import Format
from sandbox.models import Execution, ExecutionStatus, Output, clip
from store import SessionRecord

TEXT_LIMIT = 20_000  # characters of one cell's text outputs shown in the page
TITLE_CHARS = 60  # of a conversation's first question, in the history's list
SVG_INLINE_BYTES = 2_000_000  # an SVG figure up to this size is shown inline (data URL), else offered as a file
_PATHS = {  # 16x16 strokes, drawn in the icon's colour
    "ok": ("#1a7f37", "M3 8.5l3.2 3.2L13 4.8"),
    "error": ("#cf222e", "M4 4l8 8M12 4l-8 8"),
    "timeout": ("#9a6700", "M8 2.5a5.5 5.5 0 1 0 0.01 0M8 5v3.5l2.5 1.5"),
    "crashed": ("#cf222e", "M9 1.5L4 9h4l-1 5.5L12 7H8z"),
    "running": ("#57606a", "M8 2.5a5.5 5.5 0 1 0 5.5 5.5"),
    "file": ("#57606a", "M10.5 4.5l-5 5a1.8 1.8 0 0 0 2.5 2.5l5.5-5.5a3 3 0 0 0-4.3-4.3L3.7 7.7a4.2 4.2 0 0 0 6 6l4-4"),
    "info": ("#0969da", "M8 2.5a5.5 5.5 0 1 0 0.01 0M8 7.5v4M8 5v0.5"),
    "warning": ("#9a6700", "M8 2L1.5 13.5h13zM8 6.5v3.5M8 11.8v0.4"),
}


def icon(name: str) -> str:
    """Markdown for a small inline SVG icon; CSS sizes ``img[alt^="icon-"]`` to the text."""
    colour, path = _PATHS[name]
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16" width="16" height="16">'
           f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.8" stroke-linecap="round" '
           f'stroke-linejoin="round"/></svg>')
    return f"![icon-{name}](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"


STATUS_TITLES = {
    ExecutionStatus.OK: f"{icon('ok')} Code",
    ExecutionStatus.ERROR: f"{icon('error')} Code (error)",
    ExecutionStatus.TIMEOUT: f"{icon('timeout')} Code (timed out)",
    ExecutionStatus.CRASHED: f"{icon('crashed')} Code (kernel crashed)",
}
ICON_CSS = 'img[alt^="icon-"] { width: 1.05em; height: 1.05em; vertical-align: -0.15em; display: inline; margin: 0; }'


def text(value: str) -> dict[str, str]:
    """A text part; given as a typed dict so the Chatbot keeps the code's indentation as is."""
    return {"type": "text", "text": value}


def file_chip(name: str) -> str:
    return f"{icon('file')} `{name}`"


def question_message(question: str, files: Sequence[str] = ()) -> dict:
    """The person's question as the chat shows it, with a chip for each file sent with it."""
    return {"role": "user", "content": [text(question or "(files)")] + [text(file_chip(f)) for f in files]}


def notice_message(kind: str, words: str) -> dict:
    """A line from jupybox, not the model: ``kind`` is info or warning."""
    return {"role": "assistant", "content": [text(f"{icon(kind)} {words}")]}


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
    if out.is_image or (out.metadata or {}).get(IMAGE_LEFT_OUT):
        return ""  # images are their own message (a record keeps only a stand-in's text)
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
    body = clip(body, TEXT_LIMIT)
    if body:
        parts.append(body)
    if execution is not None:
        parts += [f"*{html.escape(note)}*" for note in execution.notes(images=False)]
    return "\n\n".join(parts)


def figure_content(path: str) -> dict[str, str]:
    """How the chat shows one figure (a served copy's path): the file, or an SVG inline as a
    data-URL image. Gradio serves SVG files as downloads (a file can carry script), so the chat
    would show none; an ``<img>`` never runs an SVG's script. Blocking (reads the copy)."""
    if path.endswith(".svg"):
        with open(path, "rb") as fh:
            data = fh.read(SVG_INLINE_BYTES + 1)
        if len(data) <= SVG_INLINE_BYTES:
            return text(f"![figure](data:image/svg+xml;base64,{base64.b64encode(data).decode()})")
    return {"path": path}


class TurnView:
    """Applies one turn's events to ``history`` (a list of Chatbot message dicts) in place. The
    page's handler adds a cell's images (``show_images``) once it has made them servable."""

    def __init__(self, history: list[dict], fmt: Format | None) -> None:
        self.history = history
        self.fmt = fmt
        self._step_raw = ""
        self._step_at: int | None = None  # index of the message showing the current step's prose
        self._cell_at: int | None = None
        self._code = ""
        self._outputs: list[Output] = []

    def apply(self, event: Event) -> None:
        if event.type == "text_delta":
            self._step_raw += event.text or ""
            self._show_prose(final=False)
        elif event.type == "code":
            self._show_prose(final=True)
            self._step_raw, self._step_at = "", None
            self._code, self._outputs = event.code or "", []
            self.history.append({"role": "assistant", "content": [text(cell_markdown(self._code, [], None))],
                                 "metadata": {"title": f"{icon('running')} Running code…", "status": "pending"}})
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
            self._cell_at = None
        elif event.type == "answer":
            self._step_raw = ""
            answer = (event.text or "").strip() or "(no answer)"
            if event.finish_reason == "length":
                answer += "\n\n*The answer was cut at the model's token limit.*"
            if self._step_at is not None:
                self.history[self._step_at]["content"] = [text(answer)]
            else:
                self.history.append({"role": "assistant", "content": [text(answer)]})
        elif event.type == "error":
            self.history.append(notice_message("warning", event.text or ""))
        elif event.type == "notice":
            self.history.append(notice_message("info", event.text or ""))

    def show_images(self, figures: list[dict]) -> None:
        """A cell's figures, each ``figure_content`` of its served copy."""
        if figures:
            self.history.append({"role": "assistant", "content": figures})

    def _show_prose(self, final: bool) -> None:
        if self.fmt is None or not self._step_raw:
            return
        shown = self.fmt.display(self._step_raw, final)
        if not shown:
            return
        if self._step_at is None:
            self.history.append({"role": "assistant", "content": [text(shown)]})
            self._step_at = len(self.history) - 1
        else:
            self.history[self._step_at]["content"] = [text(shown)]


def replay(conv: Conversation, figures: Callable[[Execution], list[dict]]) -> list[dict]:
    """The chat of a conversation kept in a record: its questions, each cell with its outputs and
    ``figures`` (the chat's content for the images the execution saved), and the answers, in the
    order they happened, through the same ``TurnView`` a live turn goes through. The model's prose
    between cells is not kept, so it is not shown. Blocking where ``figures`` is."""
    history: list[dict] = []
    view = TurnView(history, None)
    for kind, value in conv.timeline:
        if kind == "question":
            history.append(question_message(str(value)))
        elif kind == "answer":
            view.apply(Event("answer", text=str(value), finish_reason="stop"))
        elif kind == "cell" and isinstance(value, int) and 0 <= value < len(conv.cells):
            cell = conv.cells[value]
            view.apply(Event("code", code=cell.code))
            view.apply(Event("execution", execution=cell.execution))
            view.show_images(figures(cell.execution))
    return history


def age(seconds: float) -> str:
    """How long ago, in the largest unit that fits (the page's reader may be in any time zone)."""
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return "just now"


def history_label(record: SessionRecord, now: float) -> str:
    """One earlier conversation in the page's history: its first question (one line, cut), when it
    was last used, and whether its kernel runs or is paused."""
    title = " ".join(record.title.split())
    title = title if len(title) <= TITLE_CHARS else title[:TITLE_CHARS - 1] + "…"
    return f"{title or '(no question yet)'} · {age(now - record.last_used)} · {record.state}"
