"""The code-execution loop: the model writes code, the sandbox runs it, the outputs go back to the
model until it answers.

The conversation service gives each conversation one sandbox session, so state persists across
turns (``interpreter.service``). Each turn is bounded: at most ``max_executions`` executions,
``max_problems`` consecutive unusable replies, observations cut to ``observation_tokens``
(measured with the model's tokenizer, head and tail kept), and the prompt to
``max_prompt_tokens`` and to the model's context, less room for its reply: past that, the oldest
whole turns are dropped from what the model sees (a ``notice`` says so; the sandbox keeps their
variables and files). Failed code sends its traceback back, so the model may fix it; code the model
wrote up to its token limit is not run, and an answer cut there says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from sandbox import JupyboxError, Session
from sandbox.models import Execution, ExecutionStatus, clip

from .conversation import Cell, Conversation
from .events import Event
from .formats import Action, Format, get_format
from .llm.base import LLM, Completion, GenerationOptions, GenerationRequest, Message, Usage

log = logging.getLogger(__name__)


@dataclass
class InterpreterSettings(GenerationOptions):
    """The loop's bounds, on top of the sampling options every front end shares."""

    max_executions: int = 6  # per turn
    max_problems: int = 2  # consecutive replies with no usable code before the turn ends
    execution_timeout: float = 60.0
    observation_tokens: int = 1024
    max_prompt_tokens: int = 24_000
    stop_after_error: bool = False  # end the turn after a failed execution (the benchmark protocol)


def _data_urls(execution: Execution) -> list[str]:
    urls = []
    for out in execution.results:
        for mime in ("image/png", "image/jpeg"):
            if out.data and mime in out.data:
                urls.append(f"data:{mime};base64,{out.data[mime]}")
                break
    return urls


def drop_oldest_turn(messages: list[Message]) -> bool:
    """Remove the oldest whole turn (a user message and everything up to the next one), keeping
    leading system messages and the current turn; False when there is none to drop."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if len(users) < 2:
        return False
    start = next(i for i, m in enumerate(messages) if m.role != "system")
    del messages[start:users[1]]
    return True


@dataclass
class _TurnState:
    """What one turn has used so far, and how it ended (``end``: its answer or error event)."""

    cancel: asyncio.Event
    options: GenerationOptions
    usage: Usage = field(default_factory=Usage)
    executions: int = 0
    problems: int = 0  # consecutive replies with no usable code
    end: Event | None = None


class Interpreter:
    """Runs turns with one model and one prompt format, in a session it is given (the
    conversation service finds the session; the interpreter does not manage any)."""

    def __init__(self, llm: LLM, fmt: Format | str | None = None, settings: InterpreterSettings | None = None) -> None:
        self.llm = llm
        self.format = fmt if isinstance(fmt, Format) else get_format(fmt or None, llm)
        self.settings = settings or InterpreterSettings()

    async def run(self, conv: Conversation, session: Session, question: str, cancel: asyncio.Event | None = None,
                  announce: list[str] = (), options: GenerationOptions | None = None) -> AsyncIterator[Event]:
        """One user turn in ``session``. Yields events as they happen; ends with an ``answer`` or
        an ``error`` event, right after a ``usage`` event with the turn's tokens (however it ended).
        ``announce`` names files uploaded since the last question that are in the workspace; they
        are announced to the model. ``options`` override the settings' sampling for this turn.
        Setting ``cancel`` stops the model's stream and interrupts the running code."""
        turn = _TurnState(cancel or asyncio.Event(), options or self.settings)
        try:
            names = [n for n in announce if await asyncio.to_thread(session.workspace.exists, n)]
            conv.session_id = session.id
            conv.files.extend(n for n in names if n not in conv.files)
            self.format.add_user(conv.messages, question, names)
            conv.timeline.append(("question", question))
            await self.llm.load()  # a local model's context is known once it is loaded
            while turn.end is None:
                async with aclosing(self._step(conv, session, turn)) as events:
                    async for event in events:
                        yield event
        except JupyboxError as exc:
            turn.end = Event("error", text=str(exc))
        for event in self._end_of_turn(turn):
            yield event

    @staticmethod
    def _end_of_turn(turn: _TurnState) -> list[Event]:
        """How every turn ends, however it ended: the ``usage`` of the whole turn, then its answer
        or error."""
        assert turn.end is not None
        return [Event("usage", usage=turn.usage), turn.end]

    async def _step(self, conv: Conversation, session: Session, turn: _TurnState) -> AsyncIterator[Event]:
        """One generation and what it asked for: the model's text, then its answer (the turn's
        end) or its code run and the observations recorded. Sets ``turn.end`` when the turn is over."""
        s, options = self.settings, turn.options
        limit = self._prompt_limit(options)
        request, prompt_tokens, dropped = self._fit(conv, options, limit)
        if dropped:
            yield Event("notice", text=(
                f"The conversation no longer fits in the model's {limit}-token prompt budget: its {dropped} "
                f"oldest {'turn was' if dropped == 1 else 'turns were'} dropped from what the model sees "
                "(the sandbox keeps their variables and files)."))
        if prompt_tokens > limit:
            turn.end = Event("error", text=f"This turn alone is {prompt_tokens} tokens long, over the model's "
                             f"{limit}-token prompt budget: ask a shorter question or start a new conversation.")
            return
        completion = Completion()
        async for chunk in self.llm.stream(request, turn.cancel):
            if chunk.text:
                completion.text += chunk.text
                yield Event("text_delta", text=chunk.text)
            completion.tool_calls.extend(chunk.tool_calls or [])
            completion.finish_reason = chunk.finish_reason or completion.finish_reason
            if chunk.usage:
                turn.usage.prompt_tokens += chunk.usage.prompt_tokens
                turn.usage.completion_tokens += chunk.usage.completion_tokens
        step = self.format.parse(completion)
        if step.answer is not None:
            self.format.add_answer(conv.messages, step)
            conv.timeline.append(("answer", step.answer))
            turn.end = Event("answer", text=step.answer, finish_reason=completion.finish_reason or "stop")
            return
        if completion.finish_reason == "length":  # code written up to the token limit is likely incomplete: not run
            step.actions = [Action(problem=(
                f"Not executed: your reply was cut at the {options.max_tokens}-token limit before it "
                "was complete. Write shorter code, or split the work into several steps."))]
        if turn.executions >= s.max_executions:
            turn.end = Event("error", text=f"Stopped after {s.max_executions} executions in this turn "
                             "(max_executions); ask again to continue.")
            return
        turn.problems = turn.problems + 1 if all(a.code is None for a in step.actions) else 0
        observations: list[str] = []
        images: list[str] = []
        failed = False
        for action in step.actions:
            execution = None
            async with aclosing(self._act(conv, session, action, turn, observations)) as events:
                async for event in events:  # closed with this step: a consumer that leaves interrupts the code
                    execution = event.execution if event.type == "execution" else execution
                    yield event
            if execution is not None:
                failed = failed or execution.status is not ExecutionStatus.OK
                if self.llm.supports_images:
                    images += _data_urls(execution)
        self.format.add_step(conv.messages, step, observations)
        if images:
            self.format.add_images(conv.messages, images)
        if turn.cancel.is_set():
            turn.end = Event("error", text="Stopped.")
        elif failed and s.stop_after_error:
            turn.end = Event("error", text="Stopped after a failed execution (stop_after_error).")
        elif turn.problems > s.max_problems:
            turn.end = Event("error", text="The model did not produce runnable Python code after "
                             f"{s.max_problems + 1} attempts: {observations[0] if observations else ''}")

    async def _act(self, conv: Conversation, session: Session, action: Action, turn: _TurnState,
                   observations: list[str]) -> AsyncIterator[Event]:
        """Run one action's code (a ``code`` event, its outputs, its ``execution``), recording the
        cell; every action, run or not, adds its observation for the model."""
        if turn.cancel.is_set():  # stopped: no further code runs, each action still gets its answer
            observations.append("Not executed: the user stopped this turn.")
            return
        if action.code is None:
            observations.append(action.problem or "")
            return
        if turn.executions >= self.settings.max_executions:
            observations.append("Not executed: the execution limit of this turn was reached.")
            return
        turn.executions += 1
        yield Event("code", code=action.code)
        execution = None
        async with aclosing(self._execute(session, action.code, turn.cancel)) as events:
            async for event in events:
                execution = event.execution if event.type == "execution" else execution
                yield event
        assert execution is not None
        conv.timeline.append(("cell", conv.add_cell(Cell(action.code, execution))))
        tokens = self.settings.observation_tokens
        text = clip(execution.text(budget=tokens * 8), tokens, self.llm.count_tokens)
        observations.append(self.format.observation(execution, text))

    async def _execute(self, session: Session, code: str, cancel: asyncio.Event) -> AsyncIterator[Event]:
        """Run one cell, streaming its outputs; a cancel interrupts the kernel."""
        async with aclosing(session.stream(code, self.settings.execution_timeout, cancel)) as items:
            async for item in items:  # closed with this generator, so a consumer that leaves interrupts
                yield Event("execution", execution=item) if isinstance(item, Execution) else Event("output", output=item)

    def _prompt_limit(self, options: GenerationOptions) -> int:
        """The prompt's budget: ``max_prompt_tokens``, and the model's context less room for a reply
        (its ``max_tokens``, at most a quarter of the context)."""
        context = self.llm.context_tokens
        if not context:
            return self.settings.max_prompt_tokens
        return min(self.settings.max_prompt_tokens, context - min(options.max_tokens, context // 4))

    def _fit(self, conv: Conversation, options: GenerationOptions, limit: int) -> tuple[GenerationRequest, int, int]:
        """The request for the conversation so far, its oldest turns dropped while it is over
        ``limit``: the request, its tokens and how many turns were dropped."""
        dropped = 0
        while True:
            request = self.format.request(conv.messages, options)
            tokens = self._prompt_tokens(request)
            if tokens <= limit or not drop_oldest_turn(conv.messages):
                return request, tokens, dropped
            dropped += 1

    def _prompt_tokens(self, request) -> int:
        if request.prompt is not None:
            return self.llm.count_tokens(request.prompt)
        return sum(self.llm.count_tokens(m.text()) + 4 for m in request.messages or [])
