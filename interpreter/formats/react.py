"""Qwen ReAct: the format Qwen-7B-Chat was trained on for tool use.

The user turn carries the ReAct instruction with one tool, ``code_interpreter``; the model continues
the *same* assistant turn with ``Thought:`` / ``Action: code_interpreter`` / ``Action Input:`` and a
fenced code block; generation stops at ``Observation:``; the loop appends
``\\nObservation: <result>\\nThought:`` and lets it continue until ``Final Answer:``. The prompt is
raw ChatML text, so the backend must accept a raw prompt (``supports_prompt``).
"""

from __future__ import annotations

import json
import re

from ..errors import FormatError
from ..llm.base import LLM, Completion, GenerationRequest, Message
from .base import (PYTHON_LANGS, Action, Format, GenerationOptions, Step, announce_files, code_blocks, hide_code,
                   partial_marker)

TOOL_NAME = "code_interpreter"
TOOL_PARAMETERS = [{"name": "code", "type": "string", "description": "待执行的代码"}]
TOOL_TEXT = (
    f"{TOOL_NAME}: Call this tool to interact with the 代码解释器 API. What is the 代码解释器 API useful for? "
    f"代码解释器，可用于执行Python代码。 Parameters: {json.dumps(TOOL_PARAMETERS, ensure_ascii=False)} "
    "Enclose the code within triple backticks (`) at the beginning and end of the code."
)
INSTRUCTION = """Answer the following questions as best you can. You have access to the following tools:

{tools}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!

Question: {question}"""
SYSTEM = "You are a helpful assistant."
STOP = ["Observation:", "Observation:\n"]
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

ACTION_RE = re.compile(r"Action:\s*(.*?)\s*\n?\s*Action Input:\s*(.*)", re.S)
ACTION_START_RE = re.compile(r"(^|\n)[ \t]*Action[ \t]*:")
LABEL_RE = re.compile(r"(^|\n)[ \t]*(Thought|Final Answer)[ \t]*:[ \t]*")
MARKERS = ("Thought:", "Final Answer:", "Action:", "Action Input:", "Observation:")
CJK_RE = re.compile(r"[\u4e00-\u9fff]")


def react_prompt(question: str) -> str:
    return INSTRUCTION.format(tools=TOOL_TEXT, names=TOOL_NAME, question=question)


class ReactFormat(Format):
    name = "react"

    @property
    def packages(self) -> str:
        """Qwen's own system prompt ("You are a helpful assistant.") is what its models and the
        code-interpreter benchmark were made with: it is kept as it is unless the server's
        wheelhouse has packages to offer, which the model could not guess."""
        return super().packages if self.listing is not None and self.listing[1] else ""

    def check(self, llm: LLM | type[LLM]) -> None:
        if not llm.supports_prompt:
            raise FormatError(f"the ReAct format continues a raw prompt, which the {llm.name} backend cannot; "
                              "use --format fenced or --format tools")

    def add_user(self, messages: list[Message], question: str, files: list[str]) -> None:
        prefix = announce_files(files, lang_zh=bool(CJK_RE.search(question)))
        messages.append(Message("user", prefix + question))

    def request(self, messages: list[Message], options: GenerationOptions) -> GenerationRequest:
        return GenerationRequest.of(options, prompt=self.render(messages), stop=list(STOP))

    def render(self, messages: list[Message]) -> str:
        """ChatML text; the last user question carries the ReAct instruction, and an open assistant
        turn (the scratchpad so far) is continued. A question that already holds ChatML with an open
        assistant turn (a benchmark record with a first code step) is continued inside that turn."""
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        parts = [f"{IM_START}system\n{SYSTEM} {self.packages}".rstrip() + IM_END]
        for i, m in enumerate(messages):
            text = m.text()
            if i == last_user:
                text = react_prompt(text.strip())
                if IM_START + "assistant" in text and i == len(messages) - 1:
                    parts.append(f"{IM_START}user\n{text}")
                    return "\n".join(parts)
            if m.role == "assistant" and i == len(messages) - 1:
                parts.append(f"{IM_START}assistant\n{text}")
                return "\n".join(parts)
            parts.append(f"{IM_START}{m.role}\n{text}{IM_END}")
        parts.append(f"{IM_START}assistant\n")
        return "\n".join(parts)

    def parse(self, completion: Completion) -> Step:
        text = completion.text
        final = text.rfind("Final Answer:")
        match = None
        for match in ACTION_RE.finditer(text):
            pass
        if match is not None and (final < 0 or match.start() > final):
            tool, tool_input = match.group(1).strip(), match.group(2)
            if tool != TOOL_NAME:
                return Step(text, [Action(problem=f"Unknown tool {tool!r}: the only tool is {TOOL_NAME}.")])
            blocks = code_blocks(tool_input)
            code = blocks[0][1] if blocks else tool_input.strip().strip("`")
            if not code.strip():
                return Step(text, [Action(problem="The Action Input held no code: enclose Python code in triple backticks.")])
            return Step(text, [Action(code=code)])
        if final < 0:
            # A model not trained on ReAct often writes a ```python block without the Action lines:
            # that is a request to run it all the same.
            python = [code for lang, code in code_blocks(text) if lang in PYTHON_LANGS]
            if python:
                return Step(text, [Action(code=python[0])])
        answer = text[final + len("Final Answer:"):] if final >= 0 else text
        return Step(text, answer=answer.strip())

    def display(self, text: str, final: bool = True) -> str:
        """The thoughts and the answer, without the labels and without the action."""
        start = ACTION_START_RE.search(text)
        body = text[:start.start()] if start else text
        final = final or start is not None  # nothing after the action is shown
        if not final and partial_marker(body, MARKERS):
            body = body[:body.rfind("\n") + 1]
        return LABEL_RE.sub(r"\1", hide_code(body, final)).strip()

    def _scratchpad(self, messages: list[Message]) -> Message:
        if messages[-1].role != "assistant":
            messages.append(Message("assistant", ""))
        return messages[-1]

    def add_step(self, messages: list[Message], step: Step, observations: list[str]) -> None:
        pad = self._scratchpad(messages)
        pad.content = f"{pad.text()}{step.text}\nObservation: {observations[0] if observations else ''}\nThought:"

    def add_answer(self, messages: list[Message], step: Step) -> None:
        pad = self._scratchpad(messages)
        pad.content = pad.text() + step.text

