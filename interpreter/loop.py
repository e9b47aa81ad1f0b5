"""The code-execution loop: the model writes code, the sandbox runs it, the outputs go back to the
model until it answers.

One sandbox session per conversation, so state persists across turns. Each turn is bounded: at
most ``max_executions`` executions, ``max_problems`` consecutive unusable replies, observations cut
to ``observation_tokens`` (measured with the model's tokenizer, head and tail kept), and the prompt
to ``max_prompt_tokens``. Failed code sends its traceback back, so the model may fix it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from sandbox import JupyboxError, Session, SessionManager
from sandbox.models import Execution, ExecutionStatus

from .conversation import Cell, Conversation
from .events import Event
from .formats import Format, GenerationOptions, get_format
from .llm.base import LLM, Completion, Usage

log = logging.getLogger(__name__)


@dataclass
class InterpreterSettings:
    max_executions: int = 6  # per turn
    max_problems: int = 2  # consecutive replies with no usable code before the turn ends
    execution_timeout: float = 60.0
    observation_tokens: int = 1024
    max_prompt_tokens: int = 24_000
    stop_after_error: bool = False  # end the turn after a failed execution (the benchmark protocol)
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int | None = None


def _data_urls(execution: Execution) -> list[str]:
    urls = []
    for out in execution.results:
        for mime in ("image/png", "image/jpeg"):
            if out.data and mime in out.data:
                urls.append(f"data:{mime};base64,{out.data[mime]}")
                break
    return urls


def clip_tokens(text: str, budget: int, count) -> str:
    """Keep the head and tail of ``text`` within ``budget`` tokens."""
    n = count(text)
    if n <= budget:
        return text
    keep = max(int(len(text) * budget / n * 0.9) // 2, 1)
    while True:
        cut = len(text) - 2 * keep
        clipped = f"{text[:keep]}\n[... {cut} characters truncated ...]\n{text[-keep:]}"
        if count(clipped) <= budget or keep <= 1:
            return clipped
        keep = int(keep * 0.8)


class Interpreter:
    """Runs conversations with one model, one prompt format and a sandbox manager."""

    def __init__(self, llm: LLM, manager: SessionManager, fmt: Format | str | None = None,
                 settings: InterpreterSettings | None = None) -> None:
        self.llm = llm
        self.manager = manager
        self.format = fmt if isinstance(fmt, Format) else get_format(fmt, llm)
        self.settings = settings or InterpreterSettings()

    async def new_conversation(self) -> Conversation:
        conv = Conversation(format=self.format.name)
        await self._session(conv)
        return conv

    async def _session(self, conv: Conversation) -> Session:
        if conv.session_id is not None:
            try:
                return self.manager.get(conv.session_id)
            except JupyboxError:
                log.info("conversation %s: its session is gone, starting a new one", conv.id)
        session = await self.manager.create()
        conv.session_id = session.id
        return session

    async def restore(self, conv: Conversation, files: dict[str, bytes]) -> None:
        """Give a reloaded conversation a session with its files (variables are not restored)."""
        conv.session_id = None
        session = await self._session(conv)
        for name, data in files.items():
            session.workspace.write(name, data)

    async def close(self, conv: Conversation) -> None:
        if conv.session_id is not None:
            try:
                await self.manager.close(conv.session_id)
            except JupyboxError:
                pass
            conv.session_id = None

    async def run(self, conv: Conversation, question: str, files: list[Path | tuple[str, bytes]] = (),
                  cancel: asyncio.Event | None = None, present: list[str] = ()) -> AsyncIterator[Event]:
        """One user turn. Yields events as they happen; ends with an ``answer`` or an ``error``
        event. ``files`` are written into the workspace; ``present`` names files already there
        (uploaded earlier); both are announced to the model. Setting ``cancel`` stops the model's
        stream and interrupts the running code."""
        cancel = cancel or asyncio.Event()
        try:
            session = await self._session(conv)
            names = [self._upload(session, f) for f in files]
            names += [n for n in present if n not in names and session.workspace.exists(n)]
        except JupyboxError as exc:
            yield Event("error", text=str(exc))
            return
        conv.files.extend(n for n in names if n not in conv.files)
        self.format.add_user(conv.messages, question, names)
        conv.timeline.append(("question", question))
        s = self.settings
        options = GenerationOptions(s.temperature, s.top_p, s.max_new_tokens, s.seed)
        usage = Usage()
        executions = problems = 0
        try:
            while True:
                request = self.format.request(conv.messages, options)
                prompt_tokens = self._prompt_tokens(request)
                if prompt_tokens > s.max_prompt_tokens:
                    yield Event("error", text=f"The conversation is {prompt_tokens} tokens long, over the "
                                f"{s.max_prompt_tokens}-token budget: start a new conversation.")
                    return
                completion = Completion()
                async for chunk in self.llm.stream(request, cancel):
                    if chunk.text:
                        completion.text += chunk.text
                        yield Event("text_delta", text=chunk.text)
                    completion.tool_calls.extend(chunk.tool_calls or [])
                    if chunk.usage:
                        usage.prompt_tokens += chunk.usage.prompt_tokens
                        usage.completion_tokens += chunk.usage.completion_tokens
                step = self.format.parse(completion)
                if step.answer is not None:
                    self.format.add_answer(conv.messages, step)
                    conv.timeline.append(("answer", step.answer))
                    yield Event("usage", data={"prompt_tokens": usage.prompt_tokens,
                                               "completion_tokens": usage.completion_tokens})
                    yield Event("answer", text=step.answer)
                    return
                if executions >= s.max_executions:
                    yield Event("error", text=f"Stopped after {s.max_executions} executions in this turn "
                                "(max_executions); ask again to continue.")
                    return
                observations: list[str] = []
                images: list[str] = []
                failed = False
                problems = problems + 1 if all(a.code is None for a in step.actions) else 0
                for action in step.actions:
                    if cancel.is_set():  # stopped: no further code runs, each action still gets its answer
                        observations.append("Not executed: the user stopped this turn.")
                        continue
                    if action.code is None:
                        observations.append(action.problem or "")
                        continue
                    if executions >= s.max_executions:
                        observations.append("Not executed: the execution limit of this turn was reached.")
                        continue
                    executions += 1
                    yield Event("code", code=action.code)
                    execution = None
                    async for event in self._execute(session, action.code, cancel):
                        if event.type == "execution":
                            execution = event.execution
                        yield event
                    assert execution is not None
                    conv.cells.append(Cell(action.code, execution))
                    conv.timeline.append(("cell", len(conv.cells) - 1))
                    text = clip_tokens(execution.text(budget=s.observation_tokens * 8), s.observation_tokens,
                                       self.llm.count_tokens)
                    observations.append(self.format.observation(execution, text))
                    failed = failed or execution.status is not ExecutionStatus.OK
                    if self.llm.supports_images:
                        images += _data_urls(execution)
                self.format.add_step(conv.messages, step, observations)
                if images:
                    self.format.add_images(conv.messages, images)
                if cancel.is_set():
                    yield Event("error", text="Stopped.")
                    return
                if failed and s.stop_after_error:
                    yield Event("error", text="Stopped after a failed execution (stop_after_error).")
                    return
                if problems > s.max_problems:
                    yield Event("error", text="The model did not produce runnable Python code after "
                                f"{s.max_problems + 1} attempts: {observations[0] if observations else ''}")
                    return
        except JupyboxError as exc:
            yield Event("error", text=str(exc))

    async def _execute(self, session: Session, code: str, cancel: asyncio.Event) -> AsyncIterator[Event]:
        """Run one cell, streaming its outputs; a cancel interrupts the kernel."""
        async with aclosing(session.stream(code, self.settings.execution_timeout, cancel)) as items:
            async for item in items:  # closed with this generator, so a consumer that leaves interrupts
                yield Event("execution", execution=item) if isinstance(item, Execution) else Event("output", output=item)

    def _upload(self, session: Session, f: Path | tuple[str, bytes]) -> str:
        if isinstance(f, tuple):
            return session.workspace.write(f[0], f[1]).path
        return session.workspace.upload(Path(f)).path

    def _prompt_tokens(self, request) -> int:
        if request.prompt is not None:
            return self.llm.count_tokens(request.prompt)
        return sum(self.llm.count_tokens(m.text()) + 4 for m in request.messages or [])
