"""Sessions on one backend: creation, a warm pool, the registry, idle reaping, orphan cleanup.

``SessionManager`` is the entry point of the sandbox::

    async with SessionManager(SandboxSettings()) as manager:
        session = await manager.create()
        execution = await session.execute("1 + 1")
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .backends import Backend, create_backend
from .config import Limits, SandboxSettings
from .errors import CapacityError, SandboxError, SessionClosed
from .session import Session
from . import diskfs
from .workspace import remove_tree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who asks for a session, as the front ends pass it: the session registry keeps an owner
    per session and answers another user's id exactly as one that does not exist. ``admin``
    sees and closes everyone's; ``max_sessions`` and ``memory_mb`` are the user's own limits
    (``None``: only the server's bind)."""

    name: str
    admin: bool = False
    max_sessions: int | None = None
    memory_mb: int | None = None


class UserLimit(CapacityError):
    """A user holds their own maximum of sessions or of memory; other users still start theirs."""


# told of each session's life: (action, session id, owner name or None, detail)
SessionEvents = Callable[[str, str, "str | None", dict], object]


def _process_start(pid: int) -> str | None:
    """The kernel's start tick of a process: with the pid, it names one process uniquely."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def make_owner(instance: str) -> str:
    pid = os.getpid()
    return f"{instance}.{pid}.{_process_start(pid) or 0}"


def owner_is_dead(owner: str, instance: str) -> bool:
    """An owner of *this* instance whose process no longer exists (or is another process now)."""
    m = re.fullmatch(r"(.+)\.(\d+)\.(\d+)", owner)
    if not m or m.group(1) != instance:
        return False
    pid, start = int(m.group(2)), m.group(3)
    return _process_start(pid) != start


class SessionManager:
    def __init__(self, settings: SandboxSettings | None = None, backend: Backend | None = None,
                 on_reap: Callable[[str], object] | None = None) -> None:
        self.settings = settings or SandboxSettings()
        self.backend = backend or create_backend(self.settings)
        self.instance = re.sub(r"[^A-Za-z0-9_-]", "-", self.settings.instance or socket.gethostname())
        self.owner = make_owner(self.instance)
        self.sessions_dir = self.settings.home / "sessions"
        self._sessions: dict[str, Session] = {}
        self._pool: list[Session] = []
        self._refill: asyncio.Task | None = None
        self._reaper: asyncio.Task | None = None
        self._started = False
        self._closing = False
        self._starting: list[Limits] = []  # sessions create() is starting, counted against the caps
        self._warming = 0  # warm-pool sessions being started, counted against the memory budget
        self._closes: set[asyncio.Future] = set()  # closes under way, waited for by shutdown
        self.on_reap = on_reap  # told the id of each session the idle reaper closes
        self.on_event: SessionEvents | None = None  # session.create / session.close / session.expire
        self._owners: dict[str, str] = {}  # session id -> the name of the user who started it
        self._starting_for: list[tuple[str, int]] = []  # (user, memory MiB) of sessions being started
        self.settings.limits.check()
        self.memory_budget_mb = self.settings.memory_budget()
        if self.settings.limits.memory_mb > self.memory_budget_mb:
            raise SandboxError(f"one session's memory limit ({self.settings.limits.memory_mb} MiB) is more than the "
                               f"memory budget of all sessions ({self.memory_budget_mb} MiB): lower --memory-mb "
                               "or raise JUPYBOX_MEMORY_BUDGET_MB")
        # a backend that places sessions on other machines keeps a warm pool per machine itself
        self.pool_size = 0 if self.backend.places_sessions else self.settings.pool_size
        self.loop_workspaces = self._loop_workspaces()

    def _loop_workspaces(self) -> bool:
        """Whether each workspace gets its own size-capped filesystem (``settings.workspace_fs``)."""
        choice = self.settings.workspace_fs
        if choice not in ("auto", "loop", "plain"):
            raise SandboxError(f"workspace_fs={choice!r}: choose auto, loop or plain")
        if choice == "plain" or (choice == "auto" and self.settings.backend == "local"):
            return False
        if self.backend.places_sessions:  # each machine decides for the workspaces it holds
            return False
        reason = diskfs.unavailable()
        if reason is None:
            return True
        if choice == "loop":
            raise SandboxError(f"workspace_fs=loop needs a loop-mounted filesystem per workspace, but {reason}")
        log.warning("workspaces are plain folders: the quota holds for uploads, not for what the sandboxed "
                    "code writes, because %s (workspace_fs=loop needs root and loop devices)", reason)
        return False

    async def __aenter__(self) -> SessionManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Check the backend, remove what dead jupybox processes left, fill the warm pool."""
        if self._started:
            return
        await self.backend.check()
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        removed = await self.cleanup_orphans()
        if removed:
            log.info("removed %d orphaned sandbox(es)", removed)
        self._started = True
        self._reaper = asyncio.create_task(self._reap_idle())
        if self.pool_size:
            await self._fill_pool()

    async def cleanup_orphans(self) -> int:
        dead = lambda owner: owner_is_dead(owner, self.instance)  # noqa: E731
        removed = await self.backend.cleanup_orphans(dead)
        for folder in self.sessions_dir.glob("*"):
            try:
                owner = (folder / "owner").read_text()
            except OSError:
                continue
            if dead(owner):
                await asyncio.to_thread(diskfs.release, folder)
                await asyncio.to_thread(remove_tree, folder)
        return removed

    # -- sessions ---------------------------------------------------------------------------
    async def create(self, limits: Limits | None = None, isolation: str | None = None,
                     caller: Caller | None = None) -> Session:
        """A ready session: from the warm pool when one is there (and ``limits`` and ``isolation``
        are the default), else started now with them. ``isolation``: one of the backend's
        ``isolations()`` (e.g. ``runsc``), checked by the caller. ``caller`` owns it, within their
        own limits (``UserLimit``) as well as the server's."""
        if not self._started:
            await self.start()
        if self._closing:
            raise SandboxError("the sandbox is shutting down: try again once it is back")
        if limits is not None:
            limits.check(ceiling=self.settings.limits)
        if caller is not None:
            self._check_user_limits(caller, (limits or self.settings.limits).memory_mb)
            mine = (caller.name, (limits or self.settings.limits).memory_mb)
            self._starting_for.append(mine)
            try:
                session = await self._create(limits, isolation)
            finally:
                self._starting_for.remove(mine)
            self._owners[session.id] = caller.name
        else:
            session = await self._create(limits, isolation)
        self._emit("session.create", session.id, {"memory_mb": session.limits.memory_mb})
        return session

    def _check_user_limits(self, caller: Caller, memory_mb: int) -> None:
        """``UserLimit`` naming the limit when one more session of ``memory_mb`` would pass it."""
        held = [s.limits.memory_mb for sid, s in self._sessions.items() if self._owners.get(sid) == caller.name]
        held += [mb for name, mb in self._starting_for if name == caller.name]
        if caller.max_sessions is not None and len(held) >= caller.max_sessions:
            raise UserLimit(f"user {caller.name} has {len(held)} open sessions and may hold {caller.max_sessions} "
                            "(their own limit): close one, or ask the server's admin to raise it")
        if caller.memory_mb is not None and sum(held) + memory_mb > caller.memory_mb:
            raise UserLimit(f"user {caller.name}'s sessions hold {sum(held)} MiB of their own limit of "
                            f"{caller.memory_mb} MiB, and this one asks for {memory_mb} MiB more: close one, ask "
                            "for less memory, or ask the server's admin to raise the limit")

    def _emit(self, action: str, session_id: str, detail: dict | None = None) -> None:
        if self.on_event is not None:
            try:
                self.on_event(action, session_id, self._owners.get(session_id), detail or {})
            except Exception:  # noqa: BLE001 - a listener's failure must not fail the session
                log.exception("the listener of %s failed", action)

    async def _create(self, limits: Limits | None, isolation: str | None) -> Session:
        # sessions still starting count too, or concurrent callers could all pass the check
        if len(self._sessions) + len(self._starting) >= self.settings.max_sessions:
            raise CapacityError(
                f"{len(self._sessions)} sessions are open, the limit is {self.settings.max_sessions}: "
                "close idle sessions or raise max_sessions"
            )
        custom = (limits is not None and limits != self.settings.limits) or isolation is not None
        session = self._pool.pop(0) if self._pool and not custom else None
        if session is None:
            wanted = limits or self.settings.limits
            while self._pool and not self._memory_fits(wanted.memory_mb):
                await self._pool.pop().close()  # warm sessions give way to one that is asked for
            if not self._memory_fits(wanted.memory_mb):
                raise CapacityError(
                    f"the open sessions' memory limits add up to {self._memory_committed()} MiB of the "
                    f"{self.memory_budget_mb} MiB this host grants them, and this session asks for "
                    f"{wanted.memory_mb} MiB more: close idle sessions, ask for less memory, or raise "
                    "JUPYBOX_MEMORY_BUDGET_MB")
            self._starting.append(wanted)
            try:
                session = await self._new_session(limits if limits != self.settings.limits else None, isolation)
            finally:
                self._starting.remove(wanted)
            if self._closing:  # shut down while it started: do not hand out an unmanaged kernel
                await session.close()
                raise SandboxError("the sandbox is shutting down: try again once it is back")
        self._sessions[session.id] = session
        session.last_used = time.monotonic()
        self._schedule_refill()
        return session

    async def _new_session(self, limits: Limits | None = None, isolation: str | None = None) -> Session:
        sid = uuid.uuid4().hex[:12]
        if self.backend.places_sessions:
            if isolation is not None:
                raise SandboxError(f"sessions on a cluster run their nodes' own isolation, not {isolation!r}")
            return await self.backend.open_session(sid, limits or self.settings.limits)
        folder = self.sessions_dir / sid
        folder.mkdir(parents=True)
        (folder / "owner").write_text(self.owner)  # read by a later process's orphan cleanup
        session = Session(self.backend, self.settings, self.owner, folder, sid, limits,
                          own_filesystem=self.loop_workspaces, isolation=isolation)
        await session.start()
        return session

    def _memory_committed(self) -> int:
        """MiB of memory limits held by open, warm and starting sessions."""
        held = [*self._sessions.values(), *self._pool]
        starting = sum(lim.memory_mb for lim in self._starting) + self._warming * self.settings.limits.memory_mb
        return sum(s.limits.memory_mb for s in held) + starting

    def _memory_fits(self, memory_mb: int) -> bool:
        if self.backend.places_sessions:  # the sessions live on other machines: their nodes' slots bound them
            return True
        return self._memory_committed() + memory_mb <= self.memory_budget_mb

    def may_use(self, session_id: str, caller: Caller | None) -> bool:
        """Whether ``caller`` (``None``: the server itself) may see the session: its owner, or an admin."""
        return caller is None or caller.admin or self._owners.get(session_id) == caller.name

    def owner_of(self, session_id: str) -> str | None:
        return self._owners.get(session_id)

    def get(self, session_id: str, caller: Caller | None = None) -> Session:
        """The open session; another user's answers exactly as one that does not exist."""
        session = self._sessions.get(session_id)
        if session is None or not self.may_use(session_id, caller):
            raise SessionClosed(f"no open session {session_id!r}: it was closed or never existed")
        return session

    def list(self, caller: Caller | None = None) -> list[Session]:
        return [s for sid, s in self._sessions.items() if self.may_use(sid, caller)]

    async def close(self, session_id: str, caller: Caller | None = None) -> None:
        session = self._sessions.get(session_id)
        if session is None or not self.may_use(session_id, caller):
            raise SessionClosed(f"no open session {session_id!r}: it was closed or never existed")
        del self._sessions[session_id]
        self._emit("session.close", session_id, {"by": caller.name} if caller is not None else None)
        self._owners.pop(session_id, None)
        # in a task of its own, so that a shutdown meanwhile waits for it before closing the backend
        # (and a caller cancelled half-way does not leave a container behind)
        closing = asyncio.ensure_future(session.close())
        self._closes.add(closing)
        closing.add_done_callback(self._closes.discard)
        await asyncio.shield(closing)

    # -- warm pool and reaper ---------------------------------------------------------------
    def _schedule_refill(self) -> None:
        if self.pool_size and (self._refill is None or self._refill.done()) and not self._closing:
            self._refill = asyncio.create_task(self._fill_pool())

    async def _fill_pool(self) -> None:
        while len(self._pool) < self.pool_size and not self._closing:
            if len(self._sessions) + len(self._pool) >= self.settings.max_sessions:
                return
            if not self._memory_fits(self.settings.limits.memory_mb):
                return
            self._warming += 1
            try:
                session = await self._new_session()
            except SandboxError as exc:
                log.warning("warm pool: could not start a session: %s", exc)
                return
            finally:
                self._warming -= 1
            if self._closing:
                await session.close()
                return
            self._pool.append(session)

    async def _reap_idle(self) -> None:
        ttl = self.settings.idle_ttl_s
        while True:
            await asyncio.sleep(min(max(ttl / 4, 0.5), 30))
            now = time.monotonic()
            for sid, session in list(self._sessions.items()):
                if now - session.last_used > ttl and not session.busy:
                    log.info("closing session %s after %.0f s idle", sid, now - session.last_used)
                    self._sessions.pop(sid, None)
                    self._emit("session.expire", sid, {"idle_s": round(now - session.last_used)})
                    self._owners.pop(sid, None)
                    try:
                        await session.close()
                        if self.on_reap is not None:
                            self.on_reap(sid)
                    except Exception:  # one bad session must not end reaping for the others
                        log.exception("closing idle session %s failed", sid)

    async def shutdown(self) -> None:
        """Close every session and the pool; nothing is left running. Idempotent."""
        self._closing = True
        for task in (self._reaper, self._refill):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        for sid in self._sessions:  # a user's session ends here too: told as a close by the shutdown
            self._emit("session.close", sid, {"by": "shutdown"})
        self._owners.clear()
        sessions = list(self._sessions.values()) + self._pool
        self._sessions.clear()
        self._pool.clear()
        await asyncio.gather(*(s.close() for s in sessions), *self._closes, return_exceptions=True)
        await self.backend.close()
        self._started = False
