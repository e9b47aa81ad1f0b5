"""The conversation service: every front end (browser UI, JSON API chat, OpenAI-compatible
endpoint, terminal, MCP) runs its turns through one of these, and keeps no map of its own.

It owns the model (loaded in the background; ``model_error`` says why there is none), the
conversations, keyed by a name the front end chooses (``web:<tab>``, ``openai:<user>``, a session
id...), and their sandbox sessions: ``session`` is the one place a conversation's session is found,
started, or replaced after the sandbox reaped it. A conversation runs one turn at a time (a second
one is ``TurnBusy``, worded the same for everyone); ``stop_turn`` stops the model and interrupts the
kernel; uploads go through the workspace's API off the event loop and are announced to the model
with the next question; ``save``/``load`` move a conversation as JSON, its files included;
conversations idle past the TTL with no session left are forgotten. Observers (``/metrics``) see
every event and every turn of every front end.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from sandbox import Caller, Execution, JupyboxError, Session, SessionClosed, SessionManager
from sandbox.packages import listing
from sandbox.workspace import Workspace, WorkspaceFile, read_files
from store import SessionRecord

from .conversation import Cell, Conversation
from .errors import ModelUnavailable, TurnBusy
from .events import Event
from .formats import Format, get_format
from .llm import LLM, ModelSettings
from .llm.base import GENERATION_OWNER, Usage
from .loop import Interpreter, InterpreterSettings

log = logging.getLogger(__name__)


# the audit log's hook: (action, user, target such as a session id, detail); the server's Services
# writes it to its AuditLog, off the event loop
Audit = Callable[[str, "str | None", "str | None", dict], object]


def code_digest(code: str, with_code: bool = False) -> dict[str, Any]:
    """What the audit log keeps of code: its hash and length, the code itself only when asked."""
    detail: dict[str, Any] = {"sha256": hashlib.sha256(code.encode()).hexdigest(), "chars": len(code)}
    if with_code:
        detail["code"] = code
    return detail


class Observer(Protocol):
    """Told of every event of every turn, and of each turn's end (``ui.metrics.Metrics`` is one)."""

    def observe_event(self, event: Event, source: str) -> None: ...

    def observe_turn(self, outcome: str, seconds: float, source: str) -> None: ...


@dataclass
class Chat:
    """A live conversation: its data, the front end it belongs to, and its turn."""

    key: str
    source: str  # web | api | openai | terminal | mcp: the label observers count by
    conversation: Conversation
    pending: list[str] = field(default_factory=list)  # uploaded, to be announced with the next question
    turn: Turn | None = None
    last_used: float = field(default_factory=time.monotonic)
    bound: bool = False  # its session was handed in (an API session): when that goes, so does the chat
    format_asked: str | None = None  # fixed, with the model's default, at the first question
    starting: asyncio.Lock = field(default_factory=asyncio.Lock)  # one session start at a time
    caller: Caller | None = None  # who it belongs to: its sessions are theirs, within their limits

    @property
    def user(self) -> str | None:
        return self.caller.name if self.caller is not None else None

    @property
    def busy(self) -> bool:
        return self.turn is not None and not self.turn.done


class Turn:
    """One question in a task of its own, its events queued for whoever reads them. The task
    outlives a reader that leaves: closing ``events()`` early stops the turn (model and kernel)."""

    def __init__(self, chat: Chat, fmt: Format) -> None:
        self.chat = chat
        self.format = fmt  # the conversation's format, found once: front ends render with it
        self.cancel = asyncio.Event()
        self.done = False
        self.finish_reason: str | None = None
        self.usage = Usage()
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def events(self) -> AsyncIterator[Event]:
        try:
            while (event := await self._queue.get()) is not None:
                yield event
        finally:
            if not self.done:
                self.cancel.set()

    def stop(self) -> None:
        self.cancel.set()


PACKAGES_TTL_S = 60.0
PACKAGES_MIN_CONTEXT = 4096  # tokens of context a model needs to be told about packages (about 300 of them)


class ConversationService:
    def __init__(self, manager: SessionManager, model: ModelSettings | LLM | None = None,
                 settings: InterpreterSettings | None = None, *, idle_ttl_s: float | None = None) -> None:
        self.manager = manager
        self.models = model if isinstance(model, ModelSettings) else ModelSettings()
        self.settings = settings or InterpreterSettings()
        self.llm: LLM | None = model if isinstance(model, LLM) else None
        self.model_error: str | None = None if self.llm is not None else "No model is configured."
        self.model_loading = False
        self.observers: list[Observer] = []
        self.idle_ttl_s = idle_ttl_s if idle_ttl_s is not None else manager.settings.idle_ttl_s
        self._chats: dict[str, Chat] = {}
        self._tasks: set[asyncio.Task] = set()
        self._given_model = isinstance(model, LLM)
        self.audit: Audit | None = None
        self.audit_code = False  # --audit-code: the audit log keeps the code run, not only its hash
        self._packages: tuple[float, tuple[list[str], list[str]]] | None = None  # (when, packages_listing())
        manager.on_reap = self._session_reaped

    # -- life cycle -------------------------------------------------------------------------
    async def start(self, load_model: bool = True) -> None:
        """Start the sandbox, then the model: a local one loads in the background (minutes), and
        until then (for good, when it cannot load) ``llm`` is None and ``model_error`` says why."""
        await self.manager.start()
        self.spawn(self._sweep())
        if self.llm is not None or not load_model:
            return
        try:
            llm = await asyncio.to_thread(self.models.create)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be made must not stop the service
            self._model_failed(exc)
            return
        if not llm.slow_to_load:  # a remote model: nothing to wait for
            self.llm, self.model_error = llm, None
            return
        self.model_loading = True
        self.model_error = f"The model {self.model_name} is still loading; ask again in a minute."
        self.spawn(self._load(llm))

    async def load_model(self) -> None:
        """Make and load the model now (the terminal waits for it; the server does not)."""
        if self.llm is None:
            llm = await asyncio.to_thread(self.models.create)
            await llm.load()
            self.llm, self.model_error = llm, None

    async def _load(self, llm: LLM) -> None:
        try:
            await llm.load()
        except Exception as exc:  # noqa: BLE001
            self._model_failed(exc)
            await llm.close()
        else:
            self.llm, self.model_error = llm, None
            log.info("model %s is ready", self.model_name)
        finally:
            self.model_loading = False

    def _model_failed(self, exc: Exception) -> None:
        detail = str(exc) if isinstance(exc, JupyboxError) else f"{type(exc).__name__}: {exc}"
        log.debug("the model could not be loaded", exc_info=exc)
        self.model_error = (
            f"The model is not available ({detail}). Configure one: pass --openai-base-url URL "
            "--openai-model NAME (or set OPENAI_BASE_URL / OPENAI_MODEL) for an OpenAI-compatible server "
            "such as vLLM, or --model PATH (JUPYBOX_MODEL) for a local checkpoint (a GPU makes it fast). "
            "Code execution and files work without a model.")
        log.warning("%s", self.model_error)

    @property
    def model_name(self) -> str:
        return getattr(self.llm, "model", None) or self.models.name

    def require_model(self) -> LLM:
        if self.llm is None:
            raise ModelUnavailable(self.model_error or "no model is configured")
        return self.llm

    def spawn(self, coro: Any) -> asyncio.Task:
        """A task the service owns: kept referenced, cancelled by ``stop``."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.manager.shutdown()
        self._chats.clear()
        if self.llm is not None and not self._given_model:
            await self.llm.close()

    # -- conversations and their sessions ---------------------------------------------------
    def get(self, key: str) -> Chat | None:
        return self._chats.get(key)

    def chats(self) -> list[Chat]:
        return list(self._chats.values())

    def chats_of(self, prefix: str) -> list[Chat]:
        """The conversations whose keys start with ``prefix`` (a front end's own, e.g. one MCP
        session's ``mcp:<id>:``), so that no front end keeps a registry of its own."""
        return [c for c in self._chats.values() if c.key.startswith(prefix)]

    def by_session(self, session_id: str) -> Chat | None:
        return next((c for c in self._chats.values() if c.conversation.session_id == session_id), None)

    def open(self, key: str, source: str, *, session_id: str | None = None, fmt: str | None = None,
             caller: Caller | None = None) -> Chat:
        """The conversation named ``key``, made when there is none. ``session_id`` binds it to a
        session the caller made (it then ends with that session); the format is fixed here, and
        so is its owner, ``caller`` (front ends put the user into ``key`` where the key is theirs
        to choose)."""
        chat = self._chats.get(key)
        if chat is None:
            recorded = session_id or self.manager.recorded_chat(key, caller)  # the server restarted meanwhile
            conv = self._recorded(recorded, caller) if recorded is not None else None
            conv = conv or Conversation(format="", session_id=session_id)
            chat = self._chats[key] = Chat(key, source, conv, bound=session_id is not None,
                                           format_asked=fmt or self.models.format, caller=caller)
        chat.last_used = time.monotonic()
        return chat

    def _recorded(self, session_id: str, caller: Caller | None) -> Conversation | None:
        """The conversation a session's record keeps (the server restarted since it was written)."""
        record = self.manager.record_of(session_id, caller)
        if record is None or not record.conversation:
            return None
        try:
            conv, _ = Conversation.from_dict(record.conversation)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("the recorded conversation of session %s cannot be read: %s", session_id, exc)
            return None
        conv.session_id = session_id
        return conv

    def history(self, caller: Caller | None = None) -> list[SessionRecord]:
        """The caller's sessions, running and paused, newest use first (their records, without
        the conversations): what a front end lists as earlier work."""
        return self.manager.history(caller)

    def reopen(self, key: str, source: str, session_id: str, caller: Caller | None = None) -> Chat:
        """Bind the conversation ``key`` to an earlier session of the caller's, with the
        conversation its record keeps; its kernel resumes on the next use. ``SessionClosed`` when
        the session is not the caller's or is gone."""
        self.manager.get(session_id, caller)  # SessionClosed: gone, or another user's
        conv = self._recorded(session_id, caller) or Conversation(format="", session_id=session_id)
        old = self.forget(key)
        chat = self._chats[key] = Chat(key, source, conv, format_asked=old.format_asked if old else self.models.format,
                                       caller=caller)
        return chat

    async def remember(self, chat: Chat) -> None:
        """Write the chat's conversation into its session's record (after each turn and cell), so
        that it outlives the server; the first question is its title."""
        conv, sid = chat.conversation, chat.conversation.session_id
        if sid is None:
            return
        title = next((str(v) for k, v in conv.timeline if k == "question"), "")
        try:
            data = await asyncio.to_thread(conv.to_record)
        except Exception:  # noqa: BLE001 - a record not written is logged, the conversation goes on
            log.exception("the conversation of session %s could not be recorded", sid)
            return
        await self.manager.remember(sid, conversation=data, title=title[:200], chat=chat.key)

    async def session(self, chat: Chat) -> tuple[Session, str | None]:
        """The chat's open session, started when it has none. The note says, in words, when an
        earlier session had gone (reaped after idling): its files and variables with it."""
        async with chat.starting:  # two callers at once (an upload and a question) start one session
            sid = chat.conversation.session_id
            note = None
            if sid is not None:
                try:
                    session = self.manager.get(sid)
                    session.touch()
                    return session, None
                except SessionClosed:
                    if chat.bound:
                        self.forget(chat.key)
                        raise
                    note = ("Your previous session was closed (or kept unused past its retention); a fresh one "
                            "was started (earlier files and variables are gone).")
            session = await self.manager.create(caller=chat.caller)
            chat.conversation.session_id = session.id
            chat.pending.clear()
            return session, note

    async def workspace(self, key: str) -> Workspace | None:
        """The workspace of the conversation's open session, or None (no session, or it is gone)."""
        chat = self._chats.get(key)
        sid = chat.conversation.session_id if chat else None
        try:
            return self.manager.get(sid).workspace if sid else None
        except SessionClosed:
            return None

    def forget(self, key: str) -> Chat | None:
        """Drop the conversation (its turn is stopped); its session stays open."""
        chat = self._chats.pop(key, None)
        if chat is not None and chat.turn is not None:
            chat.turn.stop()
        return chat

    async def close(self, key: str) -> None:
        """Drop the conversation and close its session (files and variables go)."""
        chat = self.forget(key)
        sid = chat.conversation.session_id if chat else None
        if sid is not None:
            try:
                await self.manager.close(sid)
            except SessionClosed:
                pass

    async def delete(self, session_id: str, caller: Caller | None = None) -> None:
        """Close an earlier session of the caller's for good (record, files and variables go),
        and forget every conversation bound to it (their turns are stopped). ``SessionClosed``
        when the session is not the caller's or is gone."""
        self.manager.get(session_id, caller)  # SessionClosed: gone, or another user's
        for chat in [c for c in self._chats.values() if c.conversation.session_id == session_id]:
            self.forget(chat.key)
        await self.manager.close(session_id, caller)

    def _session_reaped(self, session_id: str) -> None:
        chat = self.by_session(session_id)
        if chat is not None and chat.bound:
            self.forget(chat.key)

    async def _sweep(self) -> None:
        """Forget conversations idle past the TTL whose session is gone (tabs never closed, users
        who went away), or paused where the record brings it back (an API session's); one with a
        running session lives as long as the sandbox keeps it."""
        while True:
            await asyncio.sleep(min(max(self.idle_ttl_s / 4, 0.5), 60))
            now = time.monotonic()
            sessions = self.manager.list()
            running = {s.id for s in sessions if not s.paused}
            paused = {s.id for s in sessions if s.paused}
            for chat in list(self._chats.values()):
                sid = chat.conversation.session_id
                # an API session's conversation comes back from its record when it is next used
                kept = sid in running or (sid in paused and not chat.bound)
                if not chat.busy and not kept and now - chat.last_used > self.idle_ttl_s:
                    self._chats.pop(chat.key, None)

    # -- files ------------------------------------------------------------------------------
    async def upload(self, key: str, source: str, name: str, data: bytes | BinaryIO,
                     caller: Caller | None = None) -> tuple[WorkspaceFile, str | None]:
        """Store a file in the conversation's workspace (off the event loop), to be announced to
        the model with the next question; the note as for ``session``."""
        async def store(ws: Workspace) -> list[WorkspaceFile]:
            return [await asyncio.to_thread(ws.write, name, data)]

        stored, note = await self.receive(self.open(key, source, caller=caller), store)
        return stored[0], note

    async def receive(self, chat: Chat, store: Callable[[Workspace], Awaitable[list[WorkspaceFile]]],
                      ) -> tuple[list[WorkspaceFile], str | None]:
        """Files that ``store`` writes into the chat's workspace (a multipart body streamed in, one
        file given whole), announced to the model with the next question like every upload; the
        note as for ``session``."""
        session, note = await self.session(chat)
        stored = await store(session.workspace)
        for f in stored:
            if f.path not in chat.pending:
                chat.pending.append(f.path)
            self.record("file.upload", chat, {"name": f.path, "size": f.size})
        return stored, note

    def record(self, action: str, chat: Chat | None, detail: dict[str, Any], result: str = "ok",
               user: str | None = None, target: str | None = None) -> None:
        """One audit line through the server's hook (none: nothing is kept), with the chat's user
        and session."""
        if self.audit is None:
            return
        if chat is not None:
            user = user or chat.user
            target = target or chat.conversation.session_id
        detail = {**detail, "result": result} if result != "ok" else detail
        try:
            self.audit(action, user, target, detail)
        except Exception:  # noqa: BLE001 - the audit hook's failure is logged, the work goes on
            log.exception("auditing %s failed", action)

    # -- code without a model ---------------------------------------------------------------
    async def execute(self, chat: Chat, code: str, timeout: float | None = None,
                      cancel: asyncio.Event | None = None) -> AsyncIterator[Event]:
        """Run ``code`` in the chat's session as the person (or agent) wrote it, no model involved:
        a ``notice`` when the session had to be replaced, each ``output``, then the ``execution``,
        which becomes a cell of the conversation and is counted by the observers. Closing the
        iterator early, or setting ``cancel``, interrupts the code (variables are kept)."""
        session, note = await self.session(chat)
        if note:
            yield Event("notice", text=note)
        async with aclosing(session.stream(code, timeout, cancel)) as items:
            async for item in items:
                chat.last_used = time.monotonic()
                if isinstance(item, Execution):
                    self.record("execute", chat, {**code_digest(code, self.audit_code), "status": item.status.value})
                    chat.conversation.timeline.append(("cell", chat.conversation.add_cell(Cell(code, item))))
                    await self.remember(chat)
                    event = Event("execution", execution=item)
                    for observer in self.observers:
                        observer.observe_event(event, chat.source)
                else:
                    event = Event("output", output=item)
                yield event

    # -- turns ------------------------------------------------------------------------------
    async def turn(self, key: str, source: str, question: str, settings: InterpreterSettings | None = None,
                   *, close_after: bool = False, caller: Caller | None = None) -> Turn:
        """Start a turn. What can fail before it runs raises, so a front end can answer with a
        status: ``ModelUnavailable`` (no model), ``TurnBusy`` (one is running), ``FormatError``,
        and the sandbox's errors when no session can be had (``CapacityError``...); everything
        after is an event. ``close_after`` closes the conversation and its session once the turn
        has ended (a one-off question)."""
        llm = self.require_model()
        chat = self.open(key, source, caller=caller)
        if chat.busy:
            raise TurnBusy("this conversation is still answering the previous question: wait for it, or stop it")
        settings = settings or self.settings
        if chat.conversation.messages:  # fixed at the first question
            fmt = get_format(chat.conversation.format, llm)
        else:
            fmt = get_format(chat.format_asked, llm, settings.model)
            chat.conversation.format = fmt.name
        # a model of a small context is not told: the list would crowd out its conversation
        if (llm.context_tokens or PACKAGES_MIN_CONTEXT) >= PACKAGES_MIN_CONTEXT:
            fmt.listing = await self.packages_listing()
        interpreter = Interpreter(llm, fmt, settings)
        turn = chat.turn = Turn(chat, fmt)  # busy from here: a second caller waiting below is refused
        try:
            session, note = await self.session(chat)
        except BaseException:
            chat.turn = None
            if close_after:
                await self.close(key)
            raise
        turn.task = self.spawn(self._run(chat, turn, interpreter, session, note, question, close_after))
        return turn

    async def packages_listing(self) -> tuple[list[str], list[str]]:
        """What imports in the sandbox and what ``%pip install`` can add (the wheelhouse's names),
        looked at again after ``PACKAGES_TTL_S`` so that an admin's ``jupybox packages add`` shows
        without a restart."""
        now = time.monotonic()
        if self._packages is None or now - self._packages[0] > PACKAGES_TTL_S:
            found = await listing(self.manager.settings)
            self._packages = (now, (found.importable, found.installable))
        return self._packages[1]

    def stop_turn(self, key: str) -> bool:
        """Stop the conversation's running turn (the model and the kernel); False when none runs."""
        chat = self._chats.get(key)
        if chat is None or not chat.busy:
            return False
        chat.turn.stop()  # type: ignore[union-attr]
        return True

    async def _run(self, chat: Chat, turn: Turn, interpreter: Interpreter, session: Session, note: str | None,
                   question: str, close_after: bool) -> None:
        t0, outcome = time.monotonic(), "error"
        GENERATION_OWNER.set(chat.user or chat.key)  # this task's generations count as its owner's

        def emit(event: Event) -> None:
            for observer in self.observers:
                observer.observe_event(event, chat.source)
            turn._queue.put_nowait(event)

        try:
            if note:
                emit(Event("notice", text=note))
            announce, chat.pending = chat.pending, []
            async for event in interpreter.run(chat.conversation, session, question, cancel=turn.cancel,
                                               announce=announce):
                chat.last_used = time.monotonic()
                if event.usage is not None:
                    turn.usage = event.usage
                if event.type in ("answer", "error"):
                    outcome = event.type
                    turn.finish_reason = event.finish_reason
                emit(event)
        except JupyboxError as exc:
            emit(Event("error", text=str(exc)))
        except Exception:
            log.exception("a turn of %s failed", chat.key)
            emit(Event("error", text="internal error: the server's log has the details"))
        finally:
            turn.done = True
            chat.last_used = time.monotonic()
            for observer in self.observers:
                observer.observe_turn(outcome, time.monotonic() - t0, chat.source)
            self.record("chat.turn", chat, {"source": chat.source, "question_chars": len(question),
                                            "seconds": round(time.monotonic() - t0, 3)}, result=outcome)
            await self.remember(chat)
            turn._queue.put_nowait(None)
            if close_after:
                await self.close(chat.key)

    # -- save and load ----------------------------------------------------------------------
    async def save(self, key: str, with_files: bool = True) -> dict[str, Any]:
        """The conversation as JSON, with its workspace's files unless told otherwise."""
        chat = self._chats.get(key)
        if chat is None:
            raise SessionClosed(f"no conversation {key!r}")
        files: dict[str, bytes] = {}
        ws = await self.workspace(key) if with_files else None
        if ws is not None:
            files = await asyncio.to_thread(read_files, ws, ws.limits.workspace_bytes)
        return chat.conversation.to_dict(files)

    async def load(self, key: str, source: str, data: dict[str, Any]) -> Chat:
        """A saved conversation under ``key``, in a new session holding its files (variables are
        not restored: the model is told so by the cells' absence)."""
        conv, files = Conversation.from_dict(data)
        conv.id, conv.session_id = uuid.uuid4().hex[:12], None
        await self.close(key)
        chat = self._chats[key] = Chat(key, source, conv)
        session, _ = await self.session(chat)
        for name, content in files.items():
            await asyncio.to_thread(session.workspace.write, name, content)
        return chat
