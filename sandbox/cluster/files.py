"""Talking to a session's actor on its node: errors as the sandbox's own (``unwrap``), and the
session's files (``ClusterWorkspace``, with ``Workspace``'s interface). Data moves in chunks of at
most ``CHUNK`` bytes each way, whatever the file's size, and the quotas are checked on the node as
the chunks arrive. The file methods are blocking, like ``Workspace``'s: call them off the event
loop when the file may be large. ``sandbox.remote_session`` builds the session on top; the
workspace sees it only as ``FileCalls``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from ..config import Limits
from ..errors import JupyboxError, SandboxError, WorkspaceError
from ..workspace import CHUNK, WorkspaceFile, copy_bounded, read_bounded

FILE_CALL_TIMEOUT_S = 120.0  # one file call (a chunk, a listing) on a live node takes far less


class NodeLost(SandboxError):
    """The session's node, or its actor there, is gone; ``reason`` says which and why."""


def unwrap(exc: BaseException, node: str) -> BaseException:
    """The error to raise for a failed actor call: the sandbox's own error as the node raised it
    (without Ray's traceback text), ``NodeLost`` for a dead actor, ``SandboxError`` otherwise."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause
        if isinstance(cause, JupyboxError):
            return cause
        return SandboxError(f"the session failed on node {node!r}: {type(cause).__name__}: {cause}")
    if isinstance(exc, rex.ActorUnavailableError):
        return SandboxError(f"node {node!r} does not answer just now: try again in a moment")
    if isinstance(exc, rex.RayActorError):
        return NodeLost(str(exc))
    if isinstance(exc, rex.GetTimeoutError):
        return SandboxError(f"node {node!r} did not answer within {FILE_CALL_TIMEOUT_S:.0f} s")
    return exc


class FileCalls(Protocol):
    """What ``ClusterWorkspace`` needs of its session, and all it may use."""

    limits: Limits

    @property
    def actor(self) -> Any:
        """The session's actor on its node."""

    @property
    def reachable(self) -> bool:
        """Neither closed nor lost with its node: a file left open there is worth closing."""

    def wait_file_call(self, ref: Any) -> Any:
        """The answer to a file call on the actor (blocking, at most ``FILE_CALL_TIMEOUT_S``), its
        failures as the sandbox's errors (``SessionClosed`` once the session or its node is gone)."""


class ClusterWorkspace:
    """``Workspace``'s interface over the session's actor; data moves in chunks of ``CHUNK``."""

    def __init__(self, session: FileCalls) -> None:
        self._session = session
        self.limits = session.limits

    def _get(self, ref: Any) -> Any:
        return self._session.wait_file_call(ref)

    @property
    def _actor(self) -> Any:
        return self._session.actor

    def list(self) -> list[WorkspaceFile]:
        return self._get(self._actor.list_files.remote())

    def usage(self) -> int:
        return self._get(self._actor.usage.remote())

    def exists(self, name: str) -> bool:
        return self._get(self._actor.exists.remote(name))

    def delete(self, name: str, missing_ok: bool = False) -> None:
        self._get(self._actor.delete.remote(name, missing_ok))

    def write(self, name: str, data: bytes | BinaryIO) -> WorkspaceFile:
        """As ``Workspace.write``: quotas checked on the node as the data arrives; a refused or
        broken upload leaves the previous file (if any) and no partial one."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) <= CHUNK:
                return self._get(self._actor.write.remote(name, bytes(data)))
            data = io.BytesIO(bytes(data))
        with self.writer(name) as out:
            while chunk := data.read(CHUNK):
                out.write(chunk)
            return out.commit()

    def writer(self, name: str, size_hint: int | None = None) -> ClusterWriter:
        """A file written piece by piece (an upload as it arrives): ``write(chunk)`` as often as
        needed, then ``commit()``; leaving the ``with`` block without committing drops it."""
        return ClusterWriter(self, name, self._get(self._actor.upload_begin.remote(name, size_hint)))

    def upload(self, source: Path | str, name: str | None = None) -> WorkspaceFile:
        source = Path(source)
        with source.open("rb") as fh:
            return self.write(name or source.name, fh)

    def open(self, name: str) -> BinaryIO:
        """A file object for streaming a download (one round-trip per ``CHUNK``); the caller closes it."""
        handle, _ = self._get(self._actor.file_open.remote(name))
        return io.BufferedReader(_RemoteFile(self, handle), buffer_size=CHUNK)  # type: ignore[return-value]

    def read(self, name: str, max_bytes: int | None = None) -> bytes:
        """As ``Workspace.read``: at most ``max_bytes`` (default ``limits.file_bytes``) are fetched."""
        with self.open(name) as fh:
            return read_bounded(fh, name, self.limits.file_bytes if max_bytes is None else max_bytes)

    def copy_to(self, name: str, dest: Path, max_bytes: int | None = None) -> int:
        """As ``Workspace.copy_to``."""
        with self.open(name) as fh:
            return copy_bounded(fh, name, dest, self.limits.file_bytes if max_bytes is None else max_bytes)


class ClusterWriter:
    """See ``ClusterWorkspace.writer``: each ``write`` goes to the node in chunks of at most ``CHUNK``."""

    def __init__(self, workspace: ClusterWorkspace, name: str, handle: str) -> None:
        self.name = name
        self.written = 0
        self._workspace = workspace
        self._handle: str | None = handle

    def write(self, chunk: bytes) -> None:
        if self._handle is None:
            raise WorkspaceError(f"{self.name!r}: the upload already ended")
        view = memoryview(chunk)
        try:
            for start in range(0, len(view), CHUNK):
                piece = bytes(view[start:start + CHUNK])
                self._workspace._get(self._workspace._actor.upload_chunk.remote(self._handle, piece))
                self.written += len(piece)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> WorkspaceFile:
        if self._handle is None:
            raise WorkspaceError(f"{self.name!r}: the upload already ended")
        handle, self._handle = self._handle, None
        return self._workspace._get(self._workspace._actor.upload_chunk.remote(handle, None))

    def abort(self) -> None:
        """Drop what was sent; idempotent."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            with contextlib.suppress(Exception):
                self._workspace._actor.upload_abort.remote(handle)

    def __enter__(self) -> ClusterWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class _RemoteFile(io.RawIOBase):
    """One open file on the node, read chunk by chunk."""

    def __init__(self, workspace: ClusterWorkspace, handle: str) -> None:
        self._workspace = workspace
        self._handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._workspace._get(self._workspace._actor.file_read.remote(self._handle, len(buffer)))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            if self._workspace._session.reachable:
                with contextlib.suppress(Exception):
                    self._workspace._actor.file_close.remote(self._handle)
        super().close()
