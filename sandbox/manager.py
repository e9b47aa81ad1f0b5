"""Sessions on one backend: creation, a warm pool, the registry, idle reaping, orphan cleanup.

``SessionManager`` is the entry point of the sandbox::

    async with SessionManager(SandboxSettings()) as manager:
        session = await manager.create()
        execution = await session.execute("1 + 1")
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from store import PAUSED, RUNNING, SessionRecord, SessionRecords, StoreError

from .backends import Backend, create_backend
from .config import Limits, SandboxSettings
from .errors import CapacityError, LimitsError, PauseFailed, SandboxError, SessionClosed
from .session import Session
from .state import StateReport
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


def disk_usage(folder: "os.PathLike[str] | str") -> int:
    """Bytes a session's folder takes on disk, without following links; 0 when it is gone. A
    workspace on its own filesystem counts what that filesystem holds (its image file's blocks lag
    behind what was just written, and it is sparse), plain files their allocated blocks."""
    total, stack = 0, [os.fspath(folder)]
    mounted = os.path.ismount(os.path.join(os.fspath(folder), "data"))
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if os.path.ismount(entry.path):
                        st = os.statvfs(entry.path)
                        total += (st.f_blocks - st.f_bfree) * st.f_frsize
                    else:
                        stack.append(entry.path)
                elif not (mounted and top == os.fspath(folder) and entry.name == diskfs.IMAGE_NAME):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return total


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
        # sessions as records that outlive this process (a cluster's sessions end with the server)
        self.durable = self.settings.durable and not self.backend.places_sessions
        self.records = SessionRecords.at_home(self.settings.home) if self.durable else None

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
        if self.durable:
            await self._reopen_recorded()
        removed = await self.cleanup_orphans()
        if removed:
            log.info("removed %d orphaned sandbox(es)", removed)
        self._started = True
        self._reaper = asyncio.create_task(self._reap_idle())
        if self.pool_size:
            await self._fill_pool()

    async def cleanup_orphans(self) -> int:
        """Remove the containers and folders that dead processes of this instance left, except
        those of sessions that records keep (re-adopted at start, or left for a later start)."""
        kept = set(self._sessions) | set(await self._recorded_ids())
        dead = lambda owner, sid="": owner_is_dead(owner, self.instance) and sid not in kept  # noqa: E731
        removed = await self.backend.cleanup_orphans(dead)
        for folder in self.sessions_dir.glob("*"):
            try:
                owner = (folder / "owner").read_text()
            except OSError:
                continue
            if dead(owner, folder.name):
                await asyncio.to_thread(diskfs.release, folder)
                await asyncio.to_thread(remove_tree, folder)
        return removed

    # -- records: sessions that outlive the process ------------------------------------------
    async def _recorded_ids(self) -> list[str]:
        """Sessions of this instance that records keep, also read by a manager that keeps none
        itself (`jupybox sandbox cleanup` beside a durable server's home)."""
        records = self.records or SessionRecords.at_home(self.settings.home)
        try:
            return [r.id for r in await asyncio.to_thread(records.list, self.instance)]
        except StoreError as exc:
            log.warning("the session records cannot be read: %s", exc)
            return []

    async def _record(self, call: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """A change to the records, off the loop; a store that cannot be written is logged (the
        session works on, it just would not outlive the server), never the caller's failure."""
        if self.records is None:
            return None
        try:
            return await asyncio.to_thread(call, *args, **kw)
        except StoreError as exc:
            log.warning("session record not written: %s", exc)
            return None

    def record_of(self, session_id: str, caller: Caller | None = None) -> SessionRecord | None:
        """The session's record, conversation included (``None``: none, or not the caller's)."""
        if self.records is None or not self.may_use(session_id, caller) or session_id not in self._sessions:
            return None
        try:
            return self.records.get(session_id)
        except StoreError as exc:
            log.warning("the session record of %s cannot be read: %s", session_id, exc)
            return None

    def history(self, caller: Caller | None = None, chat: str | None = None) -> list[SessionRecord]:
        """The caller's sessions (everyone's for an admin or the server), newest use first, as
        records without their conversations, only those whose record names the front end's
        conversation ``chat`` where given; ``[]`` where sessions are not durable."""
        if self.records is None:
            return []
        try:
            records = self.records.list(self.instance, chat=chat)
        except StoreError as exc:
            log.warning("the session records cannot be read: %s", exc)
            return []
        return [r for r in records if r.id in self._sessions and self.may_use(r.id, caller)]

    def recorded_chat(self, chat: str, caller: Caller | None = None) -> str | None:
        """The newest session of the caller's whose record names the front end's conversation
        ``chat`` (an OpenAI client's ``user``, say), so that it continues after a restart."""
        found = self.history(caller, chat=chat)
        return found[0].id if found else None

    async def remember(self, session_id: str, **values: Any) -> None:
        """Write some fields of the session's record (the conversation service's conversation and
        title), with its last use now."""
        if self.records is not None and session_id in self._sessions:
            await self._record(self.records.update, session_id, last_used=time.time(), **values)

    async def _reopen_recorded(self) -> None:
        """Take up the sessions the records hold for this instance: kernels still running (the
        server was killed) are connected again as they are; the others are paused, resumed on
        their next use. A record whose folder is gone is dropped."""
        try:
            records = await asyncio.to_thread(self.records.list, self.instance)  # type: ignore[union-attr]
        except StoreError as exc:
            log.warning("the session records cannot be read, earlier sessions are not reopened: %s", exc)
            return
        reopened = await asyncio.gather(*(self._reopen(r) for r in records), return_exceptions=True)
        for record, outcome in zip(records, reopened):
            if isinstance(outcome, BaseException):
                log.warning("session %s could not be reopened: %s", record.id, outcome)
        if records:
            log.info("reopened %d of %d recorded session(s)", sum(o is True for o in reopened), len(records))

    async def _reopen(self, record: SessionRecord) -> bool:
        folder = self.sessions_dir / record.id
        if not await asyncio.to_thread(folder.is_dir):
            await self._record(self.records.delete, record.id)  # type: ignore[union-attr]
            return False
        try:
            limits = Limits(**record.limits) if record.limits else self.settings.limits
            limits.check()
        except (TypeError, LimitsError):
            limits = self.settings.limits
        await asyncio.to_thread((folder / "owner").write_text, self.owner)
        session = Session(self.backend, self.settings, self.owner, folder, record.id,
                          limits if limits != self.settings.limits else None,
                          own_filesystem=(folder / diskfs.IMAGE_NAME).exists(), isolation=record.isolation)
        handle = await self.backend.adopt(session.kernel_spec()) if record.state == RUNNING else None
        await session.reopen(handle)
        session.created = record.created
        session.pause_note = record.note if session.paused else None
        session.last_used = time.monotonic() - max(time.time() - record.last_used, 0.0)
        session.before_resume, session.after_resume = self._admit_resume, self._resumed
        self._sessions[record.id] = session
        if record.owner is not None:
            self._owners[record.id] = record.owner
        if session.paused and record.state == RUNNING:  # its kernel ended while no server ran
            note = ("the kernel stopped while the server was down: variables were not saved" if not
                    session.will_restore else "variables saved earlier are loaded on the next use")
            session.pause_note = note
            await self._record(self.records.update, record.id, state=PAUSED, paused=time.time(),  # type: ignore[union-attr]
                               note=note)
        return True

    async def _resumed(self, session: Session) -> None:
        if self.records is not None and session.id in self._sessions:
            await self._record(self.records.update, session.id, state=RUNNING, paused=None, last_used=time.time())
        self._emit("session.resume", session.id)

    def _admit_resume(self, session: Session) -> None:
        """Called before a paused session starts a kernel again: it needs the room a new one does."""
        running = self._running()
        if running + len(self._starting) >= self.settings.max_sessions:
            raise CapacityError(f"{running} sessions are running, the limit is {self.settings.max_sessions}: "
                                "this paused session resumes once one is closed or paused")
        if not self._memory_fits(session.limits.memory_mb):
            raise CapacityError(f"the running sessions hold {self._memory_committed()} MiB of the "
                                f"{self.memory_budget_mb} MiB this host grants them: this paused session "
                                "resumes once one is closed or paused")

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
        session.before_resume, session.after_resume = self._admit_resume, self._resumed
        if self.records is not None:
            await self._record(self.records.put, SessionRecord(
                session.id, self.instance, caller.name if caller is not None else None, RUNNING,
                created=session.created, limits=dataclasses.asdict(session.limits), isolation=session.isolation))
        self._emit("session.create", session.id, {"memory_mb": session.limits.memory_mb})
        return session

    def _check_user_limits(self, caller: Caller, memory_mb: int) -> None:
        """``UserLimit`` naming the limit when one more session of ``memory_mb`` would pass it."""
        held = [s.limits.memory_mb for sid, s in self._sessions.items()
                if self._owners.get(sid) == caller.name and not s.paused]
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
        running = self._running()
        if running + len(self._starting) >= self.settings.max_sessions:
            raise CapacityError(
                f"{running} sessions are running, the limit is {self.settings.max_sessions}: "
                "close or pause idle sessions, or raise max_sessions"
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

    def _running(self) -> int:
        """Open sessions with a kernel (paused ones hold none), as ``max_sessions`` counts them."""
        return sum(not s.paused for s in self._sessions.values())

    def _memory_committed(self) -> int:
        """MiB of memory limits held by open, warm and starting sessions."""
        held = [*(s for s in self._sessions.values() if not s.paused), *self._pool]
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
        if self.records is not None:
            await self._record(self.records.delete, session_id)
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
            if self._running() + len(self._pool) >= self.settings.max_sessions:
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
        retain_s = self.settings.retain_days * 86400
        period = min(max(min(ttl, retain_s) / 4, 0.5), 30)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for sid, session in list(self._sessions.items()):
                idle = now - session.last_used
                try:
                    if session.paused:
                        if idle > retain_s and self._sessions.get(sid) is session:
                            log.info("deleting session %s: paused and unused for %.1f days", sid, idle / 86400)
                            await self._drop(sid, session, "session.expire", {"retained_days": self.settings.retain_days})
                    elif idle > ttl and not session.busy:
                        if self.durable:
                            log.info("pausing session %s after %.0f s idle", sid, idle)
                            try:
                                report = await session.pause()
                            except PauseFailed as exc:  # it runs on as it was; tried again after another TTL
                                log.warning("idle session %s was not paused: %s", sid, exc)
                                session.touch()
                                continue
                            await self._paused(session, report, "idle")
                        else:
                            log.info("closing session %s after %.0f s idle", sid, idle)
                            await self._drop(sid, session, "session.expire", {"idle_s": round(idle)})
                except Exception:  # one bad session must not end reaping for the others
                    log.exception("reaping idle session %s failed", sid)

    async def _drop(self, sid: str, session: Session, action: str, detail: dict) -> None:
        """Close ``session`` for the server (idle or past retention): record, files and all."""
        self._sessions.pop(sid, None)
        self._emit(action, sid, detail)
        self._owners.pop(sid, None)
        if self.records is not None:
            await self._record(self.records.delete, sid)
        await session.close()
        if self.on_reap is not None:
            self.on_reap(sid)

    # -- pause -----------------------------------------------------------------------------
    async def pause(self, session_id: str, caller: Caller | None = None) -> StateReport:
        """Pause the session: its variables saved, its container removed, its files kept; the next
        use resumes it. ``PauseFailed`` (the session runs on as it was) when nothing could be saved;
        ``SandboxError`` where sessions do not outlive the server."""
        session = self.get(session_id, caller)
        if not self.durable or not hasattr(session, "pause"):
            raise SandboxError("this server does not keep sessions (durable sessions are off, or they run on a "
                               "cluster): nothing can be paused")
        report = await session.pause()
        await self._paused(session, report, caller.name if caller is not None else "server")
        return report

    async def _paused(self, session: Session, report: StateReport, by: str) -> None:
        wall = time.time() - max(time.monotonic() - session.last_used, 0.0)
        size = await asyncio.to_thread(disk_usage, session.folder)
        await self._record(self.records.update, session.id, state=PAUSED, paused=time.time(),  # type: ignore[union-attr]
                           last_used=wall, note=report.words(), disk_bytes=size)
        self._emit("session.pause", session.id, {"by": by, "saved": len(report.saved), "skipped": len(report.skipped),
                                                 "bytes": report.bytes, **({"error": report.error} if report.error else {})})

    async def _pause_for_shutdown(self, session: Session) -> None:
        if session.paused or session.closed:
            return
        try:
            report = await session.pause(force=True)
        except Exception:  # noqa: BLE001 - a session that cannot pause is still stopped below
            log.exception("session %s could not be paused at shutdown", session.id)
            await session.close(keep_workspace=True)
            return
        await self._paused(session, report, "shutdown")

    async def shutdown(self) -> None:
        """Pause every session (durable) or close it, and close the pool; nothing is left
        running. Idempotent."""
        self._closing = True
        for task in (self._reaper, self._refill):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        if self.durable:  # nothing runs while the server is gone: every session is paused, kept for later
            await asyncio.gather(*(self._pause_for_shutdown(s) for s in list(self._sessions.values())),
                                 return_exceptions=True)
            kept = list(self._sessions.values())
            self._sessions.clear()
            await asyncio.gather(*(s.close(keep_workspace=True) for s in kept), return_exceptions=True)
            # no mount is left behind either: the next start mounts the workspaces it reopens
            await asyncio.gather(*(asyncio.to_thread(diskfs.release, s.folder) for s in kept), return_exceptions=True)
        for sid in self._sessions:  # a user's session ends here too: told as a close by the shutdown
            self._emit("session.close", sid, {"by": "shutdown"})
        self._owners.clear()
        sessions = list(self._sessions.values()) + self._pool
        self._sessions.clear()
        self._pool.clear()
        await asyncio.gather(*(s.close() for s in sessions), *self._closes, return_exceptions=True)
        await self.backend.close()
        self._started = False
