"""Blocking twins of the async API, for scripts and notebooks.

The async classes are the real ones; these run them on one event loop in a background thread,
so the behaviour (timeouts, restarts, cleanup) is the same code.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .config import SandboxSettings
from .kernel import OutputCallback
from .manager import SessionManager
from .models import Execution
from .session import Session
from .workspace import Workspace

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="jupybox-sandbox", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class SyncSession:
    def __init__(self, session: Session, portal: _LoopThread) -> None:
        self._session = session
        self._portal = portal

    @property
    def id(self) -> str:
        return self._session.id

    @property
    def workspace(self) -> Workspace:
        return self._session.workspace

    def execute(self, code: str, timeout: float | None = None, on_output: OutputCallback | None = None) -> Execution:
        return self._portal.run(self._session.execute(code, timeout, on_output))

    def restart(self) -> None:
        self._portal.run(self._session.restart())


class SyncSessionManager:
    """``with SyncSessionManager() as m: m.create().execute("1+1")``"""

    def __init__(self, settings: SandboxSettings | None = None) -> None:
        self._portal = _LoopThread()
        self._manager = self._portal.run(_make_manager(settings))

    def __enter__(self) -> SyncSessionManager:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def start(self) -> None:
        self._portal.run(self._manager.start())

    def create(self) -> SyncSession:
        return SyncSession(self._portal.run(self._manager.create()), self._portal)

    def get(self, session_id: str) -> SyncSession:
        return SyncSession(self._manager.get(session_id), self._portal)

    def close(self, session_id: str) -> None:
        self._portal.run(self._manager.close(session_id))

    def shutdown(self) -> None:
        try:
            self._portal.run(self._manager.shutdown())
        finally:
            self._portal.stop()


async def _make_manager(settings: SandboxSettings | None) -> SessionManager:
    return SessionManager(settings)  # built inside the loop thread, where its tasks will run
