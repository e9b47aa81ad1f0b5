"""A cluster session's files (``ClusterWorkspace``, with ``SessionFiles``' interface), held by its
node's agent. Data moves in chunks of at most ``CHUNK`` bytes each way, whatever the file's size,
and the quotas are checked on the node as the chunks arrive. The methods block, like
``Workspace``'s: call them off the event loop when the file may be large. Every call goes through
the session's ``SessionLink``; the workspace knows nothing else of its session.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

from ..config import Limits
from ..errors import WorkspaceError
from ..workspace import CHUNK, WorkspaceFile, copy_bounded, read_bounded
from .link import SessionLink


class ClusterWorkspace:
    """``Workspace``'s interface over the session's record on its node."""

    def __init__(self, link: SessionLink, limits: Limits) -> None:
        self._link = link
        self.limits = limits

    def list(self) -> list[WorkspaceFile]:
        return self._link.call_blocking("list_files")

    def usage(self) -> int:
        return self._link.call_blocking("usage")

    def exists(self, name: str) -> bool:
        return self._link.call_blocking("exists", name)

    def delete(self, name: str, missing_ok: bool = False) -> None:
        self._link.call_blocking("delete", name, missing_ok)

    def write(self, name: str, data: bytes | BinaryIO) -> WorkspaceFile:
        """As ``Workspace.write``: quotas checked on the node as the data arrives; a refused or
        broken upload leaves the previous file (if any) and no partial one."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) <= CHUNK:
                return self._link.call_blocking("write", name, bytes(data))
            data = io.BytesIO(bytes(data))
        with self.writer(name) as out:
            while chunk := data.read(CHUNK):
                out.write(chunk)
            return out.commit()

    def writer(self, name: str, size_hint: int | None = None) -> ClusterWriter:
        """A file written piece by piece (an upload as it arrives): ``write(chunk)`` as often as
        needed, then ``commit()``; leaving the ``with`` block without committing drops it."""
        return ClusterWriter(self._link, name, self._link.call_blocking("upload_begin", name, size_hint))

    def upload(self, source: Path | str, name: str | None = None) -> WorkspaceFile:
        source = Path(source)
        with source.open("rb") as fh:
            return self.write(name or source.name, fh)

    def open(self, name: str) -> BinaryIO:
        """A file object for streaming a download (one round-trip per ``CHUNK``); the caller closes it."""
        handle, _ = self._link.call_blocking("file_open", name)
        return io.BufferedReader(_NodeFile(self._link, handle), buffer_size=CHUNK)  # type: ignore[return-value]

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

    def __init__(self, link: SessionLink, name: str, handle: str) -> None:
        self.name = name
        self.written = 0
        self._link = link
        self._handle: str | None = handle

    def write(self, chunk: bytes) -> None:
        if self._handle is None:
            raise WorkspaceError(f"{self.name!r}: the upload already ended")
        view = memoryview(chunk)
        try:
            for start in range(0, len(view), CHUNK):
                piece = bytes(view[start:start + CHUNK])
                self._link.call_blocking("upload_chunk", self._handle, piece)
                self.written += len(piece)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> WorkspaceFile:
        if self._handle is None:
            raise WorkspaceError(f"{self.name!r}: the upload already ended")
        handle, self._handle = self._handle, None
        return self._link.call_blocking("upload_chunk", handle, None)

    def abort(self) -> None:
        """Drop what was sent; idempotent."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._link.send("upload_abort", handle)

    def __enter__(self) -> ClusterWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class _NodeFile(io.RawIOBase):
    """One open file on the node, read chunk by chunk."""

    def __init__(self, link: SessionLink, handle: str) -> None:
        self._link = link
        self._handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._link.call_blocking("file_read", self._handle, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._link.send("file_close", self._handle)
        super().close()
