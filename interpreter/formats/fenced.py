"""Fenced blocks, for chat models without tool training: every ```python block in an assistant
message runs, in order; the outputs go back as the next user message; a message with no block is
the answer."""

from __future__ import annotations

from ..llm.base import Completion, GenerationRequest, Message
from .base import (OTHER_CODE_LANGS, PYTHON_LANGS, Action, Format, GenerationOptions, Step, code_blocks, hide_code,
                   image_parts)

SYSTEM = """You are a data analyst with a Python code interpreter (a Jupyter kernel; state persists between \
executions). Every ```python fenced block you write is executed, in order, and its output is sent back to you \
in the next message. Files the user uploads are in the current directory (/mnt/data); save files you create \
there. Use matplotlib for charts (they are shown to the user). Only Python runs. When you have the result, \
answer in plain text without any code block."""


class FencedFormat(Format):
    name = "fenced"
    system = SYSTEM

    def add_user(self, messages: list[Message], question: str, files: list[str]) -> None:
        if not messages:
            messages.append(Message("system", f"{self.system} {self.packages}".strip()))
        note = f"(Uploaded files: {', '.join(files)})\n" if files else ""
        messages.append(Message("user", note + question))

    def request(self, messages: list[Message], options: GenerationOptions) -> GenerationRequest:
        return GenerationRequest.of(options, messages=list(messages))

    def display(self, text: str, final: bool = True) -> str:
        return hide_code(text, final).strip()

    def parse(self, completion: Completion) -> Step:
        blocks = code_blocks(completion.text)
        runnable = [code for lang, code in blocks if lang in PYTHON_LANGS]
        if runnable:
            return Step(completion.text, [Action(code=c) for c in runnable])
        foreign = sorted({lang for lang, _ in blocks if lang in OTHER_CODE_LANGS})
        if foreign:
            langs = ", ".join(f"```{lang}" for lang in foreign)
            return Step(completion.text, [Action(problem=(
                f"Not executed: the sandbox runs Python only, and your message had {langs} blocks. "
                "Rewrite the code in Python (use subprocess for shell commands) in a ```python block."))])
        return Step(completion.text, answer=completion.text.strip())

    def add_step(self, messages: list[Message], step: Step, observations: list[str]) -> None:
        messages.append(Message("assistant", step.text))
        parts = [f"Output of block {i}:\n{obs}" if len(observations) > 1 else f"Output:\n{obs}"
                 for i, obs in enumerate(observations, 1)]
        messages.append(Message("user", "\n\n".join(parts)))

    def add_images(self, messages: list[Message], data_urls: list[str]) -> None:
        messages[-1].content = image_parts(messages[-1].text(), data_urls)

    def add_answer(self, messages: list[Message], step: Step) -> None:
        messages.append(Message("assistant", step.text))
