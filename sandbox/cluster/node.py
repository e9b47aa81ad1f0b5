"""What runs on a cluster node: one actor per session holding a real local ``Session``, and the
clean-up of what dead sessions left on the node.

A node's own environment says where its files go (``JUPYBOX_HOME``) and what it is called
(``JUPYBOX_NODE``, default: its host name); the server sends the rest (image, limits, time-outs).
The session runs on the node's Docker daemon with the docker backend, hardened as on one host;
its kernel's Unix sockets never leave the node: only code, outputs and file chunks cross.

Ownership: every container and session folder names its owner, the actor's own process
(``node-<name>.<pid>.<start>``), and carries the label ``jupybox.node=<name>``. Ray ends an actor
with its node or with the server that created it, so an owner that no longer exists means a
leftover, which ``prepare_node`` removes. It only ever looks at containers labelled with its own
node's name, so nodes that share a Docker daemon never touch each other's live sessions.
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
from ..errors import SandboxError, WorkspaceError
from ..manager import SessionManager, make_owner
from ..models import Execution, Output
from ..session import Session
from ..workspace import CHUNK, WorkspaceFile, remove_tree, split_name

log = logging.getLogger(__name__)

NODE_LABEL = f"{LABEL}.node"
MAX_OPEN_FILES = 16  # downloads open at once in one session
MAX_UPLOADS = 4  # uploads arriving at once in one session (each holds a thread while it lasts)
UPLOAD_IDLE_S = 120.0  # an upload whose next chunk does not come within this is abandoned


def node_name() -> str:
    raw = os.environ.get("JUPYBOX_NODE") or socket.gethostname()
    return re.sub(r"[^A-Za-z0-9_-]", "-", raw)[:60] or "node"


def node_settings(server: SandboxSettings) -> SandboxSettings:
    """The server's settings as this node applies them: its own home and wheelhouse, its own owner
    names. A node's sessions end with the server that placed them (no records are kept on nodes)."""
    wheelhouse = os.environ.get("JUPYBOX_WHEELHOUSE")
    return dataclasses.replace(server, backend="docker", home=default_home(), instance=f"node-{node_name()}",
                               pool_size=0, ray_address=None, durable=False,
                               wheelhouse=Path(wheelhouse) if wheelhouse else None)


@dataclasses.dataclass
class NodeReport:
    """What ``prepare_node`` found: the node's name, what it removed, and why it cannot run
    sessions (``problem``), if it cannot."""

    name: str
    removed: int
    problem: str | None = None


def prepare_node(server: SandboxSettings) -> NodeReport:
    """Run on a node (as a Ray task) when a server first sees it: check that it can run sandboxes
    and remove what sessions of dead processes left there (containers, mounts, folders)."""
    return asyncio.run(_prepare(server))


async def _prepare(server: SandboxSettings) -> NodeReport:
    settings = node_settings(server)
    name = node_name()
    manager = SessionManager(settings, backend=DockerBackend(settings, labels={NODE_LABEL: name}))
    try:
        try:
            await manager.backend.check()
        except SandboxError as exc:
            return NodeReport(name, 0, str(exc))
        removed = await manager.cleanup_orphans()
        if removed:
            log.info("node %s: removed %d leftover sandbox(es)", name, removed)
        return NodeReport(name, removed)
    finally:
        await manager.backend.close()


def _own_filesystem(settings: SandboxSettings) -> bool:
    """As ``SessionManager`` decides on one host: a size-capped filesystem per workspace when possible."""
    if settings.workspace_fs == "plain":
        return False
    reason = diskfs.unavailable()
    if reason is not None and settings.workspace_fs == "loop":
        raise SandboxError(f"workspace_fs=loop needs a loop-mounted filesystem per workspace, but {reason}")
    return reason is None


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


class SessionHost:
    """One session on this node, as a Ray actor (async: an interrupt or a file call reaches it
    while an execution runs). Its methods mirror ``Session`` and ``Workspace``; errors are the
    sandbox's own (``WorkspaceError``, ``SessionClosed`` ...), which the server re-raises."""

    def __init__(self, server: SandboxSettings, session_id: str, limits: Limits) -> None:
        self.settings = node_settings(server)
        self.name = node_name()
        self.session_id = session_id
        self.limits = limits
        self.session: Session | None = None
        self._runs: dict[str, tuple[asyncio.Event, asyncio.Task | None]] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="jupybox-files")
        self._writers = ThreadPoolExecutor(max_workers=MAX_UPLOADS, thread_name_prefix="jupybox-uploads")
        self._uploads: dict[str, _Upload] = {}
        self._files: dict[str, BinaryIO] = {}
        self._ids = itertools.count()

    async def start(self) -> dict[str, Any]:
        """Start the kernel (its container on this node's daemon); says where it landed."""
        import ray

        backend = DockerBackend(self.settings, labels={NODE_LABEL: self.name})
        owner = make_owner(self.settings.instance or "")
        folder = self.settings.home / "sessions" / self.session_id
        folder.mkdir(parents=True)
        (folder / "owner").write_text(owner)  # read by prepare_node once this process is gone
        self.session = Session(backend, self.settings, owner, folder, self.session_id, self.limits,
                               own_filesystem=_own_filesystem(self.settings))
        await self.session.start()
        return {"node": self.name, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def _open(self) -> Session:
        if self.session is None:
            raise SandboxError("the session was not started")
        return self.session

    # -- execution --------------------------------------------------------------------------
    async def execute(self, code: str, timeout: float | None, run: str) -> Execution:
        cancel = asyncio.Event()
        self._runs[run] = (cancel, asyncio.current_task())
        try:
            return await self._open().execute(code, timeout, cancel=cancel)
        finally:
            self._runs.pop(run, None)

    async def stream(self, code: str, timeout: float | None, run: str) -> AsyncIterator[Output | Execution]:
        """Outputs as they come, then the Execution (a Ray streaming generator). Cancelling it
        (the server's consumer left) closes ``Session.stream``, which interrupts the run."""
        cancel = asyncio.Event()
        self._runs[run] = (cancel, None)
        items = self._open().stream(code, timeout, cancel)
        try:
            async for item in items:
                yield item
        finally:
            await items.aclose()
            self._runs.pop(run, None)

    async def cancel(self, run: str) -> None:
        """Stop one run: dropped if it still waits for its turn, interrupted if it runs."""
        cancel, task = self._runs.get(run, (None, None))
        if cancel is not None:
            cancel.set()
            if task is not None and self.session is not None:
                self.session.interrupt(task)  # only if this run is the one executing

    async def interrupt(self) -> None:
        if self.session is not None:
            self.session.interrupt()

    async def restart(self) -> None:
        await self._open().restart()

    async def close(self) -> None:
        for handle in list(self._files):
            await self.file_close(handle)
        for handle in list(self._uploads):
            await self.upload_abort(handle)
        if self.session is not None:
            await self.session.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._writers.shutdown(wait=False, cancel_futures=True)

    def __ray_shutdown__(self) -> None:
        """Ray ends the actor gracefully (its handles are gone) before ``close`` was called: remove
        the container and the folder here, so nothing waits for the next clean-up."""
        session = self.session
        if session is None or session.closed:
            return
        try:
            import docker

            client = docker.from_env(timeout=30)
            for c in client.containers.list(all=True, filters={"label": f"{LABEL}.session={session.id}"}):
                c.remove(force=True)
            client.close()
            diskfs.release(session.folder)
            remove_tree(session.folder)
        except Exception:  # the node's next prepare_node removes what is left
            log.exception("session %s: clean-up at actor exit failed", session.id)

    # -- files ------------------------------------------------------------------------------
    async def _files_call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    async def list_files(self) -> list[WorkspaceFile]:
        return await self._files_call(self._open().workspace.list)

    async def usage(self) -> int:
        return await self._files_call(self._open().workspace.usage)

    async def exists(self, name: str) -> bool:
        return await self._files_call(self._open().workspace.exists, name)

    async def delete(self, name: str, missing_ok: bool) -> None:
        await self._files_call(self._open().workspace.delete, name, missing_ok)

    async def write(self, name: str, data: bytes) -> WorkspaceFile:
        return await self._files_call(self._open().workspace.write, name, data)

    async def upload_begin(self, name: str, size_hint: int | None = None) -> str:
        """A handle for ``upload_chunk``; a bad name, or a ``size_hint`` over the quotas, is
        refused before any data moves."""
        split_name(name)
        if len(self._uploads) >= MAX_UPLOADS:
            raise WorkspaceError(f"{MAX_UPLOADS} uploads into this session are already running: wait for one to end")
        if size_hint is not None:
            await self._files_call(self._check_room, name, size_hint)
        handle = f"u{next(self._ids)}"
        self._uploads[handle] = _Upload(self._open(), name, self._writers)
        return handle

    def _check_room(self, name: str, size: int) -> None:
        workspace = self._open().workspace
        workspace._check_quota(name, size, workspace.usage() - (workspace._size_of(name) or 0))

    async def upload_chunk(self, handle: str, chunk: bytes | None) -> WorkspaceFile | None:
        """One chunk (at most ``CHUNK`` bytes); None ends the file and returns it. A refused
        write (quota, path) raises here, at the chunk that crossed the line, or at the end."""
        upload = self._uploads.get(handle)
        if upload is None:
            raise WorkspaceError("no such upload: it ended or was abandoned; send the file again")
        if chunk is not None and len(chunk) > CHUNK:
            raise WorkspaceError(f"upload chunks are at most {CHUNK} bytes")
        await asyncio.to_thread(upload.put, chunk)
        if chunk is not None:
            if upload.done.done():  # refused part-way: say why now, not after the whole file
                self._uploads.pop(handle, None)
                upload.done.result()
            return None
        self._uploads.pop(handle, None)
        return await asyncio.wrap_future(upload.done)

    async def upload_abort(self, handle: str) -> None:
        upload = self._uploads.pop(handle, None)
        if upload is not None:
            await asyncio.to_thread(upload.put, _ABORT)
            try:
                await asyncio.wrap_future(upload.done)
            except Exception:
                pass

    async def file_open(self, name: str) -> tuple[str, int]:
        """A handle for ``file_read`` and the file's size when opened."""
        if len(self._files) >= MAX_OPEN_FILES:
            raise WorkspaceError(f"{MAX_OPEN_FILES} downloads of this session are already open: finish one first")
        fh = await self._files_call(self._open().workspace.open, name)
        handle = f"f{next(self._ids)}"
        self._files[handle] = fh
        return handle, os.fstat(fh.fileno()).st_size

    async def file_read(self, handle: str, size: int) -> bytes:
        fh = self._files.get(handle)
        if fh is None:
            raise WorkspaceError("the file was closed")
        return await self._files_call(fh.read, max(0, min(size, CHUNK)))

    async def file_close(self, handle: str) -> None:
        fh = self._files.pop(handle, None)
        if fh is not None:
            await self._files_call(fh.close)

