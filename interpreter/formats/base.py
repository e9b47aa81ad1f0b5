"""How code is asked for and found. A format renders the conversation into a generation request
and parses what the model wrote into actions (code to run, or a problem to report back) or an
answer. Formats hold no state: the conversation's messages are the state."""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import ClassVar

from sandbox.models import Execution

from ..llm.base import LLM, Completion, GenerationRequest, Message


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


@dataclass
class GenerationOptions:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None


class Format(abc.ABC):
    name: ClassVar[str]

    def check(self, llm: LLM) -> None:
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

    def observation(self, execution: Execution, text: str) -> str:
        """What the model is told about an execution (``text`` is its budgeted rendering)."""
        if execution.status.value == "ok":
            return text or "(the code ran and printed nothing)"
        return text


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
