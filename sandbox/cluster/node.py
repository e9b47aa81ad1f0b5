"""What runs on a cluster node: one agent per node (a Ray actor, one per server) that owns the
node's sessions, as ``SessionManager`` owns them on one host, and the clean-up of what dead
agents left there.

A session is a record in the agent (a real local ``Session`` on the node's Docker daemon, with the
docker backend, hardened as on one host), not a process of its own: the agent's process is the
only one a node spends on jupybox, whatever its number of sessions. The kernel's channels reach the
server through the agent's CurveZMQ relay (``sandbox.cluster.channels``); Ray carries only control
calls (start, restart, liveness, close) and file chunks.

A node's own environment says where its files go (``JUPYBOX_HOME``) and what it is called
(``JUPYBOX_NODE``, default: its host name); the server sends the rest (image, limits, time-outs).

Ownership: every container and session folder names its owner, the agent's own process
(``node-<name>.<pid>.<start>``), and carries the label ``jupybox.node=<name>``. Ray ends an agent
with its node or with the server that created it, so an owner that no longer exists means a
leftover, which the next agent on the node removes when it starts (``prepare``). It only ever looks at
containers labelled with its own node's name, so nodes that share a Docker daemon never touch each
other's live sessions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import queue
import re
import socket
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from .. import diskfs
from ..backends.docker import LABEL, DockerBackend
from ..config import Limits, SandboxSettings, default_home
from ..errors import SandboxError, SessionClosed, WorkspaceError
from ..manager import SessionManager
from ..models import Execution, ImageFile, Output
from ..session import Session
from ..workspace import CHUNK, WorkspaceFile, remove_tree, split_name
from .channels import KeyPair, NodeRelays

log = logging.getLogger(__name__)

NODE_LABEL = f"{LABEL}.node"
MAX_OPEN_FILES = 16  # downloads open at once in one session
MAX_UPLOADS = 4  # uploads arriving at once in one session (each holds a thread while it lasts)
UPLOAD_IDLE_S = 120.0  # an upload whose next chunk does not come within this is abandoned


def node_name() -> str:
    raw = os.environ.get("JUPYBOX_NODE") or socket.gethostname()
    return re.sub(r"[^A-Za-z0-9_-]", "-", raw)[:60] or "node"


def node_settings(server: SandboxSettings, slots: int) -> SandboxSettings:
    """The server's settings as this node applies them: its own home and wheelhouse, its own owner
    names, its slots as the session cap. No warm pool here (the server keeps one per node), no idle
    reaping (the server's reaper decides) and no records: a node's sessions end with the server
    that placed them."""
    wheelhouse = os.environ.get("JUPYBOX_WHEELHOUSE")
    return dataclasses.replace(server, backend="docker", home=default_home(), instance=f"node-{node_name()}",
                               pool_size=0, ray_address=None, durable=False, max_sessions=max(slots, 1),
                               idle_ttl_s=float("inf"),
                               wheelhouse=Path(wheelhouse) if wheelhouse else None)


@dataclasses.dataclass
class NodeReport:
    """What ``NodeAgent.prepare`` found: the node's name, what it removed, and why it cannot run
    sessions (``problem``), if it cannot."""

    name: str
    removed: int
    node_id: str = ""
    pid: int = 0
    problem: str | None = None
    address: str = ""  # where its relays listen
    key: bytes = b""  # its relays' public key


_ABORT = object()


class _Upload:
    """A file arriving in chunks: ``Workspace.write`` reads it in a thread as the chunks come, so
    quotas and the atomic rename work exactly as for a local write (a refused or abandoned
    upload leaves no partial file)."""

    def __init__(self, session: Session, name: str, pool: ThreadPoolExecutor) -> None:
        self.chunks: queue.Queue[object] = queue.Queue(maxsize=2)
        self.done: Future[WorkspaceFile] = pool.submit(session.workspace.write, name, self)

    def read(self, size: int = -1) -> bytes:  # Workspace.write's side, in its thread
        try:
            chunk = self.chunks.get(timeout=UPLOAD_IDLE_S)
        except queue.Empty:
            raise WorkspaceError("the upload stalled: no data for two minutes; send the file again") from None
        if chunk is _ABORT:
            raise WorkspaceError("the upload was abandoned")
        return b"" if chunk is None else chunk  # type: ignore[return-value]

    def put(self, chunk: object) -> None:
        """Hand over a chunk (None ends the file, ``_ABORT`` drops it); returns early if the write
        already failed."""
        while not self.done.done():
            try:
                self.chunks.put(chunk, timeout=0.2)
                return
            except queue.Full:
                continue


@dataclasses.dataclass
class _Hosted:
    """One session's record in the agent: its session and what is open in it."""

    session: Session
    runs: dict[str, tuple[asyncio.Event, asyncio.Task | None]] = dataclasses.field(default_factory=dict)
    uploads: dict[str, _Upload] = dataclasses.field(default_factory=dict)
    files: dict[str, BinaryIO] = dataclasses.field(default_factory=dict)


class NodeAgent:
    """This node's sessions, as one Ray actor (async: an interrupt or a file call reaches it while
    executions run). Every method takes the session's id first and mirrors ``Session`` or
    ``Workspace``; errors are the sandbox's own (``WorkspaceError``, ``SessionClosed`` ...), which
    the server re-raises."""

    def __init__(self, server: SandboxSettings, slots: int, server_key: bytes, server_address: str) -> None:
        self.settings = node_settings(server, slots)
        self.server_key = server_key  # the one client key its relays accept
        self.server_address = server_address
        self.relays: NodeRelays | None = None
        self.name = node_name()
        self.manager = SessionManager(self.settings, backend=DockerBackend(self.settings, labels={NODE_LABEL: self.name}))
        self._hosted: dict[str, _Hosted] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="jupybox-files")
        self._writers = ThreadPoolExecutor(max_workers=MAX_UPLOADS * 4, thread_name_prefix="jupybox-uploads")
        self._ids = itertools.count()

    async def prepare(self) -> NodeReport:
        """Check that this node can run sandboxes and remove what dead agents left here
        (containers, mounts, folders); called once, before any session."""
        import ray

        where = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        try:
            address = ray.util.get_node_ip_address()
            self.relays = NodeRelays(address, KeyPair.new(), self.server_key, self.server_address)
            where.update(address=address, key=self.relays.keys.public)
            await self.manager.backend.check()
            removed = await self.manager.cleanup_orphans()
            await self.manager.start()
        except SandboxError as exc:
            return NodeReport(self.name, 0, problem=str(exc), **where)
        if removed:
            log.info("node %s: removed %d leftover sandbox(es)", self.name, removed)
        return NodeReport(self.name, removed, **where)

    def _get(self, sid: str) -> _Hosted:
        hosted = self._hosted.get(sid)
        if hosted is None:
            raise SessionClosed(f"session {sid} is closed: create a new session")
        return hosted

    def _session(self, sid: str) -> Session:
        return self._get(sid).session

    async def open(self, limits: Limits) -> str:
        """Start a session (its container on this node's daemon); returns its id."""
        session = await self.manager.create(limits if limits != self.settings.limits else None)
        self._hosted[session.id] = _Hosted(session)
        return session.id

    def sessions(self) -> int:
        return len(self._hosted)

    # -- execution --------------------------------------------------------------------------
    async def execute(self, sid: str, code: str, timeout: float | None, run: str) -> Execution:
        hosted = self._get(sid)
        cancel = asyncio.Event()
        hosted.runs[run] = (cancel, asyncio.current_task())
        try:
            return await hosted.session.execute(code, timeout, cancel=cancel)
        finally:
            hosted.runs.pop(run, None)

    async def stream(self, sid: str, code: str, timeout: float | None, run: str) -> AsyncIterator[Output | Execution]:
        """Outputs as they come, then the Execution (a Ray streaming generator). Cancelling it
        (the server's consumer left) closes ``Session.stream``, which interrupts the run."""
        hosted = self._get(sid)
        cancel = asyncio.Event()
        hosted.runs[run] = (cancel, None)
        items = hosted.session.stream(code, timeout, cancel)
        try:
            async for item in items:
                yield item
        finally:
            await items.aclose()
            hosted.runs.pop(run, None)

    async def cancel(self, sid: str, run: str) -> None:
        """Stop one run: dropped if it still waits for its turn, interrupted if it runs."""
        hosted = self._hosted.get(sid)
        cancel, task = hosted.runs.get(run, (None, None)) if hosted else (None, None)
        if cancel is not None and hosted is not None:
            cancel.set()
            if task is not None:
                hosted.session.interrupt(task)  # only if this run is the one executing

    async def interrupt(self, sid: str) -> None:
        if (hosted := self._hosted.get(sid)) is not None:
            hosted.session.interrupt()

    async def restart(self, sid: str) -> dict[str, Any]:
        """A fresh kernel; returns its channels (``channels``): the old relay closed with the old kernel."""
        await self._session(sid).restart()
        return await self.channels(sid)

    async def channels(self, sid: str) -> dict[str, Any]:
        """Open (again) the session's relay to its running kernel, started first if it has none;
        returns the TCP ports, the node's public key and the kernel's signing key."""
        session = self._session(sid)
        if session.connection is None or session.supervisor.needs_replacement:
            await session.restart()
        assert self.relays is not None and session.connection is not None
        return await self.relays.open(sid, session.connection)

    async def alive(self, sid: str) -> bool:
        """Whether the session's kernel still runs (asked once a second during long executions)."""
        return await self._session(sid).supervisor.alive()

    async def exit_reason(self, sid: str) -> str:
        """Why the session's kernel ended, in words (out of memory, its exit status ...)."""
        session = self._session(sid)
        handle = session.supervisor.handle
        session.supervisor.mark_dead(session.supervisor.generation)
        return await session.backend.exit_reason(handle) if handle is not None else "it is gone"

    async def pip_request(self, sid: str, request: Any) -> None:
        """A kernel's ``%pip install`` request (it waits for the answer this node's installer gives it)."""
        self._session(sid).site.submit(request)

    async def pip_settle(self, sid: str) -> None:
        await self._session(sid).site.settle()

    async def save_images(self, sid: str, outputs: list[Output]) -> list[ImageFile]:
        return await asyncio.to_thread(self._session(sid).save_images, outputs)

    async def close(self, sid: str) -> None:
        """End the session: its open files, its kernel, its folder. Idempotent."""
        hosted = self._hosted.pop(sid, None)
        if hosted is None:
            return
        if self.relays is not None:
            self.relays.close(sid)
        for fh in hosted.files.values():
            await self._files_call(fh.close)
        for upload in hosted.uploads.values():
            await self._abort(upload)
        try:
            await self.manager.close(sid)
        except SessionClosed:  # the manager had already let it go
            await hosted.session.close()

    def __ray_shutdown__(self) -> None:
        """Ray ends the agent gracefully (the server's handle is gone) with sessions still open:
        remove their containers and folders here, so nothing waits for the next agent."""
        if self.relays is not None:
            self.relays.shutdown()
        try:
            import docker

            client = docker.from_env(timeout=30)
            for hosted in self._hosted.values():
                session = hosted.session
                for c in client.containers.list(all=True, filters={"label": f"{LABEL}.session={session.id}"}):
                    c.remove(force=True)
                diskfs.release(session.folder)
                remove_tree(session.folder)
            client.close()
        except Exception:  # the node's next agent removes what is left
            log.exception("node %s: clean-up at agent exit failed", self.name)

    # -- files ------------------------------------------------------------------------------
    async def _files_call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    async def list_files(self, sid: str) -> list[WorkspaceFile]:
        return await self._files_call(self._session(sid).workspace.list)

    async def usage(self, sid: str) -> int:
        return await self._files_call(self._session(sid).workspace.usage)

    async def exists(self, sid: str, name: str) -> bool:
        return await self._files_call(self._session(sid).workspace.exists, name)

    async def delete(self, sid: str, name: str, missing_ok: bool) -> None:
        await self._files_call(self._session(sid).workspace.delete, name, missing_ok)

    async def write(self, sid: str, name: str, data: bytes) -> WorkspaceFile:
        return await self._files_call(self._session(sid).workspace.write, name, data)

    async def upload_begin(self, sid: str, name: str, size_hint: int | None = None) -> str:
        """A handle for ``upload_chunk``; a bad name, or a ``size_hint`` over the quotas, is
        refused before any data moves."""
        hosted = self._get(sid)
        split_name(name)
        if len(hosted.uploads) >= MAX_UPLOADS:
            raise WorkspaceError(f"{MAX_UPLOADS} uploads into this session are already running: wait for one to end")
        if size_hint is not None:
            await self._files_call(self._check_room, hosted.session, name, size_hint)
        handle = f"u{next(self._ids)}"
        hosted.uploads[handle] = _Upload(hosted.session, name, self._writers)
        return handle

    @staticmethod
    def _check_room(session: Session, name: str, size: int) -> None:
        workspace = session.workspace
        workspace._check_quota(name, size, workspace.usage() - (workspace._size_of(name) or 0))

    async def upload_chunk(self, sid: str, handle: str, chunk: bytes | None) -> WorkspaceFile | None:
        """One chunk (at most ``CHUNK`` bytes); None ends the file and returns it. A refused
        write (quota, path) raises here, at the chunk that crossed the line, or at the end."""
        uploads = self._get(sid).uploads
        upload = uploads.get(handle)
        if upload is None:
            raise WorkspaceError("no such upload: it ended or was abandoned; send the file again")
        if chunk is not None and len(chunk) > CHUNK:
            raise WorkspaceError(f"upload chunks are at most {CHUNK} bytes")
        await asyncio.to_thread(upload.put, chunk)
        if chunk is not None:
            if upload.done.done():  # refused part-way: say why now, not after the whole file
                uploads.pop(handle, None)
                upload.done.result()
            return None
        uploads.pop(handle, None)
        return await asyncio.wrap_future(upload.done)

    async def upload_abort(self, sid: str, handle: str) -> None:
        hosted = self._hosted.get(sid)
        upload = hosted.uploads.pop(handle, None) if hosted else None
        if upload is not None:
            await self._abort(upload)

    @staticmethod
    async def _abort(upload: _Upload) -> None:
        await asyncio.to_thread(upload.put, _ABORT)
        try:
            await asyncio.wrap_future(upload.done)
        except Exception:
            pass

    async def file_open(self, sid: str, name: str) -> tuple[str, int]:
        """A handle for ``file_read`` and the file's size when opened."""
        hosted = self._get(sid)
        if len(hosted.files) >= MAX_OPEN_FILES:
            raise WorkspaceError(f"{MAX_OPEN_FILES} downloads of this session are already open: finish one first")
        fh = await self._files_call(hosted.session.workspace.open, name)
        handle = f"f{next(self._ids)}"
        hosted.files[handle] = fh
        return handle, os.fstat(fh.fileno()).st_size

    async def file_read(self, sid: str, handle: str, size: int) -> bytes:
        fh = self._get(sid).files.get(handle)
        if fh is None:
            raise WorkspaceError("the file was closed")
        return await self._files_call(fh.read, max(0, min(size, CHUNK)))

    async def file_close(self, sid: str, handle: str) -> None:
        hosted = self._hosted.get(sid)
        fh = hosted.files.pop(handle, None) if hosted else None
        if fh is not None:
            await self._files_call(fh.close)
