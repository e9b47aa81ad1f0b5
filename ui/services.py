"""What ``jupybox serve`` runs on: the settings, the sandbox manager, the model, and the
conversations of the open sessions. The HTTP API and the browser UI both take a ``Services``; they
never build these themselves.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from interpreter import Conversation, Interpreter, InterpreterSettings, ModelUnavailable
from interpreter.llm import DEFAULT_MODEL, llm_from_options
from interpreter.llm.base import LLM
from sandbox import JupyboxError, Limits, SandboxSettings, Session, SessionClosed, SessionManager

log = logging.getLogger(__name__)



@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    api_token: str | None = None  # when set, the API and the UI require it
    cors_origins: list[str] = field(default_factory=list)  # other sites' pages allowed to call (none by default)
    trusted_proxies: list[str] = field(default_factory=list)  # addresses whose X-Forwarded-* headers are believed
    header_timeout_s: float = 10.0  # a connection's request head must arrive within this
    body_idle_s: float = 30.0  # a request body that sends nothing for this long is given up (408)
    max_connections: int = 512  # open client connections at most
    model: str | None = None  # transformers checkpoint folder or hub id
    openai_base_url: str | None = None
    openai_model: str | None = None
    openai_api_key: str | None = None
    vision: bool = False
    format: str | None = None  # react | fenced | tools; default per model
    upload_limit_mb: int = 100  # one upload request body; the workspace quotas apply as well
    ui_cache_mb: int = 2048  # the browser UI's uploads and shown files, in all
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    interpreter: InterpreterSettings = field(default_factory=InterpreterSettings)

    @classmethod
    def from_env(cls, **overrides: object) -> ServeSettings:
        env = os.environ
        values: dict[str, object] = {
            "host": env.get("JUPYBOX_HOST") or None,
            "port": int(env["JUPYBOX_PORT"]) if env.get("JUPYBOX_PORT") else None,
            "upload_limit_mb": int(env["JUPYBOX_UPLOAD_LIMIT_MB"]) if env.get("JUPYBOX_UPLOAD_LIMIT_MB") else None,
            "ui_cache_mb": int(env["JUPYBOX_UI_CACHE_MB"]) if env.get("JUPYBOX_UI_CACHE_MB") else None,
            "api_token": env.get("JUPYBOX_API_TOKEN") or None,
            "max_connections": int(env["JUPYBOX_MAX_CONNECTIONS"]) if env.get("JUPYBOX_MAX_CONNECTIONS") else None,
            "openai_base_url": env.get("OPENAI_BASE_URL") or None,
            "openai_model": env.get("OPENAI_MODEL") or None,
            "openai_api_key": env.get("OPENAI_API_KEY") or None,
            "model": env.get("JUPYBOX_MODEL") or None,
        }
        if env.get("JUPYBOX_CORS_ORIGINS"):
            values["cors_origins"] = env["JUPYBOX_CORS_ORIGINS"].split(",")
        if env.get("JUPYBOX_TRUSTED_PROXIES"):
            values["trusted_proxies"] = env["JUPYBOX_TRUSTED_PROXIES"].split(",")
        token_file = overrides.pop("api_token_file", None) or env.get("JUPYBOX_API_TOKEN_FILE")
        if token_file:
            values["api_token"] = read_token_file(str(token_file))
        values.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("model") and not overrides.get("openai_base_url"):
            values["openai_base_url"] = None  # an explicit --model beats OPENAI_BASE_URL, as in llm_from_options
        return cls(**{k: v for k, v in values.items() if v is not None})  # type: ignore[arg-type]


def read_token_file(path: str) -> str:
    """The API token kept in a file (its first line), so that it is not visible in ``ps``."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.readline().strip()
    except OSError as exc:
        raise JupyboxError(f"cannot read the API token file {path}: {exc.strerror}") from None
    if not token:
        raise JupyboxError(f"the API token file {path} is empty: put the token on its first line")
    return token


class TurnBusy(JupyboxError):
    """The session is already running a chat turn."""


class Services:
    """Owns the long-lived parts of the server. ``llm`` is None when the model cannot be used;
    ``model_error`` then says, in words, what to configure.

    A sandbox session may carry one conversation (created on its first chat turn) and runs one
    turn at a time (``begin_turn`` / ``end_turn``). Sessions closed here or by the
    idle reaper lose their conversation with them.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.manager = SessionManager(settings.sandbox, on_reap=self._forget)
        self.llm: LLM | None = None
        self.model_error: str | None = None
        self.model_loading = False
        self.conversations: dict[str, Conversation] = {}  # by sandbox session id
        self.user_sessions: dict[str, str] = {}  # OpenAI ``user`` field -> sandbox session id
        self._turns: set[str] = set()  # sessions running a chat turn
        self._tasks: set[asyncio.Task] = set()
        self._interpreter: Interpreter | None = None

    async def start(self) -> None:
        """Start the sandbox manager and the model. A local model loads in the background (it
        takes minutes): until then, and for good when it cannot load, ``llm`` is None and
        ``model_error`` says why; code execution works meanwhile."""
        await self.manager.start()
        try:
            llm = await asyncio.to_thread(self._make_llm)
        except Exception as exc:  # noqa: BLE001 - a model that cannot load must not stop the server
            self._model_failed(exc)
            return
        load = getattr(llm, "load", None)
        if load is None:
            self.llm = llm
            return
        self.model_loading = True
        self.model_error = f"The model {self.model_name} is still loading; ask again in a minute."
        self.spawn(self._load(llm, load))

    async def _load(self, llm: LLM, load: Callable[[], Awaitable[None]]) -> None:
        try:
            await load()
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
            "such as vLLM, or --model PATH (JUPYBOX_MODEL) for a local checkpoint on a GPU. "
            "Code execution and files work without a model.")
        log.warning("%s", self.model_error)

    def _make_llm(self) -> LLM:
        s = self.settings
        return llm_from_options(model=s.model, openai_base_url=s.openai_base_url, openai_model=s.openai_model,
                                openai_api_key=s.openai_api_key, vision=s.vision)

    @property
    def model_name(self) -> str:
        s = self.settings
        return (s.openai_model or "") if s.openai_base_url else (s.model or DEFAULT_MODEL)

    def interpreter(self, fmt: str | None = None, settings: InterpreterSettings | None = None) -> Interpreter:
        """An interpreter on the shared model and manager; raises ``ModelUnavailable`` when no model."""
        if self.llm is None:
            raise ModelUnavailable(self.model_error or "no model is configured")
        if fmt is None and settings is None:
            if self._interpreter is None:
                self._interpreter = Interpreter(self.llm, self.manager, self.settings.format, self.settings.interpreter)
            return self._interpreter
        return Interpreter(self.llm, self.manager, fmt or self.settings.format, settings or self.settings.interpreter)

    # -- sessions and their conversations ---------------------------------------------------
    async def create_session(self, limits: Limits | None = None) -> Session:
        """A new sandbox session, with ``limits`` (at most the server's) when given."""
        return await self.manager.create(limits=limits)

    def session(self, session_id: str) -> Session:
        """An open session, or ``SessionClosed``; forgets the conversation of a reaped one."""
        try:
            return self.manager.get(session_id)
        except SessionClosed:
            self._forget(session_id)
            raise

    async def close_session(self, session_id: str) -> None:
        self._forget(session_id)
        await self.manager.close(session_id)

    def conversation(self, session_id: str) -> Conversation:
        """The session's conversation, created on first use (needs a model)."""
        self.session(session_id)
        conv = self.conversations.get(session_id)
        if conv is None:
            conv = Conversation(format=self.interpreter().format.name, session_id=session_id)
            self.conversations[session_id] = conv
        return conv

    def turn_running(self, session_id: str) -> bool:
        return session_id in self._turns

    def begin_turn(self, session_id: str) -> None:
        """Mark a chat turn as running; a session runs one at a time."""
        if session_id in self._turns:
            raise TurnBusy(f"session {session_id} is already answering a question: wait for it, or interrupt it")
        self._turns.add(session_id)

    def end_turn(self, session_id: str) -> None:
        self._turns.discard(session_id)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """A task the server owns: kept referenced, cancelled on ``stop``."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _forget(self, session_id: str) -> None:
        self.conversations.pop(session_id, None)
        for user, sid in list(self.user_sessions.items()):
            if sid == session_id:
                del self.user_sessions[user]

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.manager.shutdown()
        self.conversations.clear()
        self.user_sessions.clear()
        if self.llm is not None:
            await self.llm.close()
