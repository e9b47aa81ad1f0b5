"""OpenAI function calling: a ``python`` tool whose argument is the code; results go back as
``tool`` messages, one per call."""

from __future__ import annotations

import json

from ..errors import FormatError
from ..llm.base import LLM, Completion, GenerationRequest, Message
from .base import Action, GenerationOptions, Step, image_parts
from .fenced import SYSTEM as FENCED_SYSTEM
from .fenced import FencedFormat

TOOL_NAMES = ("python", "code_interpreter")
SYSTEM = FENCED_SYSTEM.replace("Every ```python fenced block you write is executed", "Call the `python` tool to run code") \
    .replace(" in a ```python block", "")
PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code in a stateful Jupyter kernel; returns stdout, results, errors and image paths.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python code to run."}},
            "required": ["code"],
        },
    },
}


class ToolsFormat(FencedFormat):
    """Chat messages like the fenced format (same user turns), code through tool calls."""

    name = "tools"
    system = SYSTEM

    def check(self, llm: LLM | type[LLM]) -> None:
        if not llm.supports_tools:
            raise FormatError(f"the {llm.name} backend has no tool calling; use --format react or --format fenced")

    def request(self, messages: list[Message], options: GenerationOptions) -> GenerationRequest:
        return GenerationRequest.of(options, messages=list(messages), tools=[PYTHON_TOOL])

    def parse(self, completion: Completion) -> Step:
        if not completion.tool_calls:
            return Step(completion.text, answer=completion.text.strip())
        actions = []
        for call in completion.tool_calls:
            if call.name not in TOOL_NAMES:
                actions.append(Action(problem=f"Unknown tool {call.name!r}: the only tool is `python`.", call_id=call.id))
                continue
            try:
                args = json.loads(call.arguments or "{}")
                code = args["code"] if isinstance(args, dict) else None
            except (json.JSONDecodeError, KeyError):
                code = None
            if not isinstance(code, str) or not code.strip():
                actions.append(Action(call_id=call.id, problem=(
                    "The tool call's arguments were not valid JSON with a \"code\" string "
                    f"(got {call.arguments[:200]!r}). Call python with {{\"code\": \"...\"}}.")))
            else:
                actions.append(Action(code=code, call_id=call.id))
        return Step(completion.text, actions, tool_calls=list(completion.tool_calls))

    def add_step(self, messages: list[Message], step: Step, observations: list[str]) -> None:
        messages.append(Message("assistant", step.text, tool_calls=step.tool_calls))
        for action, obs in zip(step.actions, observations):
            messages.append(Message("tool", obs, tool_call_id=action.call_id))

    def add_images(self, messages: list[Message], data_urls: list[str]) -> None:
        # tool messages hold text only; images follow in a user message
        messages.append(Message("user", image_parts("The images the code produced:", data_urls)))
