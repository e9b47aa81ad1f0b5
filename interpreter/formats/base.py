"""How code is asked for and found. A format renders the conversation into a generation request
and parses what the model wrote into actions (code to run, or a problem to report back) or an
answer. Formats hold no state: the conversation's messages are the state."""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import ClassVar

from sandbox.models import Execution

from ..llm.base import LLM, Completion, GenerationOptions, GenerationRequest, Message


@dataclass
class Action:
    """One thing the model asked for: ``code`` to run, or a ``problem`` to tell it about (a
    malformed tool call, a block in a language the sandbox does not run)."""

    code: str | None = None
    problem: str | None = None
    call_id: str | None = None


@dataclass
class Step:
    text: str  # what the model wrote
    actions: list[Action] = field(default_factory=list)
    answer: str | None = None  # set when the model answered instead of acting
    tool_calls: list = field(default_factory=list)


PACKAGE_NAMES_CHARS = 1200  # about 300 tokens of names that %pip install can add


def packages_note(importable: list[str], installable: list[str]) -> str:
    """What the model is told about packages, so it stops guessing: what imports as it is, and what
    ``%pip install`` can add from the server's wheelhouse (names cut to ``PACKAGE_NAMES_CHARS``)."""
    note = f"Python packages: {', '.join(importable)} and the standard library are importable."
    if not installable:
        return note + " Nothing else can be installed: the sandbox has no network."
    names, used = [], 0
    for name in installable:
        if used + len(name) + 2 > PACKAGE_NAMES_CHARS:
            names.append(f"and {len(installable) - len(names)} more")
            break
        names.append(name)
        used += len(name) + 2
    return (note + " The sandbox has no network; `%pip install NAME` installs from the server's own set only, "
            f"which holds: {', '.join(names)}.")


class Format(abc.ABC):
    name: ClassVar[str]
    #: what imports and what ``%pip install`` can add on this server: (importable, installable) names,
    #: set by whoever starts the turn; ``packages`` puts it into the system prompt
    listing: tuple[list[str], list[str]] | None = None

    @property
    def packages(self) -> str:
        """The system prompt's note on packages (``packages_note``), or nothing where unknown."""
        return packages_note(*self.listing) if self.listing is not None else ""

    def check(self, llm: LLM | type[LLM]) -> None:
        """Raise ``FormatError`` when ``llm`` cannot serve this format."""

    @abc.abstractmethod
    def add_user(self, messages: list[Message], question: str, files: list[str]) -> None:
        """Append the user's turn, announcing newly uploaded ``files`` (workspace names)."""

    @abc.abstractmethod
    def request(self, messages: list[Message], options: GenerationOptions) -> GenerationRequest:
        """The next generation request for the conversation so far."""

    @abc.abstractmethod
    def parse(self, completion: Completion) -> Step:
        """Find code (or the answer) in what the model wrote."""

    @abc.abstractmethod
    def add_step(self, messages: list[Message], step: Step, observations: list[str]) -> None:
        """Record the model's step and one observation per action."""

    @abc.abstractmethod
    def add_answer(self, messages: list[Message], step: Step) -> None:
        """Record the model's final message of the turn."""

    def add_images(self, messages: list[Message], data_urls: list[str]) -> None:
        """Show the step's images to a model that accepts them (``image_url`` parts in a user
        message). Formats that continue a raw prompt cannot, and keep only the paths."""

    def display(self, text: str, final: bool = True) -> str:
        """What a person is shown of a step's text: the model's prose, without the code it asked to
        run (that is shown as a cell) and without the format's labels. With ``final`` False the
        text may still grow, and the result must be a prefix of what the longer text gives (a
        label or fence being written is held back). Default: the text as it is."""
        return text.strip()

    def observation(self, execution: Execution, text: str) -> str:
        """What the model is told about an execution (``text`` is its budgeted rendering)."""
        if execution.status.value == "ok":
            return text or "(the code ran and printed nothing)"
        return text


def partial_marker(text: str, markers: tuple[str, ...]) -> bool:
    """Whether the last line of ``text`` could still become one of ``markers`` (it is a prefix)."""
    last = text[text.rfind("\n") + 1:].lstrip(" \t")
    return bool(last) and any(m.startswith(last) for m in markers)


FENCE_LINE_RE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)", re.M)


def hide_code(text: str, final: bool = True) -> str:
    """``text`` without its fenced blocks of Python (those run, and show as cells); blocks in other
    languages stay. With ``final`` False, a block whose opening line is not complete yet is hidden
    too, and so are backticks that may become a fence."""
    parts, pos, start, inside, keep = [], 0, 0, False, True
    for m in FENCE_LINE_RE.finditer(text):
        if not inside:
            line_done = final or "\n" in text[m.end():]
            parts.append(text[pos:m.start()])
            start, inside, keep = m.start(), True, line_done and m.group(1).lower() not in PYTHON_LANGS
        else:
            end = text.find("\n", m.end())
            end = len(text) if end < 0 else end + 1
            if keep:
                parts.append(text[start:end])
            pos, inside = end, False
    if inside:
        if keep:
            parts.append(text[start:])
    else:
        tail = text[pos:]
        if not final and partial_marker(tail, ("```",)):
            tail = tail[:tail.rfind("\n") + 1]
        parts.append(tail)
    return "".join(parts)


class ProseStream:
    """A turn's prose for display as the model writes it: each step's text through its format's
    ``display``, released only where it will not change. ``feed`` each text delta; ``end_step``
    when a code cell or the answer follows (it releases the rest of the step)."""

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt
        self.raw = ""
        self.shown = ""
        self.last_step = ""  # what the step that ended last showed in all

    def feed(self, delta: str) -> str:
        self.raw += delta
        return self._advance(final=False)

    def end_step(self) -> str:
        piece = self._advance(final=True)
        self.last_step, self.raw, self.shown = self.shown, "", ""
        return piece

    def _advance(self, final: bool) -> str:
        text = self.fmt.display(self.raw, final)
        if not text.startswith(self.shown):  # a format whose display is not prefix-stable: wait for the end
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


FENCE_RE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
PYTHON_LANGS = {"python", "py", "python3", "ipython", "ipython3", ""}
OTHER_CODE_LANGS = {"bash", "sh", "shell", "zsh", "console", "javascript", "js", "typescript", "ts", "r", "sql",
                    "ruby", "perl", "julia", "go", "rust", "c", "cpp", "c++", "java", "powershell", "matlab"}


def image_parts(text: str, data_urls: list[str]) -> list[dict]:
    return [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in data_urls]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) for each fenced block, in order; an unclosed last block counts (the model
    may have been stopped right after it)."""
    return [(lang.lower(), code.rstrip()) for lang, code in FENCE_RE.findall(text) if code.strip()]


def announce_files(files: list[str], lang_zh: bool = False) -> str:
    if not files:
        return ""
    names = ", ".join(files)
    return f"[上传文件{names}]" if lang_zh else f"[Upload file {names}]"
